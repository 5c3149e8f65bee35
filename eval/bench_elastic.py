"""Times the dense forward against E-DiT forwards in one process: a forced pattern (half the
blocks skipped, half of the rest at width 1/2), the same skips alone beside a dense model built
without the skipped blocks (the mechanism's own overhead), and fresh routers in infer mode (every
block runs at full width: the routers' own cost), also with the routers' temb-only modulation
computed ahead, as `sample` does for all its steps at once (so what a sampling step pays). Prints
measured speedups beside FLOP ratios;
speedups and overheads are medians of per-round ratios (`eval.timing.paired_ratio`).

    python -m edit_jax.eval.bench_elastic --preset flux-small --height 16 --width 16 --txt 32
    python -m edit_jax.eval.bench_elastic --preset flux-dev --height 64 --width 64 --txt 512 \\
        --dtype bfloat16 --attention cudnn                       # GPU, full size
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import edit_jax
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.flops import dense_flops
from edit_jax.models.registry import example_inputs, init_variables, router_modulations, split_static
from edit_jax.eval.bench_forward import config_from, model_arguments
from edit_jax.eval.timing import paired_ratio, time_runs


def forced_pattern(num_blocks: int) -> dict:
    """Odd blocks skipped; of the even ones, every other at width 1/2 (bucket 1), the rest full."""
    run = np.arange(num_blocks) % 2 == 0
    bucket = np.where(np.arange(num_blocks) % 4 == 0, 1, 3)
    return {"run": jnp.asarray(run), "bucket": jnp.asarray(bucket, jnp.int32)}


def all_open(num_blocks: int) -> dict:
    """Forced decisions that run every block at full width."""
    return {"run": jnp.ones((num_blocks,), bool), "bucket": jnp.full((num_blocks,), 3, jnp.int32)}


def forwards(model, static: dict) -> dict:
    """The jitted forwards the eval scripts time: "dense" (v, x), "forced" (v, x, decisions),
    "infer" (v, x) and "infer_ahead" (v, x, router_modulations). Decisions are arguments, as the
    routers' are: constants would let XLA fold the branches away."""
    return {
        "dense": jax.jit(lambda v, x: model.apply({"params": v["params"]}, **x, **static)),
        "forced": jax.jit(lambda v, x, d: model.apply(v, **x, **static, elastic=ElasticConfig(mode="forced"), decisions=d)),
        "infer": jax.jit(lambda v, x: model.apply(v, **x, **static, elastic=ElasticConfig(mode="infer"))),
        "infer_ahead": jax.jit(lambda v, x, m: model.apply(v, **x, **static, elastic=ElasticConfig(mode="infer"),
                                                           router_modulations=m)),
    }


def modulations_ahead(config, variables: dict, arrays: dict, static: dict) -> list:
    """The routers' modulation for these inputs, computed once outside any timed call.

    Args:
      config: the model config. variables: {"params", "routers"}. arrays, static: the
        forward's inputs (`split_static`).
    """
    cond = {k: v for k, v in {**arrays, **static}.items() if k != "timestep"}
    return jax.block_until_ready(router_modulations(config, variables["params"], variables["routers"],
                                                    arrays["timestep"], cond))


def without_skipped_blocks(config, params: dict, run: np.ndarray):
    """A dense config and params holding only the blocks that `run` keeps (the ideal a skip pattern
    should match), or None when that would leave a block stack empty."""
    stacks = [("transformer_blocks", "num_layers", config.num_layers)]
    if hasattr(config, "num_single_layers"):
        stacks.append(("single_transformer_blocks", "num_single_layers", config.num_single_layers))
    params, changes, start = dict(params), {}, 0
    for name, field, count in stacks:
        keep = np.nonzero(run[start : start + count])[0]
        if len(keep) == 0:
            return None
        params[name] = jax.tree.map(lambda x, keep=keep: x[keep], params[name])
        changes[field] = len(keep)
        start += count
    return config.replace(**changes), params


def build(args):
    """(config, model, variables {"params", "routers"}, array inputs, static inputs) of the flags."""
    config = config_from(args)
    t0 = time.perf_counter()
    variables = jax.block_until_ready(init_variables(config))
    print(f"variables initialised in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    arrays, static = split_static(example_inputs(config, args.batch, args.height, args.width, args.txt))
    return config, edit_jax.build_model(config), variables, arrays, static


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--no-ideal", action="store_true",
                   help="leave out the dense model built without the skipped blocks (saves its copy of half the weights)")
    p.add_argument("--forced-only", action="store_true",
                   help="time dense and the forced pattern alone (a full-size model on a CPU: each forward takes minutes)")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args(argv)

    config, model, variables, arrays, static = build(args)
    num_blocks = config.num_blocks
    pattern = forced_pattern(num_blocks)

    skip_only = {**all_open(num_blocks), "run": pattern["run"]}
    kept = None if args.no_ideal else without_skipped_blocks(config, variables["params"], np.asarray(pattern["run"]))

    jitted = forwards(model, static)
    ahead = modulations_ahead(config, variables, arrays, static)
    forced_fn = jitted["forced"]
    fns = {
        "dense": jitted["dense"],
        "forced_pattern": lambda v, x: forced_fn(v, x, pattern),
        "skips_only": lambda v, x: forced_fn(v, x, skip_only),
        "forced_all_open": lambda v, x: forced_fn(v, x, all_open(num_blocks)),
        "routers_all_open": jitted["infer"],
        "routers_all_open_modulation_ahead": lambda v, x: jitted["infer_ahead"](v, x, ahead),
    }
    if args.forced_only:
        fns = {k: fns[k] for k in ("dense", "forced_pattern")}
        kept = None
    if kept is not None:
        kept_model, kept_params = edit_jax.build_model(kept[0]), kept[1]
        kept_fn = jax.jit(lambda p, x: kept_model.apply({"params": p}, **x, **static))  # params as an argument, not a constant
        fns["dense_without_skipped_blocks"] = lambda v, x: kept_fn(kept_params, x)
    outs, first_call_s = {}, {}
    for k, f in fns.items():  # compiles
        t0 = time.perf_counter()
        outs[k] = jax.block_until_ready(f(variables, arrays))
        first_call_s[k] = round(time.perf_counter() - t0, 2)
        print(f"{k}: first call (compile) {first_call_s[k]} s", file=sys.stderr, flush=True)
    times = time_runs({k: (lambda f=f: jax.block_until_ready(f(variables, arrays))) for k, f in fns.items()}, args.runs)
    medians = {k: float(np.median(v)) for k, v in times.items()}

    n, t = args.height * args.width, args.txt
    flops_dense = float(dense_flops(config, n, t))
    flops_forced = float(np.asarray(outs["forced_pattern"][1]["flops"]["total"])) / args.batch
    routed = "routers_all_open" in outs
    flops_routed = float(np.asarray(outs["routers_all_open"][1]["flops"]["total"])) / args.batch if routed else None
    result = {
        **environment(),
        "preset": args.preset,
        "overrides": args.set,
        "tokens": {"image": n, "text": t, "batch": args.batch},
        "dtype": args.dtype,
        "attention": args.attention,
        "runs": args.runs,
        "pattern": {"blocks": num_blocks, "skipped": int((~np.asarray(pattern["run"])).sum()),
                    "half_width": int((np.asarray(pattern["run"]) & (np.asarray(pattern["bucket"]) == 1)).sum())},
        "median_ms": {k: round(v, 3) for k, v in medians.items()},
        "first_call_s": first_call_s,
        "gflops_per_sample": {"dense": flops_dense / 1e9, "forced_pattern": flops_forced / 1e9,
                              "routers_all_open": flops_routed / 1e9 if routed else None},
        "forced": {
            "flop_reduction": round(flops_dense / flops_forced, 3),
            "speedup": round(paired_ratio(times, "dense", "forced_pattern"), 3),
            "speedup_of_medians": round(medians["dense"] / medians["forced_pattern"], 3),
        },
        "skip_mechanism_overhead": (round(paired_ratio(times, "skips_only", "dense_without_skipped_blocks") - 1, 4)
                                    if kept is not None else None),
        "routers_overhead": None if not routed else {
            "flops": round(flops_routed / flops_dense - 1, 4),
            "time": round(paired_ratio(times, "routers_all_open", "dense") - 1, 4),
            "time_of_medians": round(medians["routers_all_open"] / medians["dense"] - 1, 4),
            # of which: the branching mechanism with every block forced open, and the routers' own work
            "time_mechanism": round(paired_ratio(times, "forced_all_open", "dense") - 1, 4),
            "time_router_work": round(paired_ratio(times, "routers_all_open", "forced_all_open") - 1, 4),
            # what a sampling step pays: the modulation is computed for all steps ahead (`sample`)
            "time_modulation_ahead": round(paired_ratio(times, "routers_all_open_modulation_ahead", "dense") - 1, 4),
        },
    }
    result["forced"]["speedup_over_flop_reduction"] = round(result["forced"]["speedup"] / result["forced"]["flop_reduction"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
