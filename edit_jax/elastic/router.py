"""The E-DiT router (SPEC section 1): one small network per block that reads the block's input
tokens and temb and says whether the block should run (p) and at which MLP width (q)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.config import RuntimeConfig
from edit_jax.layers import Linear, dtype_of, stacked_modulation


def _kaiming_uniform_sqrt5():
    # PyTorch Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class _Weights(Linear):
    """A Linear's params, declared as a Linear declares them; returns (kernel, bias)."""

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self._weight("kernel", self.kernel_init, self.axes, (in_features, self.features))
        return kernel, self._weight("bias", self.bias_init, self.axes[1:], (self.features,))


class _ModulationWeights(nn.Module):
    """Modulation(3)'s params ("linear" [D, 3D] and its bias), declared, not applied."""

    runtime: RuntimeConfig
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, dim: int):
        return _Weights(3 * dim, ("embed", "modulation"), self.runtime, collection="routers",
                        kernel_init=self.kernel_init, name="linear")(dim)


def router_modulation(weights: dict, temb: jax.Array, dtype) -> jax.Array:
    """The routers' own modulation for a stack of L routers at once: shift and scale, the first
    two chunks of img_mod(SiLU(temb)), as [L, B, 2D] (dtype).

    weights: the routers' params, leaves stacked on a leading layer axis [L, ...]; temb [B, D].
    It reads only temb, so a sampler computes it for all its steps at once (`router_modulations`
    in `edit_jax.models`): the [D, 3D] kernels, most of a router's weight, are then read once
    per run instead of once per step."""
    return stacked_modulation(weights["img_mod"], temb, dtype)[..., : 2 * temb.shape[-1]]  # the third chunk is unused


def router_prelude(weights: dict, modulation: jax.Array, dtype) -> dict:
    """The rest of the routers' temb-only half, for a stack of L routers (one step).

    weights: the routers' params stacked [L, ...]; modulation: `router_modulation` [L, B, 2D].
    With shift, scale its two halves and K the proj kernel, returns
    {"scaled": K' = (1 + scale) * K [L, B, D, H] (dtype), "colsum": sum_d K' [L, B, 1, H],
    "offset": shift @ K + bias [L, B, 1, H]} (float32)."""
    f32 = jnp.float32
    shift, scale = jnp.split(modulation, 2, axis=-1)
    kernel = weights["proj"]["kernel"].astype(dtype)  # [L, D, H]
    scaled = ((1 + scale.astype(f32))[..., None] * kernel.astype(f32)[:, None]).astype(dtype)
    offset = jnp.matmul(shift, kernel, preferred_element_type=f32) + weights["proj"]["bias"].astype(f32)[:, None, :]
    # colsum of the rounded K', so that the token mean cancels exactly in r * (x @ K' - m * colsum)
    return {"scaled": scaled, "colsum": scaled.astype(f32).sum(axis=-2, keepdims=True), "offset": offset[:, :, None, :]}


class Router(nn.Module):
    """One block's router (SPEC section 1), params in the "routers" collection.

    shift, scale = the first two chunks of Linear_D->3D(SiLU(temb)) (the third is unused);
    h = ReLU(proj(LN(x)*(1+scale)+shift));
    gate logit = mean over valid tokens of gate_head(h); width logits = mean of width_head(h).
    groups: sequence of (tokens [B, L_i, D], valid [B, L_i] or None); the mean runs over all
    valid tokens of all groups. Returns (gate_logit [B], width_logits [B, K]) in float32.
    Init ("full-capacity start"): p = 0.7 and the full-width bucket ahead by 2 logits.

    Computed folded, so that the tokens are read twice (their moments, one matmul) and no
    normalised copy is written: with m, r a token's mean and 1/std and K' = (1+scale) * K,
    proj(LN(x)*(1+scale)+shift) = r * (x @ K' - m * sum_d K') + shift @ K + bias. What reads only
    temb (`router_modulation`, then `router_prelude`) the models compute ahead of the block scan
    for all layers at once and pass in as `prelude`; without it the router computes its own.
    """

    hidden: int
    num_buckets: int
    runtime: RuntimeConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, groups, temb, prelude: dict | None = None):
        rt = self.runtime
        small = nn.initializers.normal(1e-3)
        trunk_init = _kaiming_uniform_sqrt5()
        mod_kernel, mod_bias = _ModulationWeights(rt, trunk_init, name="img_mod")(temb.shape[-1])
        kernel, bias = _Weights(self.hidden, ("embed", "router"), rt, collection="routers", kernel_init=trunk_init,
                                name="proj")(temb.shape[-1])
        gate_head = Linear(1, ("router", "gate"), rt, name="gate_head", collection="routers", kernel_init=small,
                           bias_init=nn.initializers.constant(_logit(0.7)))
        full_width = np.zeros(self.num_buckets, np.float32)
        full_width[-1] = 2.0
        width_head = Linear(self.num_buckets, ("router", "bucket"), rt, name="width_head", collection="routers",
                            kernel_init=small, bias_init=lambda key, shape, dtype: jnp.asarray(full_width, dtype))

        dtype, f32 = dtype_of(rt.dtype), jnp.float32
        if prelude is None:
            own = {"img_mod": {"linear": {"kernel": mod_kernel, "bias": mod_bias}}, "proj": {"kernel": kernel, "bias": bias}}
            own = jax.tree.map(lambda x: x[None], own)
            prelude = jax.tree.map(lambda x: x[0], router_prelude(own, router_modulation(own, temb, dtype), dtype))
        pooled = pooled_hidden(groups, prelude, dtype, self.eps)  # the heads are linear: head(mean h) = mean head(h)
        return gate_head(pooled)[:, 0].astype(f32), width_head(pooled).astype(f32)


def router_hidden(tokens, prelude: dict, dtype, eps: float = 1e-6) -> jax.Array:
    """h = ReLU(proj(LN(x)*(1+scale)+shift)) of one group of tokens [B, L, D], computed folded (see
    `Router`) from one layer's `router_prelude` (scaled [B, D, H], colsum and offset [B, 1, H]).
    Returns [B, L, H] float32.

    Args:
      tokens: [B, L, D]. prelude: one layer's `router_prelude`. dtype: the compute dtype.
      eps: the LayerNorm's epsilon.
    """
    f32 = jnp.float32
    x32 = tokens.astype(f32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    y = jnp.einsum("bld,bdh->blh", tokens.astype(dtype), prelude["scaled"], preferred_element_type=f32)
    return nn.relu(jax.lax.rsqrt(var + eps) * (y - mean * prelude["colsum"]) + prelude["offset"])


def pooled_hidden(groups, prelude: dict, dtype, eps: float = 1e-6) -> jax.Array:
    """The router's token half: the mean of `router_hidden` over all valid tokens of all groups,
    (tokens [B, L_i, D], valid [B, L_i] or None) pairs. Returns [B, H] float32.

    Args:
      groups: (tokens, valid) pairs. prelude: one layer's `router_prelude`. dtype: the compute
        dtype. eps: the LayerNorm's epsilon.
    """
    total, count = 0.0, 0.0
    for tokens, valid in groups:
        weight = jnp.ones(tokens.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
        total = total + jnp.einsum("bl,blh->bh", weight, router_hidden(tokens, prelude, dtype, eps))
        count = count + weight.sum(axis=1)
    return total / jnp.maximum(count, 1.0)[:, None]
