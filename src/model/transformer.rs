//! SAM's two-way transformer (`mask_decoder.sam_mask_decoder.transformer.`):
//! tokens attend to the image and the image attends back to the tokens.
//! Queries Q [N, T, C] (T = 3 tokens), keys K [N, HW, C] (HW = 256), C = 256.

use crate::error::Result;
use crate::io::Weights;
use crate::nn::{LayerNorm, Linear};
use crate::ops::activation::{Act, add, add_broadcast};
use crate::ops::attention::attention;
use crate::ops::layout::repeat_first;
use crate::tensor::Tensor;

const HEADS: usize = 8;
const LN_EPS: f32 = 1e-5;

/// Attention with q/k/v projections to an inner width I and back.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
}

impl Attention {
    pub fn load(w: &Weights, pre: &str) -> Result<Self> {
        let l = |n: &str| Linear::load(w, &format!("{pre}.{n}"));
        Ok(Attention {
            q_proj: l("q_proj")?,
            k_proj: l("k_proj")?,
            v_proj: l("v_proj")?,
            out_proj: l("out_proj")?,
        })
    }

    /// q [N, Lq, C], k / v [N, Lk, C] -> [N, Lq, C]; with `residual`, adds it in
    /// out_proj's epilogue.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = self.q_proj.forward(q)?;
        let k = self.k_proj.forward(k)?;
        let v = self.v_proj.forward(v)?;
        let o = attention(&q, &k, &v, HEADS)?;
        match residual {
            Some(r) => self.out_proj.forward_residual(&o, r),
            None => self.out_proj.forward(&o),
        }
    }
}

pub struct TwoWayBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_t2i: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_i2t: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayBlock {
    pub fn load(w: &Weights, pre: &str, skip_first_layer_pe: bool) -> Result<Self> {
        let ln = |n: &str| LayerNorm::load(w, &format!("{pre}.{n}"), LN_EPS);
        Ok(TwoWayBlock {
            self_attn: Attention::load(w, &format!("{pre}.self_attn"))?,
            norm1: ln("norm1")?,
            cross_t2i: Attention::load(w, &format!("{pre}.cross_attn_token_to_image"))?,
            norm2: ln("norm2")?,
            lin1: Linear::load(w, &format!("{pre}.mlp.lin1"))?,
            lin2: Linear::load(w, &format!("{pre}.mlp.lin2"))?,
            norm3: ln("norm3")?,
            norm4: ln("norm4")?,
            cross_i2t: Attention::load(w, &format!("{pre}.cross_attn_image_to_token"))?,
            skip_first_layer_pe,
        })
    }

    /// Returns the new (queries, keys). `keys` may be [1, HW, C], shared by every
    /// box (the first layer: the image side is the same for all boxes), then its
    /// projections are computed once; `key_pe` is [1, HW, C].
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let q = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries, None)?
        } else {
            let qp = add(queries, query_pe)?;
            self.self_attn.forward(&qp, &qp, queries, Some(queries))?
        };
        let q = self.norm1.forward(&q)?;
        let qp = add(&q, query_pe)?;
        let kp = add_broadcast(keys, key_pe)?;
        let q = self
            .norm2
            .forward(&self.cross_t2i.forward(&qp, &kp, keys, Some(&q))?)?;
        let m = self.lin1.forward_act(&q, Act::Relu)?;
        let q = self.norm3.forward(&self.lin2.forward_residual(&m, &q)?)?;
        let qp = add(&q, query_pe)?;
        let n = q.dims()[0];
        let keys_n = if keys.dims()[0] == n {
            keys.clone()
        } else {
            repeat_first(keys, n)?
        };
        let k = self
            .norm4
            .forward(&self.cross_i2t.forward(&kp, &qp, &q, Some(&keys_n))?)?;
        Ok((q, k))
    }
}

pub struct TwoWayTransformer {
    layers: Vec<TwoWayBlock>,
    final_attn: Attention,
    norm_final: LayerNorm,
}

impl TwoWayTransformer {
    pub fn load(w: &Weights, pre: &str) -> Result<Self> {
        Ok(TwoWayTransformer {
            layers: vec![
                TwoWayBlock::load(w, &format!("{pre}.layers.0"), true)?,
                TwoWayBlock::load(w, &format!("{pre}.layers.1"), false)?,
            ],
            final_attn: Attention::load(w, &format!("{pre}.final_attn_token_to_image"))?,
            norm_final: LayerNorm::load(w, &format!("{pre}.norm_final_attn"), LN_EPS)?,
        })
    }

    /// src / pos [N or 1, HW, C] (1: shared by every box), tokens [N, T, C] ->
    /// (queries [N, T, C], keys [N, HW, C]).
    pub fn forward(&self, src: &Tensor, pos: &Tensor, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mut q, mut k) = (tokens.clone(), src.clone());
        for l in &self.layers {
            (q, k) = l.forward(&q, &k, tokens, pos)?;
        }
        let qp = add(&q, tokens)?;
        let kp = add_broadcast(&k, pos)?;
        let q = self
            .norm_final
            .forward(&self.final_attn.forward(&qp, &kp, &k, Some(&q))?)?;
        Ok((q, k))
    }
}

crate::params!(Attention {
    q_proj,
    k_proj,
    v_proj,
    out_proj
});
crate::params!(TwoWayBlock {
    self_attn,
    norm1,
    cross_t2i,
    norm2,
    lin1,
    lin2,
    norm3,
    norm4,
    cross_i2t
});
crate::params!(TwoWayTransformer {
    layers,
    final_attn,
    norm_final
});
