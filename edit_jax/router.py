"""The E-DiT router (SPEC section 1): one small network per block that reads the block's input
tokens and temb and says whether the block should run (p) and at which MLP width (q)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from edit_jax.config import RuntimeConfig
from edit_jax.layers import Linear, Modulation, layer_norm, modulate


def _kaiming_uniform_sqrt5():
    # PyTorch Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class Router(nn.Module):
    """One block's router (SPEC section 1), params in the "routers" collection.

    shift, scale = Linear_D->3D(SiLU(temb)) (the unused third chunk is not computed);
    h = ReLU(proj(LN(x)*(1+scale)+shift));
    gate logit = mean over valid tokens of gate_head(h); width logits = mean of width_head(h).
    groups: sequence of (tokens [B, L_i, D], valid [B, L_i] or None); the mean runs over all
    valid tokens of all groups. Returns (gate_logit [B], width_logits [B, K]) in float32.
    Init ("full-capacity start"): p = 0.7 and the full-width bucket ahead by 2 logits.
    """

    hidden: int
    num_buckets: int
    runtime: RuntimeConfig

    @nn.compact
    def __call__(self, groups, temb):
        rt = self.runtime
        small = nn.initializers.normal(1e-3)
        trunk = dict(collection="routers", kernel_init=_kaiming_uniform_sqrt5())
        shift, scale = Modulation(3, rt, name="img_mod", **trunk)(temb, used=2)  # the third chunk is unused
        proj = Linear(self.hidden, ("embed", "router"), rt, name="proj", **trunk)
        gate_head = Linear(1, ("router", "gate"), rt, name="gate_head", collection="routers", kernel_init=small,
                           bias_init=nn.initializers.constant(_logit(0.7)))
        full_width = np.zeros(self.num_buckets, np.float32)
        full_width[-1] = 2.0
        width_head = Linear(self.num_buckets, ("router", "bucket"), rt, name="width_head", collection="routers",
                            kernel_init=small, bias_init=lambda key, shape, dtype: jnp.asarray(full_width, dtype))
        total, count = 0.0, 0.0
        for tokens, valid in groups:
            h = nn.relu(proj(modulate(layer_norm(tokens), shift, scale)))
            weight = jnp.ones(tokens.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
            total = total + jnp.einsum("bl,blh->bh", weight, h.astype(jnp.float32))
            count = count + weight.sum(axis=1)
        pooled = total / jnp.maximum(count, 1.0)[:, None]  # the heads are linear: head(mean h) = mean head(h)
        return gate_head(pooled)[:, 0].astype(jnp.float32), width_head(pooled).astype(jnp.float32)
