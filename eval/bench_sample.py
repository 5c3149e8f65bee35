"""Times whole sampling runs in one process: dense, E-DiT with a forced pattern, E-DiT with the
block cache on scripted borderline router probabilities, fresh routers all open (infer mode:
every block runs at full width, so its time over dense is what the routers cost a sampling step),
and diffusers' per-step caches on the dense model: the first-block cache computing every step (its
time over dense is what its probe and decision cost), the first-block cache reusing every step
after the first (what a reused step costs), MagCache on flat ratios (after the retained steps,
three of every four skipped), TaylorSeer (first order, computing every 4th step after 3; and
computing every step, whose time over dense is what its Taylor factors cost), and learned reuse on a forced pattern (odd blocks closed: they reuse
their residual, computing again after 4 reuses). Reports per-step time, each method's speedup beside its FLOP
reduction, the cache hit rate and the memory the cache holds. The variants run in
alternating rounds (`eval.timing`); speedups are medians of per-round ratios.

    python -m edit_jax.eval.bench_sample --preset flux-small --steps 28 --height 256 --width 256
    python -m edit_jax.eval.bench_sample --preset flux-dev --txt 512 --height 1024 --width 1024 \\
        --dtype bfloat16 --attention cudnn                       # GPU, full size
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import edit_jax
from edit_jax.eval.report import emit, environment, run_script
from edit_jax.eval.timing import paired_ratio, time_runs
from edit_jax.config import ATTENTION_IMPLEMENTATIONS
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.step_cache import FirstBlockCache, MagCache, TaylorSeer
from edit_jax.elastic.flops import dense_flops
from edit_jax.sampling.latents import initial_noise, packed_grid
from edit_jax.models.registry import family_of, init_variables
from edit_jax.sampling.sampler import SamplerConfig, init_state, make_conditions, sample
from edit_jax.eval.bench_elastic import forced_pattern
from edit_jax.eval.bench_forward import preset_with_overrides


def random_conditions(config, batch: int, num_txt: int, height: int, width: int) -> dict:
    """The sampler's cond from random prompt embeddings.

    Args:
      config: the model config. batch: B. num_txt: T. height, width: the image's pixels.
    """
    rng = np.random.default_rng(0)
    extras = family_of(config).prompt_extras(config, batch, num_txt)
    pooled = rng.standard_normal(extras["pooled_projections"][0]) if "pooled_projections" in extras else None
    return make_conditions(config, rng.standard_normal((batch, num_txt, config.joint_attention_dim)), height, width, pooled)


def scripted_borderline(num_steps: int, num_blocks: int, tau: float, margin: float):
    """p per step: every block borderline (tau + margin / 2) except the first and last two, which
    are clearly on, as released routers behave. Returns decisions(step).

    Args:
      num_steps: the run's steps. num_blocks: L. tau: the gate threshold. margin: the cache's
        delta margin.
    """
    p = np.full((num_steps, num_blocks), tau + margin / 2, np.float32)
    p[:, :2] = p[:, -2:] = 0.95
    p = jnp.asarray(p)
    return lambda step: {"p": p[jnp.minimum(step, num_steps - 1)], "bucket": jnp.full((num_blocks,), 3, jnp.int32)}


def all_full_or_closed(num_blocks: int) -> dict:
    """Forced decisions for learned reuse: odd blocks closed (they reuse, computing again after
    `max_reuse` reuses), even ones computed at full width."""
    return {"run": jnp.asarray(np.arange(num_blocks) % 2 == 0), "bucket": jnp.full((num_blocks,), 3, jnp.int32)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="flux-small")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--height", type=int, default=256, help="pixels")
    p.add_argument("--width", type=int, default=256, help="pixels")
    p.add_argument("--txt", type=int, default=32)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=3, help="rounds, each running every variant once")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", choices=ATTENTION_IMPLEMENTATIONS)
    p.add_argument("--out")
    args = p.parse_args(argv)

    config = preset_with_overrides(args.preset, args.set).with_runtime(
        param_dtype=args.dtype, dtype=args.dtype, attention=args.attention)
    model = edit_jax.build_model(config)
    variables = init_variables(config)
    cond = random_conditions(config, 1, args.txt, args.height, args.width)
    noise = initial_noise(jax.random.key(0), 1, config.in_channels // 4, args.height, args.width)
    blocks = config.num_blocks
    sampler = SamplerConfig(num_steps=args.steps)
    cache_cfg = ElasticConfig(mode="forced", cache=True, cache_start=args.steps // 2, delta_margin=0.015, max_reuse=10)
    variants = {
        "dense": dict(),
        "forced_pattern": dict(routers=variables["routers"], elastic=ElasticConfig(mode="forced"), decisions=forced_pattern(blocks)),
        "cache_borderline": dict(routers=variables["routers"], elastic=cache_cfg,
                                 decisions=scripted_borderline(args.steps, blocks, 0.5, 0.015)),
        "routers_all_open": dict(routers=variables["routers"], elastic=ElasticConfig(mode="infer")),
        "first_block_computing": dict(elastic=ElasticConfig(mode="dense", step_cache=FirstBlockCache(0.0))),
        "first_block_reusing": dict(elastic=ElasticConfig(mode="dense", step_cache=FirstBlockCache(float("inf")))),
        "mag_cache": dict(elastic=ElasticConfig(mode="dense", step_cache=MagCache(
            (1.0,) * args.steps, num_inference_steps=args.steps, threshold=0.06, max_skip_steps=3))),
        "taylor_seer": dict(elastic=ElasticConfig(mode="dense", step_cache=TaylorSeer(cache_interval=4))),
        "taylor_seer_computing": dict(elastic=ElasticConfig(mode="dense", step_cache=TaylorSeer(cache_interval=1))),
        "learned_reuse_pattern": dict(elastic=ElasticConfig(mode="forced", block_cache=LearnedReuse(max_reuse=4)),
                                      decisions=all_full_or_closed(blocks)),
    }
    cutting = ("forced_pattern", "cache_borderline", "first_block_reusing", "mag_cache", "taylor_seer",
               "learned_reuse_pattern")
    runs, records = {}, {}
    for name, kwargs in variants.items():
        runs[name] = lambda kw=kwargs: jax.block_until_ready(sample(model, variables["params"], noise, cond, sampler, **kw))
        _, records[name] = runs[name]()  # compile + warm
    rounds = time_runs(runs, args.runs)
    times = {k: float(np.median(v)) / 1000 for k, v in rounds.items()}
    rows, cols = packed_grid(args.height, args.width)
    state = init_state(config, cache_cfg, 1, rows * cols, args.txt)
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state["cache"]))
    hits = np.asarray(records["cache_borderline"]["cache_hit"])
    result = {
        **environment(),
        "preset": args.preset, "overrides": args.set, "dtype": args.dtype,
        "tokens": {"image": rows * cols, "text": args.txt}, "steps": args.steps,
        "ms_per_step": {k: round(1000 * v / args.steps, 3) for k, v in times.items()},
        "speedup_vs_dense": {k: round(paired_ratio(rounds, "dense", k), 3) for k in cutting},
        "routers_time_over_dense": round(paired_ratio(rounds, "routers_all_open", "dense") - 1, 4),
        "routers_flops_over_dense": round(float(np.asarray(records["routers_all_open"]["flops_total"]).sum())
                                          / (dense_flops(config, rows * cols, args.txt) * args.steps) - 1, 4),
        "step_cache_decision_over_dense": round(paired_ratio(rounds, "first_block_computing", "dense") - 1, 4),
        "taylor_factors_over_dense": round(paired_ratio(rounds, "taylor_seer_computing", "dense") - 1, 4),
        "step_reuse_rate": {k: round(1 - float(np.asarray(records[k]["step_computed"]).mean()), 4)
                            for k in ("first_block_reusing", "mag_cache", "taylor_seer")},
        "learned_reuse_hit_rate": round(float(np.asarray(records["learned_reuse_pattern"]["cache_hit"]).mean()), 4),
        "cache_hit_rate": round(float(hits.mean()), 4),
        "cache_hit_rate_after_start": round(float(hits[args.steps // 2 :].mean()), 4),
        "cache_mib": round(cache_bytes / 2**20, 2),
        "flop_reduction_vs_dense": {
            k: round(dense_flops(config, rows * cols, args.txt) * args.steps / float(np.asarray(records[k]["flops_total"]).sum()), 3)
            for k in cutting
        },
    }
    result["speedup_over_flop_reduction"] = {k: round(result["speedup_vs_dense"][k] / result["flop_reduction_vs_dense"][k], 3)
                                             for k in cutting}
    return emit(result, args.out)


if __name__ == "__main__":
    run_script(main)
