"""The E-DiT router (SPEC section 1): one small network per block that reads the block's input
tokens and temb and says whether the block should run (p) and at which MLP width (q)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.config import RuntimeConfig
from edit_jax.layers import Linear, Modulation, dtype_of


def _kaiming_uniform_sqrt5():
    # PyTorch Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class _ProjWeights(Linear):
    """The router's proj params, declared as a Linear declares them; returns (kernel, bias)."""

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self._weight("kernel", self.kernel_init, self.axes, (in_features, self.features))
        return kernel, self._weight("bias", self.bias_init, self.axes[1:], (self.features,))


class Router(nn.Module):
    """One block's router (SPEC section 1), params in the "routers" collection.

    shift, scale = the first two chunks of Linear_D->3D(SiLU(temb)) (the third is unused), in
    the model computed for all layers ahead of the block scan (`router_modulations`);
    h = ReLU(proj(LN(x)*(1+scale)+shift));
    gate logit = mean over valid tokens of gate_head(h); width logits = mean of width_head(h).
    groups: sequence of (tokens [B, L_i, D], valid [B, L_i] or None); the mean runs over all
    valid tokens of all groups. Returns (gate_logit [B], width_logits [B, K]) in float32.
    Init ("full-capacity start"): p = 0.7 and the full-width bucket ahead by 2 logits.

    Computed folded, so that the tokens are read twice (their moments, one matmul) and no
    normalised copy is written: with m, r a token's mean and 1/std and K' = (1+scale) * K,
    proj(LN(x)*(1+scale)+shift) = r * (x @ K' - m * sum_d K') + shift @ K + bias.
    """

    hidden: int
    num_buckets: int
    runtime: RuntimeConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, groups, temb, modulation=None):
        """modulation: (shift, scale) [B, D] when computed ahead for all layers
        (`edit_jax.elastic.router_modulations`); else computed here from temb [B, D]."""
        rt = self.runtime
        small = nn.initializers.normal(1e-3)
        trunk = dict(collection="routers", kernel_init=_kaiming_uniform_sqrt5())
        if modulation is None:
            shift, scale = Modulation(3, rt, name="img_mod", **trunk)(temb, used=2)  # the third chunk is unused
        else:
            shift, scale = modulation
        kernel, bias = _ProjWeights(self.hidden, ("embed", "router"), rt, name="proj", **trunk)(temb.shape[-1])
        gate_head = Linear(1, ("router", "gate"), rt, name="gate_head", collection="routers", kernel_init=small,
                           bias_init=nn.initializers.constant(_logit(0.7)))
        full_width = np.zeros(self.num_buckets, np.float32)
        full_width[-1] = 2.0
        width_head = Linear(self.num_buckets, ("router", "bucket"), rt, name="width_head", collection="routers",
                            kernel_init=small, bias_init=lambda key, shape, dtype: jnp.asarray(full_width, dtype))

        dtype, f32 = dtype_of(rt.dtype), jnp.float32
        kernel = kernel.astype(dtype)
        scaled = ((1 + scale.astype(f32))[:, :, None] * kernel.astype(f32)).astype(dtype)  # K' [B, D, H]
        colsum = scaled.astype(f32).sum(axis=1)[:, None, :]  # of the rounded K', so the mean cancels exactly
        offset = (jnp.dot(shift.astype(dtype), kernel, preferred_element_type=f32) + bias.astype(f32))[:, None, :]
        total, count = 0.0, 0.0
        for tokens, valid in groups:
            x32 = tokens.astype(f32)
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
            y = jnp.einsum("bld,bdh->blh", tokens.astype(dtype), scaled, preferred_element_type=f32)
            h = nn.relu(jax.lax.rsqrt(var + self.eps) * (y - mean * colsum) + offset)
            weight = jnp.ones(tokens.shape[:2], f32) if valid is None else valid.astype(f32)
            total = total + jnp.einsum("bl,blh->bh", weight, h)
            count = count + weight.sum(axis=1)
        pooled = total / jnp.maximum(count, 1.0)[:, None]  # the heads are linear: head(mean h) = mean head(h)
        return gate_head(pooled)[:, 0].astype(f32), width_head(pooled).astype(f32)
