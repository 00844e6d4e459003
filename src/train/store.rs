//! The parameter store, laid out as llm.c lays out its parameters: the
//! trainable values that box prompts reach, their gradients, and Adam's
//! first and second moments, each one flat allocation [total] on the
//! model's device, one slot per parameter in module order. The model's
//! parameter tensors are views of `values` (nothing is duplicated); a
//! gradient is copied into its slot the moment backward completes it
//! (autograd's `backward_into`); Adam runs over the flat buffers in one
//! call (one kernel on CUDA) when every slot got a gradient. Parameters that
//! box prompts never reach (MODEL.md) are not in the store: no gradient, no
//! Adam state, never changed. BatchNorm's running statistics stay in their
//! modules beside it.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ops::layout::copy_into;
use crate::ops::optim::{AdamStep, adam_cpu};
use crate::tensor::{Device, Tensor};

/// Where one parameter lies in the store: values [offset, offset + numel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub offset: usize,
    pub dims: Vec<usize>,
}

impl Slot {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct ParamStore {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    /// [total] each, on the model's device. The gradients are allocated at
    /// the first step's first complete gradient and kept: one allocation for
    /// every step (measured on the CPU: freeing it after each update and
    /// faulting a fresh one in cost ~0.2 s a step and saved no peak memory;
    /// a captured CUDA step needs it fixed).
    values: Tensor,
    grads: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    /// Which slots received a gradient since the last update.
    fresh: Vec<bool>,
    /// Adam steps taken.
    step: u64,
}

impl ParamStore {
    /// A store holding `params` (name and f32 value, any device) in this
    /// order, on `device`; moments zero, no step taken.
    pub fn new(params: &[(String, Tensor)], device: Device) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        let mut index = HashMap::new();
        let mut flat: Vec<f32> = vec![];
        for (name, t) in params {
            if index.insert(name.clone(), slots.len()).is_some() {
                return Err(Error::input("parameter store", format!("{name} twice")));
            }
            slots.push(Slot {
                name: name.clone(),
                offset: flat.len(),
                dims: t.dims().to_vec(),
            });
            flat.extend_from_slice(t.to_host()?.as_f32()?);
        }
        let total = flat.len();
        let zeros = || Tensor::from_vec(vec![0.0f32; total], [total])?.to_device(device);
        Ok(ParamStore {
            fresh: vec![false; slots.len()],
            slots,
            index,
            values: Tensor::from_vec(flat, [total])?.to_device(device)?,
            grads: None,
            m: zeros()?,
            v: zeros()?,
            step: 0,
        })
    }

    /// The slots in store (module) order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// A parameter's index in `slots`.
    pub fn slot_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The slots cut into consecutive buckets of at most `max_values`
    /// values each (a larger slot is a bucket of its own), in store order:
    /// ranges of slot indices.
    pub fn buckets(&self, max_values: usize) -> Vec<std::ops::Range<usize>> {
        let mut out = vec![];
        let (mut start, mut size) = (0, 0);
        for (i, s) in self.slots.iter().enumerate() {
            if i > start && size + s.numel() > max_values {
                out.push(start..i);
                (start, size) = (i, 0);
            }
            size += s.numel();
        }
        if start < self.slots.len() {
            out.push(start..self.slots.len());
        }
        out
    }

    /// The values [start, end) of the slots `r` in the flat buffers.
    pub fn span(&self, r: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        if r.is_empty() {
            return 0..0;
        }
        let last = &self.slots[r.end - 1];
        self.slots[r.start].offset..last.offset + last.numel()
    }

    /// The flat gradients on the CPU, to read or replace in place (None
    /// before the first backward or on another device).
    pub fn cpu_grads_mut(&mut self) -> Option<&mut [f32]> {
        self.grads
            .as_mut()
            .filter(|g| g.device() == Device::Cpu)
            .and_then(|g| g.as_f32_mut().ok())
    }

    /// The device and the flat gradients on it, writable in place (CUDA
    /// only; an error before the first backward).
    pub(crate) fn cuda_grads_mut(
        &mut self,
    ) -> Result<(
        std::sync::Arc<crate::cuda::CudaDevice>,
        cudarc::driver::CudaViewMut<'_, f32>,
    )> {
        const OP: &str = "gradient buckets";
        let g = self
            .grads
            .as_mut()
            .ok_or_else(|| Error::input(OP, "no gradient: run backward first"))?;
        let dev = g.cuda_whole_f32(OP)?.0.clone();
        // A shared buffer would be copied by cuda_f32_mut: the sums already
        // running on the side stream would land in the old one.
        if !g.is_exclusive() {
            return Err(Error::input(
                OP,
                "a view of the gradient buffer is held elsewhere: its buckets cannot be summed in place",
            ));
        }
        Ok((dev, g.cuda_f32_mut(OP)?))
    }

    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.index.get(name).map(|&i| &self.slots[i])
    }

    /// Values in the store, [total].
    pub fn len(&self) -> usize {
        self.values.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flat values [total] (the model's parameters are views of it).
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// The flat gradients [total] of the last backward (None before the
    /// first).
    pub fn grads(&self) -> Option<&Tensor> {
        self.grads.as_ref()
    }

    /// Adam's flat first and second moments [total].
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.m, &self.v)
    }

    /// Adam steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// A parameter's value as a view of the store.
    pub fn view(&self, name: &str) -> Result<Tensor> {
        let s = self.slot(name).ok_or_else(|| unknown(name))?;
        self.values.view(s.offset, s.dims.clone())
    }

    /// A copy of a parameter's gradient from the last backward (None when it
    /// got none).
    pub fn grad(&self, name: &str) -> Result<Option<Tensor>> {
        let i = *self.index.get(name).ok_or_else(|| unknown(name))?;
        let Some(g) = self.grads.as_ref().filter(|_| self.fresh[i]) else {
            return Ok(None);
        };
        let s = &self.slots[i];
        Ok(Some(g.view(s.offset, s.dims.clone())?.compact()?))
    }

    /// Copies a complete gradient into its slot, or adds it to the one
    /// already there when the slot got one since the last update.
    pub fn accept_grad(&mut self, name: &str, g: &Tensor) -> Result<()> {
        let i = *self.index.get(name).ok_or_else(|| {
            Error::input(
                "parameter store",
                format!("{name} got a gradient, but box prompts never reach it (MODEL.md)"),
            )
        })?;
        let s = &self.slots[i];
        if g.dims() != s.dims.as_slice() {
            return Err(Error::shape(
                "parameter store",
                format!("gradient {:?} for {name} {:?}", g.dims(), s.dims),
            ));
        }
        let (offset, total) = (s.offset, self.values.numel());
        if self.grads.is_none() {
            self.grads = Some(
                Tensor::from_vec(vec![0.0f32; total], [total])?.to_device(self.values.device())?,
            );
        }
        let grads = self.grads.as_mut().expect("allocated just above");
        if self.fresh[i] {
            // Gradient accumulation: a second micro-batch before the update
            // adds to what the first left (the order of the sums is fixed:
            // micro-batch by micro-batch).
            let sum = crate::ops::activation::add(&grads.view(offset, s.dims.clone())?, g)?;
            copy_into(grads, offset, &sum)?;
        } else {
            copy_into(grads, offset, g)?;
        }
        self.fresh[i] = true;
        Ok(())
    }

    /// Sums the gradient buffer over the ranks of a data-parallel group
    /// (the same bits on every rank). On CUDA on the devices with an NCCL
    /// group, else through the host.
    pub fn all_reduce_grads(&mut self, comm: &dyn crate::dist::Collective) -> Result<()> {
        let g = self.grads.as_mut().ok_or_else(|| {
            Error::input(
                "parameter store",
                "no gradient to reduce: run backward first",
            )
        })?;
        match g.device() {
            Device::Cpu => comm.all_reduce_sum(g.as_f32_mut()?),
            d @ Device::Cuda(_) => {
                // On the devices when the group can (NCCL).
                let (dev, gs) = g.cuda_whole_f32("all_reduce_grads")?;
                if let Some(sum) = comm.all_reduce_sum_device(gs)? {
                    let dev = dev.clone();
                    *g = Tensor::from_cuda_f32(&dev, sum, g.dims())?;
                    return Ok(());
                }
                let mut h = g.to_host()?.compact()?;
                comm.all_reduce_sum(h.as_f32_mut()?)?;
                copy_into(g, 0, &h.to_device(d)?)
            }
        }
    }

    /// Forgets the gradients received since the last update (a step that
    /// will not be applied, e.g. one with a NaN gradient).
    pub fn discard_grads(&mut self) {
        self.fresh.iter_mut().for_each(|f| *f = false);
    }

    /// The parameters that got a gradient since the last update.
    pub fn fresh(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .zip(&self.fresh)
            .filter_map(|(s, &f)| f.then_some(s))
    }

    /// L2 norm of the fresh gradients (ops::reduce::sum_squares: f64, one
    /// order on both devices; on CUDA only the chunks' sums leave it).
    pub fn grad_norm(&self) -> Result<f64> {
        let Some(grads) = &self.grads else {
            return Ok(0.0);
        };
        let ranges: Vec<(usize, usize)> = self
            .fresh()
            .map(|s| (s.offset, s.offset + s.numel()))
            .collect();
        Ok(crate::ops::reduce::sum_squares(grads, &ranges)?.sqrt())
    }

    /// One Adam step (torch.optim.Adam, ops::optim) on the slots with a
    /// fresh gradient: one call over the whole store when all have one, else
    /// one per run of neighbouring fresh slots; the others keep their values
    /// and moments. The values must not be shared (the model's views
    /// released), or they are copied first.
    ///
    /// One step count for the store (PyTorch keeps one per parameter): the
    /// same as long as every parameter gets a gradient at every step, which
    /// box prompts do; a step with no gradient at all changes nothing.
    pub fn adam(&mut self, lr: f64, beta1: f64, beta2: f64, eps: f64) -> Result<()> {
        if !self.fresh.iter().any(|&f| f) {
            return Ok(());
        }
        self.step += 1;
        let s = AdamStep::new(lr, beta1, beta2, eps, self.step);
        // Runs [a, b) of neighbouring fresh slots, in values.
        let mut runs: Vec<(usize, usize)> = vec![];
        for (slot, &f) in self.slots.iter().zip(&self.fresh) {
            if !f {
                continue;
            }
            let (a, b) = (slot.offset, slot.offset + slot.numel());
            match runs.last_mut() {
                Some(r) if r.1 == a => r.1 = b,
                _ => runs.push((a, b)),
            }
        }
        let Some(grads) = &self.grads else {
            return Ok(());
        };
        match self.values.device() {
            Device::Cpu => {
                let p = self.values.as_f32_mut()?;
                let g = grads.as_f32()?;
                let m = self.m.as_f32_mut()?;
                let v = self.v.as_f32_mut()?;
                for &(a, b) in &runs {
                    adam_cpu(&mut p[a..b], &g[a..b], &mut m[a..b], &mut v[a..b], &s)?;
                }
            }
            Device::Cuda(i) => {
                const OP: &str = "adam";
                let dev = crate::cuda::shared_device(i)?;
                // The step's scalars from device memory (a captured step
                // reads the current ones).
                let h = dev.upload(&s.to_array())?;
                let g = grads.cuda_f32(OP)?;
                let mut p = self.values.cuda_f32_mut(OP)?;
                let mut m = self.m.cuda_f32_mut(OP)?;
                let mut v = self.v.cuda_f32_mut(OP)?;
                for &(a, b) in &runs {
                    crate::ops::optim::cuda::adam(
                        &dev,
                        &mut p.slice_mut(a..b),
                        &g.slice(a..b),
                        &mut m.slice_mut(a..b),
                        &mut v.slice_mut(a..b),
                        &h,
                    )?;
                }
            }
        }
        self.fresh.iter_mut().for_each(|f| *f = false);
        Ok(())
    }

    /// Restores Adam's state (a checkpoint's): the step count and the flat
    /// moments [total], moved to the store's device.
    pub fn set_optimizer_state(&mut self, step: u64, m: &Tensor, v: &Tensor) -> Result<()> {
        for (what, t) in [("m", m), ("v", v)] {
            if t.dims() != [self.len()] {
                return Err(Error::shape(
                    "parameter store",
                    format!("Adam's {what} {:?} for a store of {}", t.dims(), self.len()),
                ));
            }
        }
        let d = self.values.device();
        self.m = m.to_device(d)?.compact()?;
        self.v = v.to_device(d)?.compact()?;
        self.step = step;
        Ok(())
    }
}

fn unknown(name: &str) -> Error {
    Error::input(
        "parameter store",
        format!("no trainable parameter {name} in the store"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>, d: &[usize]) -> Tensor {
        Tensor::from_vec(v, d.to_vec()).unwrap()
    }

    #[test]
    fn store_lays_out_views_grads_and_adam() {
        let params = vec![
            ("a".to_string(), t(vec![1.0, 2.0, 3.0, 4.0], &[2, 2])),
            ("b".to_string(), t(vec![5.0, 6.0], &[2])),
        ];
        let mut st = ParamStore::new(&params, Device::Cpu).unwrap();
        assert_eq!(st.len(), 6);
        assert_eq!(st.slot("b").unwrap().offset, 4);
        assert_eq!(st.view("b").unwrap().as_f32().unwrap(), &[5.0, 6.0]);
        // Only b gets a gradient: a keeps its value and moments.
        st.accept_grad("b", &t(vec![0.5, -0.5], &[2])).unwrap();
        assert!(st.accept_grad("b", &t(vec![0.5], &[1])).is_err());
        assert!(st.accept_grad("c", &t(vec![0.5], &[1])).is_err());
        assert!(st.grad("a").unwrap().is_none());
        assert_eq!(st.grad_norm().unwrap(), 0.5f64.hypot(0.5));
        st.adam(0.1, 0.9, 0.999, 1e-8).unwrap();
        let v = st.values().as_f32().unwrap();
        assert_eq!(&v[..4], &[1.0, 2.0, 3.0, 4.0]);
        // The first step moves by lr against the gradient's sign.
        assert!(
            (v[4] - 4.9).abs() < 1e-6 && (v[5] - 6.1).abs() < 1e-6,
            "{v:?}"
        );
        assert_eq!(&st.moments().0.as_f32().unwrap()[..4], &[0.0; 4]);
        assert_eq!(st.steps(), 1);
        assert!(
            st.set_optimizer_state(3, &t(vec![0.0; 5], &[5]), &t(vec![0.0; 6], &[6]))
                .is_err()
        );
    }
}
