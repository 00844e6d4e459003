//! Data parallelism: the collective operations ranks use to train as one.
//!
//! `Collective` is what a data-parallel step needs: a sum over ranks that
//! gives every rank the same bits (the ranks' values added in rank order,
//! so that a run does not depend on arrival order). Implementations:
//! `InProcess`, ranks as threads of one process (tests), `Tcp`, ranks as
//! processes on one machine or several (`train --nproc`, torchrun, Slurm),
//! and `Nccl`, GPU ranks that sum on the devices (bootstrapped over `Tcp`). A rank that leaves (its handle dropped, e.g. by a panic) or does not
//! arrive within the timeout makes the others' calls fail with a clear error
//! instead of waiting forever.

mod launch;
mod nccl;
mod tcp;

pub use launch::{Launch, first_host};
pub use nccl::{Nccl, nccl_available};
pub use tcp::Tcp;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Collective operations over the ranks of a group.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// x <- the sum of every rank's x; every rank gets the same bits.
    /// `InProcess` and `Tcp` add in rank order in f32 (((x0 + x1) + x2)
    /// ...), NCCL in its rings' order. Lengths must agree.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()>;
    /// The same in f64.
    fn all_reduce_sum_f64(&self, x: &mut [f64]) -> Result<()>;
    /// The sum over ranks of a device buffer, computed on the devices, when
    /// the group can (NCCL: a new buffer); None: it cannot, and the caller
    /// goes through the host.
    fn all_reduce_sum_device(
        &self,
        _x: &cudarc::driver::CudaSlice<f32>,
    ) -> Result<Option<cudarc::driver::CudaSlice<f32>>> {
        Ok(None)
    }
    /// Whether `all_reduce_sum_on_stream` sums device memory in stream
    /// order (else the caller sums gradients through the host after
    /// backward).
    fn sums_on_stream(&self) -> bool {
        false
    }
    /// x <- the sum of every rank's x, in place, enqueued on `stream` after
    /// the work it already holds: NCCL without the host waiting; the
    /// in-process group (tests) through the host, which waits for the
    /// stream. Only where `sums_on_stream`; every rank calls it in the same
    /// order.
    fn all_reduce_sum_on_stream(
        &self,
        _stream: &Arc<cudarc::driver::CudaStream>,
        x: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        Err(Error::Collective {
            op: "all_reduce_on_stream",
            msg: format!(
                "this group cannot sum device memory on a stream ({} values)",
                x.len()
            ),
        })
    }
    /// A second, independent group over the same ranks (every rank calls
    /// it, in the same order): its reductions never wait behind this one's,
    /// so gradient buckets can be summed on another thread while backward
    /// (and SyncBatchNorm's reductions) go on here. None: this group cannot
    /// (the caller reduces after backward instead).
    fn duplicate(&self) -> Result<Option<Box<dyn Collective>>> {
        Ok(None)
    }
}

#[derive(Clone, Debug)]
enum Buf {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

#[derive(Default)]
struct Round {
    /// Completed reductions (a waiting rank watches it change).
    generation: u64,
    bufs: Vec<Option<Buf>>,
    arrived: usize,
    result: Option<Arc<Buf>>,
    taken: usize,
    /// Why the group cannot go on (a rank left, or a mismatch).
    failed: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
    /// The groups `duplicate` made, in the order the ranks ask for them.
    duplicates: Mutex<Vec<Arc<Shared>>>,
}

impl Shared {
    fn new(world: usize, timeout: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            world,
            timeout,
            round: Mutex::new(Round {
                bufs: vec![None; world],
                ..Round::default()
            }),
            cv: Condvar::new(),
            duplicates: Mutex::new(vec![]),
        })
    }
}

/// One rank of a group of threads in this process.
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    /// How many duplicates this rank has asked for.
    duplicated: std::sync::atomic::AtomicUsize,
}

impl InProcess {
    /// A group of `world` ranks (hand one to each thread); a call waits at
    /// most `timeout` for the other ranks.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Shared::new(world, timeout);
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: Arc::clone(&shared),
                duplicated: Default::default(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        self.shared.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(op: &'static str, msg: String) -> Error {
        Error::Collective { op, msg }
    }

    /// Waits on the condition variable until `done` holds, the group fails
    /// or the deadline passes.
    fn wait<'a>(
        &'a self,
        mut g: std::sync::MutexGuard<'a, Round>,
        deadline: Instant,
        what: &str,
        done: &dyn Fn(&Round) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, Round>> {
        loop {
            // Done first: a rank that finished and left must not fail the
            // others' collection of the last result.
            if done(&g) {
                return Ok(g);
            }
            if let Some(f) = &g.failed {
                return Err(Self::fail("all_reduce", format!("rank {}: {f}", self.rank)));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..self.shared.world)
                    .filter(|&r| g.bufs[r].is_none())
                    .collect();
                let msg = format!(
                    "rank {} waited {:?} for {what}; ranks {missing:?} did not arrive",
                    self.rank, self.shared.timeout
                );
                g.failed = Some(msg.clone());
                self.shared.cv.notify_all();
                return Err(Self::fail("all_reduce", msg));
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn reduce(&self, mine: Buf) -> Result<Arc<Buf>> {
        let deadline = Instant::now() + self.shared.timeout;
        let g = self.lock();
        // The previous reduction must be collected by everyone first.
        let mut g = self.wait(g, deadline, "the previous reduction", &|r| {
            r.result.is_none() && r.bufs[self.rank].is_none()
        })?;
        g.bufs[self.rank] = Some(mine);
        g.arrived += 1;
        let started = g.generation;
        if g.arrived == self.shared.world {
            match sum_in_rank_order(&g.bufs) {
                Ok(sum) => g.result = Some(Arc::new(sum)),
                Err(msg) => {
                    g.failed = Some(msg.clone());
                    self.shared.cv.notify_all();
                    return Err(Self::fail("all_reduce", msg));
                }
            }
            g.generation += 1;
            self.shared.cv.notify_all();
        }
        let mut g = self.wait(g, deadline, "the other ranks", &|r| r.generation != started)?;
        let out = Arc::clone(g.result.as_ref().expect("set with the generation"));
        g.taken += 1;
        if g.taken == self.shared.world {
            g.result = None;
            g.taken = 0;
            g.arrived = 0;
            g.bufs.iter_mut().for_each(|b| *b = None);
            self.shared.cv.notify_all();
        }
        Ok(out)
    }
}

fn sum_in_rank_order(bufs: &[Option<Buf>]) -> std::result::Result<Buf, String> {
    let mut it = bufs.iter().flatten();
    let mut acc = it.next().cloned().ok_or("no buffers")?;
    for b in it {
        match (&mut acc, b) {
            (Buf::F32(a), Buf::F32(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y)
            }
            (Buf::F64(a), Buf::F64(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y)
            }
            _ => return Err("the ranks passed buffers of different lengths or types".into()),
        }
    }
    Ok(acc)
}

impl Drop for InProcess {
    /// A rank that goes away (returns early, panics) fails the group, so
    /// that the others stop instead of waiting for it.
    fn drop(&mut self) {
        let mut g = self.lock();
        if g.failed.is_none() {
            g.failed = Some(format!("rank {} left the group", self.rank));
        }
        self.shared.cv.notify_all();
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        match &*self.reduce(Buf::F32(x.to_vec()))? {
            Buf::F32(s) => x.copy_from_slice(s),
            Buf::F64(_) => unreachable!("types checked in the sum"),
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, x: &mut [f64]) -> Result<()> {
        match &*self.reduce(Buf::F64(x.to_vec()))? {
            Buf::F64(s) => x.copy_from_slice(s),
            Buf::F32(_) => unreachable!("types checked in the sum"),
        }
        Ok(())
    }
    /// Through the host (the ranks are threads of one process): the host
    /// waits for `stream`, sums, and copies the sum back on it. For tests
    /// of the stream path on one device or the emulator, not for speed.
    fn sums_on_stream(&self) -> bool {
        true
    }
    fn all_reduce_sum_on_stream(
        &self,
        stream: &Arc<cudarc::driver::CudaStream>,
        x: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let err = |what: &str, e: cudarc::driver::DriverError| {
            Self::fail(
                "all_reduce_on_stream",
                format!("rank {}: {what}: {e}", self.rank),
            )
        };
        // A copy to pageable memory returns when it is done.
        let mut h = stream
            .clone_dtoh(x)
            .map_err(|e| err("copy to the host", e))?;
        self.all_reduce_sum(&mut h)?;
        stream
            .memcpy_htod(&h, x)
            .map_err(|e| err("copy to the device", e))
    }
    fn duplicate(&self) -> Result<Option<Box<dyn Collective>>> {
        let n = self
            .duplicated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut d = self
            .shared
            .duplicates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while d.len() <= n {
            d.push(Shared::new(self.shared.world, self.shared.timeout));
        }
        Ok(Some(Box::new(InProcess {
            rank: self.rank,
            shared: Arc::clone(&d[n]),
            duplicated: Default::default(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duplicate is a group of its own: reductions on it and on the
    /// original, from two threads of each rank at once, do not mix.
    #[test]
    fn duplicates_reduce_independently() {
        let group = InProcess::group(2, Duration::from_secs(30));
        std::thread::scope(|s| {
            for c in &group {
                s.spawn(move || {
                    let d = c.duplicate().unwrap().expect("in-process groups duplicate");
                    assert_eq!((d.rank(), d.world()), (c.rank(), 2));
                    std::thread::scope(|t| {
                        t.spawn(|| {
                            for i in 0..50 {
                                let mut x = [i as f32 + c.rank() as f32];
                                d.all_reduce_sum(&mut x).unwrap();
                                assert_eq!(x[0], 2.0 * i as f32 + 1.0);
                            }
                        });
                        for i in 0..50 {
                            let mut y = [1000.0 + i as f64];
                            c.all_reduce_sum_f64(&mut y).unwrap();
                            assert_eq!(y[0], 2000.0 + 2.0 * i as f64);
                        }
                    });
                });
            }
        });
    }

    #[test]
    fn sums_in_rank_order_on_every_rank() {
        let group = InProcess::group(3, Duration::from_secs(30));
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut last = vec![];
                        // Several rounds back to back.
                        for round in 0..5 {
                            let r = c.rank() as f32;
                            let mut x = vec![1e8 * (r - 1.0), 1.0 + r + round as f32];
                            c.all_reduce_sum(&mut x).unwrap();
                            let mut y = [r as f64];
                            c.all_reduce_sum_f64(&mut y).unwrap();
                            assert_eq!(y[0], 3.0);
                            last = x;
                        }
                        last
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // ((-1e8 + 0) + 1e8) in f32, then the second element: 1+2+3 (+ 3 x 4).
        for o in &out {
            assert_eq!(o, &vec![(-1e8f32 + 0.0) + 1e8, 18.0]);
            assert_eq!(o, &out[0]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others() {
        let mut group = InProcess::group(2, Duration::from_secs(30));
        let gone = group.pop().unwrap();
        drop(gone);
        let e = group[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(e.to_string().contains("left the group"), "{e}");
    }

    #[test]
    fn a_rank_that_never_comes_times_out() {
        let group = InProcess::group(2, Duration::from_millis(200));
        let t = Instant::now();
        let e = group[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("did not arrive"), "{e}");
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let group = InProcess::group(2, Duration::from_secs(30));
        std::thread::scope(|s| {
            let a = s.spawn(|| group[0].all_reduce_sum(&mut [1.0, 2.0]));
            let b = s.spawn(|| group[1].all_reduce_sum(&mut [1.0]));
            assert!(a.join().unwrap().is_err());
            assert!(b.join().unwrap().is_err());
        });
    }
}
