//! Ranks in separate processes (one machine or several) joined over TCP:
//! the collective that `train --nproc N` and torchrun- or Slurm-launched
//! CPU ranks use, and the rendezvous through which GPU ranks will share an
//! NCCL id.
//!
//! A star around rank 0, which listens on MASTER_ADDR:MASTER_PORT. A sum
//! is gathered by rank 0 in rank order (x0 + x1, then + x2, ...: the same
//! bits as `InProcess`) and sent back to every rank. That is 2 (W - 1)
//! buffer transfers through rank 0 per reduction: fine for CPU ranks and
//! small messages; between GPUs the gradients go through NCCL's rings.
//!
//! Every socket has a read and write timeout: a rank that died (its socket
//! closed) fails the others' next call at once, one that hangs fails them
//! after the timeout; the error names the rank. Values travel as
//! little-endian bytes (all ranks on x86-64 / aarch64).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Collective;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SAMUNET1";
const OP: &str = "tcp collective";

fn fail(msg: String) -> Error {
    Error::Collective { op: OP, msg }
}

/// One connection: buffered both ways.
struct Link {
    peer: usize,
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Link {
    fn new(s: TcpStream, peer: usize, timeout: Duration) -> Result<Link> {
        let setup = |e: std::io::Error| fail(format!("socket to rank {peer}: {e}"));
        s.set_nodelay(true).map_err(setup)?;
        s.set_read_timeout(Some(timeout)).map_err(setup)?;
        s.set_write_timeout(Some(timeout)).map_err(setup)?;
        let r = BufReader::with_capacity(1 << 20, s.try_clone().map_err(setup)?);
        Ok(Link {
            peer,
            r,
            w: BufWriter::with_capacity(1 << 20, s),
        })
    }

    /// What an I/O error on this link means for the group.
    fn err(&self, what: &str, e: std::io::Error) -> Error {
        use std::io::ErrorKind::*;
        let p = self.peer;
        fail(match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                format!(
                    "rank {p} closed the connection while this rank was {what} (it failed or exited)"
                )
            }
            WouldBlock | TimedOut => {
                format!(
                    "rank {p} did not answer within the timeout while we {what} (hung or too slow)"
                )
            }
            _ => format!("rank {p}, while {what}: {e}"),
        })
    }

    fn send(&mut self, seq: u64, kind: u8, payload: &[u8]) -> Result<()> {
        let mut h = [0u8; 17];
        h[0] = kind;
        h[1..9].copy_from_slice(&seq.to_le_bytes());
        h[9..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let r = self
            .w
            .write_all(&h)
            .and_then(|_| self.w.write_all(payload))
            .and_then(|_| self.w.flush());
        r.map_err(|e| self.err("sending to it", e))
    }

    /// A message, checked against what this rank expects.
    fn recv(&mut self, seq: u64, kind: u8, into: &mut [u8]) -> Result<()> {
        let mut h = [0u8; 17];
        self.r
            .read_exact(&mut h)
            .map_err(|e| self.err("waiting for it", e))?;
        let their_seq = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(h[9..].try_into().expect("8 bytes"));
        if h[0] != kind || their_seq != seq || len != into.len() as u64 {
            return Err(fail(format!(
                "rank {} is out of step: it sent reduction {their_seq} of {len} bytes (type {}), \
                 this rank expected reduction {seq} of {} bytes (type {kind})",
                self.peer,
                h[0],
                into.len()
            )));
        }
        self.r
            .read_exact(into)
            .map_err(|e| self.err("receiving from it", e))
    }
}

/// This process's rank of a group over TCP.
pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: links to ranks 1..W in rank order; the others: one to rank 0.
    links: Mutex<(u64, Vec<Link>)>,
    /// host:port of rank 0, and how long a call waits.
    master: String,
    timeout: Duration,
}

impl Tcp {
    /// Joins the group: rank 0 listens on `master` (host:port) and waits
    /// for the others; the others connect to it, retrying while it starts.
    /// Both give up after `timeout`, naming the ranks that did not come.
    pub fn connect(rank: usize, world: usize, master: &str, timeout: Duration) -> Result<Tcp> {
        if world == 0 || rank >= world {
            return Err(Error::input(
                OP,
                format!("rank {rank} of a group of {world}"),
            ));
        }
        let deadline = Instant::now() + timeout;
        let links = if rank == 0 {
            // Listen on every interface at the master's port: the name in
            // MASTER_ADDR may be how the others reach this machine, not an
            // address of it.
            let port = Self::addrs(master)?[0].port();
            let listener = TcpListener::bind(("0.0.0.0", port))
                .map_err(|e| fail(format!("rank 0 cannot listen on port {port}: {e}")))?;
            Self::accept_all(world, listener, port, timeout, deadline)?
        } else {
            vec![Self::join(rank, world, master, timeout, deadline)?]
        };
        Ok(Tcp {
            rank,
            world,
            links: Mutex::new((0, links)),
            master: master.to_string(),
            timeout,
        })
    }

    fn addrs(master: &str) -> Result<Vec<SocketAddr>> {
        let v: Vec<SocketAddr> = master
            .to_socket_addrs()
            .map_err(|e| fail(format!("the master address {master}: {e}")))?
            .collect();
        if v.is_empty() {
            return Err(fail(format!(
                "the master address {master} resolves to nothing"
            )));
        }
        Ok(v)
    }

    fn accept_all(
        world: usize,
        listener: TcpListener,
        port: u16,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<Link>> {
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("listener: {e}")))?;
        let mut by_rank: Vec<Option<Link>> = (0..world).map(|_| None).collect();
        let mut joined = 1;
        while joined < world {
            match listener.accept() {
                Ok((s, from)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| fail(format!("socket from {from}: {e}")))?;
                    let mut l = Link::new(s, usize::MAX, timeout)?;
                    let mut hello = [0u8; 24];
                    l.r.read_exact(&mut hello).map_err(|e| {
                        fail(format!(
                            "a rank connecting from {from} sent no greeting: {e}"
                        ))
                    })?;
                    let r = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes")) as usize;
                    let w = u64::from_le_bytes(hello[16..].try_into().expect("8 bytes")) as usize;
                    if &hello[..8] != MAGIC {
                        // Not one of ours (a port scan, another program).
                        continue;
                    }
                    if w != world || r == 0 || r >= world || by_rank[r].is_some() {
                        return Err(fail(format!(
                            "{from} joined as rank {r} of {w}; this group has {world} ranks \
                             (is another job using port {port}?)"
                        )));
                    }
                    l.peer = r;
                    l.w.write_all(MAGIC)
                        .and_then(|_| l.w.flush())
                        .map_err(|e| l.err("greeting it", e))?;
                    by_rank[r] = Some(l);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (1..world).filter(|&r| by_rank[r].is_none()).collect();
                        return Err(fail(format!(
                            "rank 0 waited {timeout:?} on port {port}; ranks {missing:?} did not join"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("rank 0 accepting on port {port}: {e}"))),
            }
        }
        Ok(by_rank.into_iter().flatten().collect())
    }

    fn join(
        rank: usize,
        world: usize,
        master: &str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Link> {
        let addrs = Self::addrs(master)?;
        let s = loop {
            let tried = addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok());
            if let Some(s) = tried {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "rank {rank} could not reach rank 0 at {master} within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut l = Link::new(s, 0, timeout)?;
        let mut hello = MAGIC.to_vec();
        hello.extend((rank as u64).to_le_bytes());
        hello.extend((world as u64).to_le_bytes());
        l.w.write_all(&hello)
            .and_then(|_| l.w.flush())
            .map_err(|e| l.err("greeting it", e))?;
        let mut back = [0u8; 8];
        l.r.read_exact(&mut back)
            .map_err(|e| l.err("waiting for its greeting", e))?;
        if &back != MAGIC {
            return Err(fail(format!("{master} is not rank 0 of a sam-unet group")));
        }
        Ok(l)
    }

    /// The sum over ranks of `x` as bytes of `T` (`add` adds a rank's bytes
    /// into the accumulator), every rank getting rank 0's result.
    fn reduce(&self, kind: u8, x: &mut [u8], add: &dyn Fn(&mut [u8], &[u8])) -> Result<()> {
        let mut g = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, links) = &mut *g;
        if *seq == u64::MAX {
            return Err(fail(format!(
                "rank {}: the group failed earlier",
                self.rank
            )));
        }
        *seq += 1;
        let r = Self::reduce_on(self.rank, *seq, links, kind, x, add);
        if r.is_err() {
            // A failed reduction leaves the group unusable: close every
            // link so that the other ranks learn it now, not at a timeout.
            *seq = u64::MAX;
            for l in links.iter() {
                let _ = l.w.get_ref().shutdown(std::net::Shutdown::Both);
            }
        }
        r
    }

    fn reduce_on(
        rank: usize,
        seq: u64,
        links: &mut [Link],
        kind: u8,
        x: &mut [u8],
        add: &dyn Fn(&mut [u8], &[u8]),
    ) -> Result<()> {
        if rank == 0 {
            let mut theirs = vec![0u8; x.len()];
            for l in links.iter_mut() {
                l.recv(seq, kind, &mut theirs)?;
                add(x, &theirs);
            }
            for l in links.iter_mut() {
                l.send(seq, kind, x)?;
            }
        } else {
            let l = &mut links[0];
            l.send(seq, kind, x)?;
            l.recv(seq, kind, x)?;
        }
        Ok(())
    }
}

impl Drop for Tcp {
    /// Closes every socket at once, so that the other ranks learn that this
    /// one is gone (rather than after their timeout).
    fn drop(&mut self) {
        let g = self.links.get_mut().unwrap_or_else(|p| p.into_inner());
        for l in &g.1 {
            let _ = l.w.get_ref().shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        self.reduce(1, bytemuck::cast_slice_mut(x), &|acc, b| {
            let a: &mut [f32] = bytemuck::cast_slice_mut(acc);
            // The received bytes may not be 4-aligned: read them one by one.
            for (v, c) in a.iter_mut().zip(b.chunks_exact(4)) {
                *v += f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        })
    }
    /// A second group over new sockets: rank 0 listens on a free port and
    /// tells the others which through this group.
    fn duplicate(&self) -> Result<Option<Box<dyn Collective>>> {
        let listener = if self.rank == 0 {
            Some(
                TcpListener::bind(("0.0.0.0", 0))
                    .map_err(|e| fail(format!("rank 0 cannot listen for a second group: {e}")))?,
            )
        } else {
            None
        };
        let mut port = [match &listener {
            Some(l) => l
                .local_addr()
                .map_err(|e| fail(format!("the second group's port: {e}")))?
                .port() as f64,
            None => 0.0,
        }];
        self.all_reduce_sum_f64(&mut port)?;
        let port = port[0] as u16;
        let deadline = Instant::now() + self.timeout;
        let links = match listener {
            Some(l) => Self::accept_all(self.world, l, port, self.timeout, deadline)?,
            None => {
                let host = self
                    .master
                    .rsplit_once(':')
                    .map_or(self.master.as_str(), |(h, _)| h);
                let addr = format!("{host}:{port}");
                vec![Self::join(
                    self.rank,
                    self.world,
                    &addr,
                    self.timeout,
                    deadline,
                )?]
            }
        };
        Ok(Some(Box::new(Tcp {
            rank: self.rank,
            world: self.world,
            links: Mutex::new((0, links)),
            master: self.master.clone(),
            timeout: self.timeout,
        })))
    }
    fn all_reduce_sum_f64(&self, x: &mut [f64]) -> Result<()> {
        self.reduce(2, bytemuck::cast_slice_mut(x), &|acc, b| {
            let a: &mut [f64] = bytemuck::cast_slice_mut(acc);
            for (v, c) in a.iter_mut().zip(b.chunks_exact(8)) {
                *v += f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn group(world: usize, timeout: Duration) -> Vec<Result<Tcp>> {
        let master = format!("127.0.0.1:{}", free_port());
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let m = master.clone();
                    s.spawn(move || Tcp::connect(r, world, &m, timeout))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_in_rank_order_like_in_process() {
        let g: Vec<Tcp> = group(3, Duration::from_secs(30))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = g
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut last = vec![];
                        for round in 0..5 {
                            let r = c.rank() as f32;
                            // Large enough to need several socket writes.
                            let mut x = vec![1.0 + r + round as f32; 300_000];
                            x[0] = 1e8 * (r - 1.0);
                            c.all_reduce_sum(&mut x).unwrap();
                            let mut y = [r as f64, 0.5];
                            c.all_reduce_sum_f64(&mut y).unwrap();
                            assert_eq!(y, [3.0, 1.5]);
                            last = x;
                        }
                        last
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in &out {
            assert_eq!(o[0], (-1e8f32 + 0.0) + 1e8);
            assert!(o[1..].iter().all(|&v| v == 18.0));
        }
    }

    /// A duplicate runs over its own sockets: its reductions and the
    /// original group's, from two threads of each rank at once, do not mix.
    #[test]
    fn duplicates_reduce_independently() {
        let g: Vec<Tcp> = group(3, Duration::from_secs(30))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        std::thread::scope(|s| {
            for c in &g {
                s.spawn(move || {
                    let d = c.duplicate().unwrap().expect("TCP groups duplicate");
                    assert_eq!((d.rank(), d.world()), (c.rank(), 3));
                    std::thread::scope(|t| {
                        t.spawn(|| {
                            for i in 0..30 {
                                let mut x = vec![i as f32 + c.rank() as f32; 50_000];
                                d.all_reduce_sum(&mut x).unwrap();
                                assert!(x.iter().all(|&v| v == 3.0 * i as f32 + 3.0));
                            }
                        });
                        for i in 0..30 {
                            let mut y = [1000.0 + i as f64];
                            c.all_reduce_sum_f64(&mut y).unwrap();
                            assert_eq!(y[0], 3000.0 + 3.0 * i as f64);
                        }
                    });
                });
            }
        });
    }

    #[test]
    fn a_rank_that_exits_fails_the_others_at_once() {
        let mut g: Vec<Tcp> = group(3, Duration::from_secs(60))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        drop(g.pop()); // rank 2 exits
        let t = Instant::now();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| g[0].all_reduce_sum(&mut [1.0]));
            let b = s.spawn(|| g[1].all_reduce_sum(&mut [1.0]));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(t.elapsed() < Duration::from_secs(30));
        let a = a.unwrap_err().to_string();
        assert!(a.contains("rank 2 closed the connection"), "{a}");
        // Rank 1 learns it from rank 0, which closes its links on failure.
        let b = b.unwrap_err().to_string();
        assert!(b.contains("rank 0"), "{b}");
    }

    #[test]
    fn a_rank_that_hangs_times_out() {
        let g: Vec<Tcp> = group(2, Duration::from_millis(500))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let t = Instant::now();
        let e = g[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(e.contains("rank 1 did not answer"), "{e}");
    }

    #[test]
    fn missing_ranks_and_mismatches_are_named() {
        let port = free_port();
        let e = Tcp::connect(
            0,
            3,
            &format!("127.0.0.1:{port}"),
            Duration::from_millis(300),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("ranks [1, 2] did not join"), "{e}");
        let e = Tcp::connect(
            1,
            2,
            &format!("127.0.0.1:{}", free_port()),
            Duration::from_millis(300),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("could not reach rank 0"), "{e}");
        let g: Vec<Tcp> = group(2, Duration::from_secs(30))
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| g[0].all_reduce_sum(&mut [1.0, 2.0]));
            let b = s.spawn(|| g[1].all_reduce_sum(&mut [1.0]));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a.unwrap_err().to_string().contains("out of step"));
        assert!(b.is_err());
        // Nothing works after a failure.
        assert!(g[0].all_reduce_sum(&mut [1.0]).is_err());
    }
}
