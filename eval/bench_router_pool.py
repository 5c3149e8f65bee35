"""The router's token half (`router.pooled_hidden`) as the model runs it and with its token mean
taken as a sum fused into the ReLU's pass, timed side by side in one process: a candidate for
the routers' +2.26% of a FLUX.1-dev sampling step on an H200 (BENCHMARKS.md, 2026-11-30).

    python -m edit_jax.eval.bench_router_pool                        # FLUX.1-dev: a single block's router
    python -m edit_jax.eval.bench_router_pool --tokens 288 --dim 512 --hidden 128 --layers 12   # the D 512 CPU config

"matmul_mean": as the model computes it (the mean over tokens as a [B, L] x [B, L, H] product with
the valid-token weights); "fused_sum": the same mean as a sum over tokens, which XLA can fuse with
the ReLU so that h [B, L, H] is never written (on the dev CPU it ran slower inside the model). Each
variant maps over --layers inputs in one jitted call. Prints JSON: median ms per layer, the ratio
fused_sum / matmul_mean, fusions in each compiled program, and the outputs' relative difference.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.router import pooled_hidden, router_hidden
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import compare_forms, form_arguments


def fused_sum(tokens, prelude: dict, dtype) -> jax.Array:
    """`pooled_hidden` for one group of all-valid tokens [B, L, D], its mean taken as a sum."""
    return router_hidden(tokens, prelude, dtype).sum(axis=1) / tokens.shape[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    form_arguments(p)
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((args.layers, 1, args.tokens, args.dim)), args.dtype)
    prelude = {"scaled": jnp.asarray(rng.standard_normal((1, args.dim, args.hidden)) / np.sqrt(args.dim), args.dtype),
               "colsum": jnp.asarray(rng.standard_normal((1, 1, args.hidden)), jnp.float32),
               "offset": jnp.asarray(rng.standard_normal((1, 1, args.hidden)), jnp.float32)}
    forms = {"matmul_mean": lambda x: pooled_hidden([(x, None)], prelude, args.dtype),
             "fused_sum": lambda x: fused_sum(x, prelude, args.dtype)}
    result = {**environment(), "tokens": args.tokens, "dim": args.dim, "hidden": args.hidden, "layers": args.layers,
              "dtype": args.dtype, "runs": args.runs, **compare_forms(forms, xs, args.runs)}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
