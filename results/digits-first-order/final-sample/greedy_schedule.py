"""A per-step reuse schedule searched, not trained: from every block open at every step, close one
cell (step, block) at a time, each time the one whose closing raises the final sample's squared
distance to dense least per FLOP it saves, measured by sampling calibration images from the
training labels (first-order residual reuse, no forced refresh). The schedules it passes at the
budgets asked for are then judged on the demo's test labels beside TaylorSeer at the same FLOPs.

    python greedy_schedule.py DEMO_OUT [KEY=VALUE ...]

DEMO_OUT: a folder `edit-jax demo` ran in with the same settings (its dense model is reused);
KEY=VALUE: the demo settings that run changed (`--set`'s arguments)."""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.flops import base_flops, layer_flops
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.eval import demo as demo_module
from edit_jax.eval import real_data
from edit_jax.sampling.sampler import SamplerConfig, sample
from edit_jax.sampling.step_schedule import ScheduleDecisions
from edit_jax.train.data import shared_inputs

CALIBRATION_ROWS = 128
BUDGETS = (0.59, 0.42, 0.34, 0.27, 0.2)


def calibration_conditions(demo, rows: int):
    labels = demo.train[1][:rows]
    cond = real_data.label_conditions(labels, 16, 16)
    noise = jax.random.normal(jax.random.key(demo.s.seed + 1234), (rows, demo.grid[0] * demo.grid[1],
                                                                     demo.config.in_channels))
    return noise, {"encoder_hidden_states": jnp.asarray(cond["prompt_embeds"]),
                   "pooled_projections": jnp.asarray(cond["pooled_prompt_embeds"]),
                   **shared_inputs(demo.config, *demo.grid, 1)}


def search(demo, steps: int, order: int) -> list[tuple[float, np.ndarray]]:
    """[(FLOPs vs dense, run table [S, L])] from every cell open down to step 0 alone."""
    noise, cond = calibration_conditions(demo, CALIBRATION_ROWS)
    sampler = SamplerConfig(num_steps=steps)
    blocks, full = demo.config.num_blocks, len(demo.config.width_buckets) - 1
    elastic = ElasticConfig(mode="forced", block_cache=LearnedReuse(steps, order))
    dense = sample(demo.model, demo.base, noise, cond, sampler)[0]
    block = layer_flops(demo.config, noise.shape[1], 1)[:, -1].astype(np.float64)
    total = steps * (base_flops(demo.config, noise.shape[1], 1) + block.sum())

    def distance(run):
        decisions = ScheduleDecisions(jnp.asarray(run), jnp.full(run.shape, full, jnp.int32))
        latents = sample(demo.model, demo.base, noise, cond, sampler, elastic=elastic, decisions=decisions)[0]
        return float(jnp.mean(jnp.square(latents - dense)))

    def flops(run):
        return (steps * base_flops(demo.config, noise.shape[1], 1) + (run * block).sum()) / total

    run, path, current = np.ones((steps, blocks), bool), [], 0.0
    path.append((flops(run), run.copy(), current))
    while run[1:].any():
        best = None
        for s, b in zip(*np.nonzero(run)):
            if s == 0:  # nothing stored yet: the first step computes every block
                continue
            trial = run.copy()
            trial[s, b] = False
            d = distance(trial)
            if best is None or (d - current) / block[b] < best[0]:
                best = ((d - current) / block[b], d, s, b, trial)
        _, current, s, b, run = best
        path.append((flops(run), run.copy(), current))
        print(f"closed step {s} block {b}: FLOPs {path[-1][0]:.3f}, distance {current:.3e}", flush=True)
    return path


def main(out: Path, overrides: list[str]) -> list[dict]:
    demo = demo_module.Demo.prepared(out, overrides)
    settings = demo.s
    steps, order = settings.sample_steps, settings.reuse_order
    start = time.perf_counter()
    path = search(demo, steps, order)
    seconds = time.perf_counter() - start
    noise, cond = demo.conditions()
    sampler = SamplerConfig(num_steps=steps)
    full = len(demo.config.width_buckets) - 1

    def judged(name, **method):
        return demo.judge_run(name, noise, cond, sampler, **method)

    rows = [judged("dense")]
    elastic = ElasticConfig(mode="forced", block_cache=LearnedReuse(steps, order))
    for budget in BUDGETS:
        flops, run, _ = min((p for p in path if p[0] <= budget + 1e-9), key=lambda p: budget - p[0])
        decisions = ScheduleDecisions(jnp.asarray(run), jnp.full(run.shape, full, jnp.int32))
        rows.append({**judged(f"greedy schedule at {budget}", elastic=elastic, decisions=decisions), "budget": budget,
                     "run": run.astype(int).tolist()})
    for interval in (2, 3, 4, 5, 6, 8):
        taylor_seer = TaylorSeer(cache_interval=interval, disable_cache_before_step=1, max_order=1,
                                 factors_dtype="float32")
        rows.append(judged(f"TaylorSeer k={interval}", elastic=ElasticConfig(mode="dense", step_cache=taylor_seer)))
    rows.append({"method": "search", "seconds": seconds, "calibration_rows": CALIBRATION_ROWS})
    return rows


if __name__ == "__main__":
    rows = main(Path(sys.argv[1]), sys.argv[2:])
    for row in rows[:-1]:
        print(f"{row['method']:28s} {row['flops_vs_dense']:.3f}  FD {row['frechet_distance']:.2f}  "
              f"PSNR {row.get('psnr_vs_dense_db', 'inf')}  acc {row['class_accuracy']:.3f}")
    print(f"search: {rows[-1]['seconds']:.0f} s on {CALIBRATION_ROWS} calibration rows")
    Path("greedy_schedule.json").write_text(json.dumps(rows, indent=1, default=float))
