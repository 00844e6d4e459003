//! Reverse-mode autograd limited to what training needs.
//!
//! A `Recording` puts a tape on the current thread. Tensors marked with
//! `Recording::param` (the trainable parameters) are the leaves; every op
//! whose inputs include a leaf, or a value derived from one, records a node
//! with the closure that turns the gradient of its output into the gradients
//! of its tracked inputs, and what that closure keeps alive. Everything else
//! (frozen weights, the image, values that only depend on them) is a
//! constant: nothing is recorded for it, and gradients pass through the ops
//! that read it without computing its own (a frozen linear saves no input and
//! runs no weight-gradient GEMM). So the frozen ViT blocks in front of the
//! first adapter record nothing at all.
//!
//! `Recording::backward` runs the nodes in reverse order of recording (a
//! topological order, since a node's inputs existed before it), sums the
//! gradients of a value used twice, and drops each node (and what it saved)
//! once it has run. An op with no backward that gets a tracked input is an
//! error (`Error::NoBackward`), never a silent detach.
//!
//! The tape is thread-local: the ops record on the thread that calls them
//! (their rayon work is inside one call). While backward runs, the tape is
//! taken off the thread, so the ops that compute gradients record nothing.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What a tensor carries when it is tracked: the tape it belongs to and its
/// value's index there. A tensor from an ended tape is a constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var {
    tape: u32,
    id: u32,
}

/// The closure of a node: gradient of its output -> gradients of its inputs
/// (one entry per input, `None` for a constant input or one it gives no
/// gradient to).
pub type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    op: &'static str,
    /// The tracked value each input was (None: a constant).
    inputs: Vec<Option<u32>>,
    output: u32,
    saved_bytes: usize,
    backward: BackwardFn,
}

struct Value {
    dims: Vec<usize>,
    /// Set for a parameter leaf.
    name: Option<String>,
}

struct Tape {
    tag: u32,
    values: Vec<Value>,
    nodes: Vec<Node>,
}

static NEXT_TAPE: AtomicU32 = AtomicU32::new(1);

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

fn with_tape<R>(f: impl FnOnce(&mut Tape) -> R) -> Option<R> {
    TAPE.with(|t| t.borrow_mut().as_mut().map(f))
}

/// The value index of `t` on the current tape, if it is tracked there.
fn tracked_id(tape: &Tape, t: &Tensor) -> Option<u32> {
    t.var().filter(|v| v.tape == tape.tag).map(|v| v.id)
}

/// Whether any of `inputs` is tracked by the tape of this thread (if any):
/// an op then records itself.
pub fn is_tracked(inputs: &[&Tensor]) -> bool {
    with_tape(|tape| inputs.iter().any(|t| tracked_id(tape, t).is_some())).unwrap_or(false)
}

/// Whether `t` needs a gradient (is tracked by this thread's tape).
pub fn requires_grad(t: &Tensor) -> bool {
    is_tracked(&[t])
}

/// Records `op` if any of `inputs` is tracked: `out` becomes a tracked value
/// whose gradient `backward` maps to the inputs' gradients. `saved_bytes`:
/// what the closure keeps alive (for the memory report). Call it after the
/// forward has computed `out`; build the closure only when `is_tracked`.
pub fn record(
    op: &'static str,
    inputs: &[&Tensor],
    out: &mut Tensor,
    saved_bytes: usize,
    backward: BackwardFn,
) {
    let vars: Vec<Option<Var>> = inputs.iter().map(|t| t.var()).collect();
    record_vars(op, &vars, out, saved_bytes, backward)
}

/// `record` for an op of one input whose backward maps the output's gradient
/// to the input's; `saved_bytes` as `record`. Records nothing when x is a
/// constant (the closure is dropped unbuilt in effect: it is only called).
pub fn record_unary(
    op: &'static str,
    x: &Tensor,
    out: &mut Tensor,
    saved_bytes: usize,
    backward: impl FnOnce(&Tensor) -> Result<Tensor> + 'static,
) {
    if !requires_grad(x) {
        return;
    }
    record(
        op,
        &[x],
        out,
        saved_bytes,
        Box::new(move |g| Ok(vec![Some(backward(g)?)])),
    );
}

/// `record` for inputs given by what they were (`Tensor::var` taken before
/// an in-place op overwrote the tensor).
pub fn record_vars(
    op: &'static str,
    inputs: &[Option<Var>],
    out: &mut Tensor,
    saved_bytes: usize,
    backward: BackwardFn,
) {
    let var = with_tape(|tape| {
        let ids: Vec<Option<u32>> = inputs
            .iter()
            .map(|v| v.filter(|v| v.tape == tape.tag).map(|v| v.id))
            .collect();
        if ids.iter().all(Option::is_none) {
            return None;
        }
        let id = tape.values.len() as u32;
        tape.values.push(Value {
            dims: out.dims().to_vec(),
            name: None,
        });
        tape.nodes.push(Node {
            op,
            inputs: ids,
            output: id,
            saved_bytes,
            backward,
        });
        Some(Var { tape: tape.tag, id })
    })
    .flatten();
    out.set_var(var);
}

/// For an op without a backward: an error if any input is tracked.
pub fn no_backward(op: &'static str, inputs: &[&Tensor]) -> Result<()> {
    if is_tracked(inputs) {
        return Err(Error::NoBackward { op });
    }
    Ok(())
}

/// The bytes of a tensor's values (what saving it costs).
pub fn bytes(t: &Tensor) -> usize {
    t.numel() * t.dtype().size_in_bytes()
}

/// One node as the memory report lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub op: &'static str,
    pub saved_bytes: usize,
    pub output_dims: Vec<usize>,
}

/// A tape on the current thread for as long as this lives.
pub struct Recording {
    tag: u32,
}

/// The gradients of the parameters, by the names they were registered under
/// (a parameter that got none is absent).
pub type Grads = Vec<(String, Tensor)>;

impl Recording {
    /// Starts recording on this thread; an error if a recording is already on.
    pub fn start() -> Result<Self> {
        let tag = NEXT_TAPE.fetch_add(1, Ordering::Relaxed);
        TAPE.with(|t| {
            let mut t = t.borrow_mut();
            if t.is_some() {
                return Err(Error::input(
                    "autograd",
                    "a recording is already on for this thread",
                ));
            }
            *t = Some(Tape {
                tag,
                values: vec![],
                nodes: vec![],
            });
            Ok(())
        })?;
        Ok(Recording { tag })
    }

    /// Marks `t` as a trainable parameter named `name`: a leaf whose gradient
    /// `backward` returns.
    pub fn param(&self, t: &mut Tensor, name: impl Into<String>) -> Result<()> {
        let var = with_tape(|tape| {
            (tape.tag == self.tag).then(|| {
                let id = tape.values.len() as u32;
                tape.values.push(Value {
                    dims: t.dims().to_vec(),
                    name: Some(name.into()),
                });
                Var { tape: tape.tag, id }
            })
        })
        .flatten()
        .ok_or_else(|| Error::input("autograd", "the recording has ended"))?;
        t.set_var(Some(var));
        Ok(())
    }

    /// The nodes recorded so far, in order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        with_tape(|tape| {
            tape.nodes
                .iter()
                .map(|n| NodeInfo {
                    op: n.op,
                    saved_bytes: n.saved_bytes,
                    output_dims: tape.values[n.output as usize].dims.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// Back-propagates `grad` (the gradient of `out`, same shape) through the
    /// tape and ends the recording: the parameters' gradients, in the order
    /// they were registered.
    pub fn backward(self, out: &Tensor, grad: &Tensor) -> Result<Grads> {
        let mut got: Vec<(usize, String, Tensor)> = vec![];
        self.backward_into(out, grad, &mut |i, name, g| {
            got.push((i, name.to_string(), g));
            Ok(())
        })?;
        // Registration order.
        got.sort_by_key(|(i, ..)| *i);
        Ok(got.into_iter().map(|(_, n, g)| (n, g)).collect())
    }

    /// `backward`, handing each parameter's gradient to `sink` (with the
    /// parameter's registration index and name) as soon as it is complete:
    /// right after the earliest-recorded node that reads the parameter has
    /// run, so that a caller can move it into a store (or start reducing it
    /// across devices) while backward goes on, and no gradient waits for the
    /// end. Parameters that `out` does not depend on are not handed over.
    pub fn backward_into(
        self,
        out: &Tensor,
        grad: &Tensor,
        sink: &mut dyn FnMut(usize, &str, Tensor) -> Result<()>,
    ) -> Result<()> {
        let tape = TAPE
            .with(|t| t.borrow_mut().take())
            .filter(|t| t.tag == self.tag)
            .ok_or_else(|| Error::input("autograd", "the recording has ended"))?;
        let Some(root) = tracked_id(&tape, out) else {
            return Err(Error::input(
                "autograd backward",
                "the output does not depend on any parameter",
            ));
        };
        if grad.dims() != out.dims() {
            return Err(Error::shape(
                "autograd backward",
                format!("gradient {:?} for output {:?}", grad.dims(), out.dims()),
            ));
        }
        let Tape {
            values, mut nodes, ..
        } = tape;
        // The earliest node reading each value: a named value's gradient is
        // complete once that node has run (nodes run latest first).
        let mut first_use = vec![usize::MAX; values.len()];
        for (k, node) in nodes.iter().enumerate() {
            for id in node.inputs.iter().flatten() {
                let f = &mut first_use[*id as usize];
                *f = (*f).min(k);
            }
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; values.len()];
        grads[root as usize] = Some(grad.clone());
        // A parameter that is itself the output.
        if let Some(name) = &values[root as usize].name
            && first_use[root as usize] == usize::MAX
            && let Some(g) = grads[root as usize].take()
        {
            sink(root as usize, name, g)?;
        }
        while let Some(node) = nodes.pop() {
            let k = nodes.len();
            let Some(g) = grads[node.output as usize].take() else {
                continue; // the output does not reach `out`
            };
            let op = node.op;
            let ins = {
                let _p = crate::profile::backward_scope(op);
                (node.backward)(&g)?
            };
            drop(g);
            if ins.len() != node.inputs.len() {
                return Err(Error::input(
                    "autograd backward",
                    format!(
                        "{op}: {} gradients for {} inputs",
                        ins.len(),
                        node.inputs.len()
                    ),
                ));
            }
            for (id, gi) in node.inputs.iter().zip(ins) {
                let (Some(id), Some(gi)) = (id, gi) else {
                    continue;
                };
                let want = &values[*id as usize].dims;
                if gi.dims() != want.as_slice() {
                    return Err(Error::shape(
                        "autograd backward",
                        format!("{op}: gradient {:?} for an input {:?}", gi.dims(), want),
                    ));
                }
                let slot = &mut grads[*id as usize];
                match slot {
                    None => *slot = Some(gi),
                    Some(acc) => crate::ops::activation::add_(acc, &gi)?,
                }
            }
            for id in node.inputs.iter().flatten() {
                let i = *id as usize;
                if first_use[i] == k
                    && let Some(name) = &values[i].name
                    && let Some(g) = grads[i].take()
                {
                    sink(i, name, g)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        TAPE.with(|t| {
            let mut t = t.borrow_mut();
            if t.as_ref().is_some_and(|tape| tape.tag == self.tag) {
                *t = None;
            }
        });
    }
}

#[cfg(test)]
mod tests;
