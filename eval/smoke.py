"""`edit-jax smoke`, the quick check that the stack works: a randomly initialised model (no downloads) runs a jitted forward, is saved
as an edit-jax checkpoint, reloaded, and run again (the two outputs must agree exactly); then it
samples 12 steps dense and with E-DiT (routers scripted to skip and reuse, the block cache on),
and draws the router map.

Writes OUT/checkpoint, OUT/smoke.json and OUT/router_map.png (steps down, blocks across: skipped,
computed at each MLP width, reused from the cache; labelled, with a legend).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

import edit_jax
from edit_jax.checkpoint import save
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.flops import dense_flops
from edit_jax.sampling.latents import packed_grid
from edit_jax.models.registry import example_inputs, init_routers, jit_forward
from edit_jax.sampling.sampler import SamplerConfig, sample
from edit_jax.eval.bench_sample import random_conditions
from edit_jax.eval.pictures import block_groups, plot_router_map


def available_memory_bytes() -> int | None:
    """Memory the OS can still hand out (Linux MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config, preset_name: str, copies: int = 3) -> None:
    """Raises MemoryError (before any allocation) when the smoke run's copies of the float32 params
    (initialised, saved, reloaded) cannot fit in the memory available."""
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(edit_jax.abstract_params(config)))
    need, have = copies * 4 * params, available_memory_bytes()
    if have is not None and need > have:
        raise MemoryError(
            f"the smoke run of {preset_name} ({params / 1e9:.1f} B params) needs about {need / 2**30:.0f} GiB of memory "
            f"({copies} float32 copies); this machine has {have / 2**30:.0f} GiB available. Use --preset flux-small "
            "(the default), or run the full-size model on a GPU with converted weights (docs/sampling.md)"
        )


def run_smoke(preset_name: str, out: Path, seed: int = 0) -> dict:
    config = edit_jax.preset(preset_name)
    check_memory(config, preset_name)
    model = edit_jax.build_model(config)
    params = edit_jax.init_params(config, seed=seed)
    forward, inputs = jit_forward(model, example_inputs(config, batch=1, height=8, width=8, num_txt=16, seed=seed))

    t0 = time.perf_counter()
    before = jax.block_until_ready(forward(params, inputs))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, inputs))
        times.append(time.perf_counter() - t0)

    out.mkdir(parents=True, exist_ok=True)
    ckpt = save(out / "checkpoint", config, params, overwrite=True)
    loaded_model, loaded = edit_jax.load(ckpt)
    after = jit_forward(loaded_model, example_inputs(config, 1, 8, 8, 16, seed))[0](loaded, inputs)

    summary = {
        "preset": preset_name,
        "family": config.family,
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "output_shape": list(before.shape),
        "output_std": float(np.std(before)),
        "compile_and_first_call_s": round(compile_s, 3),
        "forward_median_ms": round(1000 * float(np.median(times)), 3),
        "checkpoint": str(ckpt),
        "reloaded_output_identical": bool(np.array_equal(np.asarray(before), np.asarray(after))),
        "backend": jax.default_backend(),
    }
    summary["sampling"] = sample_smoke(model, params, config, out, seed)
    (out / "smoke.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["reloaded_output_identical"]:
        raise RuntimeError("the reloaded checkpoint gives a different output")
    return summary


def sample_smoke(model, params, config, out: Path, seed: int, steps: int = 12) -> dict:
    """Dense vs E-DiT sampling on random prompt embeddings; E-DiT decisions are scripted the way
    released routers behave (outer blocks always on, inner blocks borderline or off).

    Args:
      model, params: the random-weight model. config: its config. out: the folder to write.
      seed: of the embeddings and noise. steps: denoising steps.
    """
    import jax.numpy as jnp

    blocks = config.num_blocks
    rng = np.random.default_rng(seed)
    p = rng.choice([0.3, 0.505, 0.9], size=(steps, blocks), p=[0.3, 0.4, 0.3]).astype(np.float32)
    p[:, 0] = p[:, -1] = 0.95
    scripted = jnp.asarray(p)
    decisions = lambda step: {"p": scripted[jnp.minimum(step, steps - 1)], "bucket": jnp.full((blocks,), 3, jnp.int32)}  # noqa: E731
    cond = random_conditions(config, 1, 16, 128, 128)
    noise = jax.random.normal(jax.random.key(seed), (1, int(np.prod(packed_grid(128, 128))), config.in_channels))
    sampler = SamplerConfig(num_steps=steps)
    elastic = ElasticConfig(mode="forced", cache=True, cache_start=steps // 3, delta_margin=0.015, max_reuse=3)
    routers = init_routers(config)
    runs = {
        "dense": lambda: sample(model, params, noise, cond, sampler),
        "edit": lambda: sample(model, params, noise, cond, sampler, routers=routers, elastic=elastic, decisions=decisions),
    }
    results, timings = {}, {}
    for name, run in runs.items():
        jax.block_until_ready(run())
        t0 = time.perf_counter()
        results[name] = jax.block_until_ready(run())
        timings[name] = time.perf_counter() - t0
    records = jax.tree.map(np.asarray, results["edit"][1])
    plot_router_map(out / "router_map.png", records["executed"][:, 0], records["bucket"][:, 0], records["cache_hit"][:, 0],
                    title=f"E-DiT routing, {model.config.family} smoke-test model (scripted router), {steps} steps, cache on",
                    block_groups=block_groups(config))
    dense_latents, edit_latents = np.asarray(results["dense"][0]), np.asarray(results["edit"][0])
    return {
        "steps": steps,
        "dense_ms_per_step": round(1000 * timings["dense"] / steps, 3),
        "edit_ms_per_step": round(1000 * timings["edit"] / steps, 3),
        "blocks_computed": float(records["executed"].mean()),
        "cache_hit_rate": float(records["cache_hit"].mean()),
        "flops_vs_dense": float(records["flops_total"].sum() / (steps * dense_flops(config, noise.shape[1], 16))),
        "latents_relative_difference": float(np.linalg.norm(edit_latents - dense_latents) / np.linalg.norm(dense_latents)),
        "router_map": str(out / "router_map.png"),
    }
