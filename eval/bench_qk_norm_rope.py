"""The queries' (and keys') RMSNorm and RoPE, as the models run them and as one pass, timed side
by side in one process: a candidate for the ~4.6 ms of a FLUX.1-dev step on an H200 that these
two memory-bound passes took (profile of 2026-11-30, BENCHMARKS.md).

    python -m edit_jax.eval.bench_qk_norm_rope                                   # FLUX.1-dev's single blocks
    python -m edit_jax.eval.bench_qk_norm_rope --tokens 64 --heads 2 --layers 3 --dtype float32   # a smoke run

"two_passes": `layers.RMSNorm` (its output rounded to the compute dtype), then `layers.apply_rope`,
as the blocks do. "one_pass": r * rope(x * w) in float32, rounded once, r = 1 / rms(x) per head,
the same function since RoPE is linear and r a scalar per head. Each variant maps over --layers
inputs in one jitted call (a kernel alone is too short to time by the wall clock). Prints JSON:
median ms per layer, the ratio one_pass / two_passes, fusions in each compiled program, and the
two outputs' relative difference.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax import layers
from edit_jax.config import RuntimeConfig
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import compare_forms, form_arguments


def two_passes(x, scale, cos, sin, eps: float = 1e-6):
    """As the blocks compute it: x [L, H, K] -> [L, H, K] in x's dtype.

    Args:
      x: [L, H, K]. scale: [K] the RMSNorm's. cos, sin: [L, K / 2] RoPE tables. eps: the norm's.
    """
    normed = layers.RMSNorm("head_dim", RuntimeConfig(), eps).apply({"params": {"scale": scale}}, x)
    return layers.apply_rope(normed[None], cos, sin)[0]


def one_pass(x, scale, cos, sin, eps: float = 1e-6):
    """The same values, one rounding: rope(x * w) * rsqrt(mean(x^2) + eps) in float32.

    Args:
      as `two_passes`'s.
    """
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (layers.apply_rope((x32 * scale.astype(jnp.float32))[None], cos, sin)[0] * r).astype(x.dtype)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    form_arguments(p)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((args.layers, args.tokens, args.heads, args.head_dim)), args.dtype)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(args.head_dim), args.dtype)
    positions = jnp.stack([jnp.zeros(args.tokens), jnp.arange(args.tokens) // 64, jnp.arange(args.tokens) % 64], -1)
    third = args.head_dim // 8 * 2
    cos, sin = layers.rope_frequencies(positions, (args.head_dim - 2 * third, third, third))

    forms = {"two_passes": lambda x: two_passes(x, scale, cos, sin), "one_pass": lambda x: one_pass(x, scale, cos, sin)}
    result = {**environment(), "tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim,
              "layers": args.layers, "dtype": args.dtype, "runs": args.runs, **compare_forms(forms, xs, args.runs)}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
