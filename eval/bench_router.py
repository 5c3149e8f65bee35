"""Times a step's routers on their own, beside the dense forward they sit in: the half that reads
only temb (`router_prelude` after `router_modulation`, every layer at once; the modulation is a
matrix-vector product per layer at batch 1, bound by reading the modulation weights, which a
sampler computes for all its steps at once), and the whole (that half, then each block's router on
its input tokens in a scan, as the model runs them). Prints their time and FLOPs as shares of the
dense forward; `eval.bench_elastic` measures the same routers inside the model (their share there
includes the branching mechanism).

    python -m edit_jax.eval.bench_router --set num_layers=4 --set num_single_layers=8 --set attention_head_dim=64 \\
        --set num_attention_heads=8 --set axes_dims_rope=[16,24,24]          # the D 512 CPU config
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.flops import dense_flops, router_flops
from edit_jax.layers import dtype_of
from edit_jax.elastic.router import Router, router_modulation, router_prelude
from edit_jax.eval.bench_elastic import build, forwards
from edit_jax.eval.bench_forward import model_arguments
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import paired_ratio, time_runs


def router_step(config):
    """(prelude(routers, temb), routers(routers, tokens, temb)) for every block's router of one
    step, stacked in scan order: routers {stack: {"router": [L_i, ...]}}, tokens [B, L, D] (each
    block's router reads these, all valid), temb [B, D]. Returns p's logits [sum L_i, B]."""
    dtype = dtype_of(config.runtime.dtype)
    router = Router(config.router_hidden, len(config.width_buckets), config.runtime)

    def prelude(routers, temb):
        return [router_prelude(stack["router"], router_modulation(stack["router"], temb, dtype), dtype)
                for stack in routers.values()]

    def routers_of_step(routers, tokens, temb):
        def one(x, layer):
            weights, pre = layer
            gate_logit, _ = router.apply({"routers": weights}, [(x, None)], temb, pre)
            return x, gate_logit

        logits = [jax.lax.scan(one, tokens, (stack["router"], pre))[1]
                  for stack, pre in zip(routers.values(), prelude(routers, temb))]
        return jnp.concatenate(logits, axis=0)

    return prelude, routers_of_step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)

    config, model, variables, arrays, static = build(args)
    dense = forwards(model, static)["dense"]
    n, t = args.height * args.width, args.txt
    tokens = jax.random.normal(jax.random.key(1), (args.batch, n + t, config.inner_dim), dtype_of(args.dtype))
    temb = jax.random.normal(jax.random.key(2), (args.batch, config.inner_dim), dtype_of(args.dtype))
    prelude, routers_of_step = (jax.jit(f) for f in router_step(config))
    routers = variables["routers"]
    fns = {
        "dense": lambda: jax.block_until_ready(dense(variables, arrays)),
        "router_prelude": lambda: jax.block_until_ready(prelude(routers, temb)),
        "routers": lambda: jax.block_until_ready(routers_of_step(routers, tokens, temb)),
    }
    for f in fns.values():  # compiles
        f()
    times = time_runs(fns, args.runs)
    num_blocks = config.num_blocks
    flops = num_blocks * router_flops(config, n, t) / dense_flops(config, n, t)
    return emit({
        **environment(),
        "preset": args.preset,
        "overrides": args.set,
        "tokens": {"image": n, "text": t, "batch": args.batch},
        "dtype": args.dtype,
        "runs": args.runs,
        "median_ms": {k: round(float(np.median(v)), 3) for k, v in times.items()},
        "share_of_dense": {
            "flops": round(float(flops), 4),
            "time": round(paired_ratio(times, "routers", "dense"), 4),
            "time_prelude": round(paired_ratio(times, "router_prelude", "dense"), 4),
        },
    }, args.out)


if __name__ == "__main__":
    run_script(main)
