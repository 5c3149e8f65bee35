"""How much per-sample reuse decisions could gain over one per-step map: an oracle. The greedy search
of `greedy_schedule.py`, but each test sample keeps its own map (steps x blocks) and at every round
closes the cell that raises its own final sample's squared distance to its dense sample least per
FLOP saved. It sees the dense sample it is judged against, so it bounds from above what a
per-sample router could reach with these searches; the per-step maps (the greedy one, searched on
calibration labels, and TaylorSeer's) are read from `greedy_schedule.json`, judged on the same test
samples.

    python per_sample_oracle.py DEMO_OUT [KEY=VALUE ...]

DEMO_OUT: a folder `edit-jax demo` ran in with the same settings (its dense model is reused);
KEY=VALUE: the demo settings that run changed (`--set`'s arguments). Run it in this folder."""

import dataclasses
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
from edit_jax.eval import demo as demo_module
from edit_jax.eval.sampling_eval import run_method
from edit_jax.sampling.sampler import SamplerConfig, sample

BUDGETS = (0.59, 0.42, 0.34, 0.27)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RowDecisions:
    """Forced decisions of step i from a [B, S, L] run table, one map per row, at full width."""

    run: jax.Array
    bucket: jax.Array  # [B, L]

    def __call__(self, step):
        return {"run": self.run[:, step], "bucket": self.bucket}


def row_decisions(demo, run: np.ndarray) -> RowDecisions:
    """The forced decisions of run tables [B, S, L], every computed block at full width."""
    full = len(demo.config.width_buckets) - 1
    return RowDecisions(jnp.asarray(run), jnp.full((run.shape[0], run.shape[2]), full, jnp.int32))


def search(demo, noise, cond, sampler, elastic) -> dict[float, np.ndarray]:
    """{budget: run tables [B, S, L]}, each row's map the first its search reached at or below the budget."""
    rows, steps, blocks = noise.shape[0], sampler.num_steps, demo.config.num_blocks
    dense = sample(demo.model, demo.base, noise, cond, sampler)[0]
    block = layer_flops(demo.config, noise.shape[1], 1)[:, -1].astype(np.float64)
    base = steps * base_flops(demo.config, noise.shape[1], 1)
    total = base + steps * block.sum()

    def distances(run):
        latents = sample(demo.model, demo.base, noise, cond, sampler, elastic=elastic,
                         decisions=row_decisions(demo, run))[0]
        return np.asarray(jnp.mean(jnp.square(latents - dense), axis=(1, 2)))

    run, current = np.ones((rows, steps, blocks), bool), np.zeros(rows)
    maps, active = {budget: np.zeros_like(run) for budget in BUDGETS}, np.ones(rows, bool)
    reached = {budget: np.zeros(rows, bool) for budget in BUDGETS}
    while active.any():
        best, best_distance, best_cell = np.full(rows, np.inf), current.copy(), np.zeros((rows, 2), int)
        for s, b in zip(*np.nonzero(run[active].any(axis=0))):
            if s == 0:  # nothing stored yet: the first step computes every block
                continue
            trial = run.copy()
            trial[:, s, b] = False
            d = distances(trial)
            score = np.where(run[:, s, b] & active, (d - current) / block[b], np.inf)
            better = score < best
            best, best_distance[better], best_cell[better] = np.minimum(score, best), d[better], (s, b)
        moved = np.isfinite(best)
        run[moved, best_cell[moved, 0], best_cell[moved, 1]] = False
        current = np.where(moved, best_distance, current)
        flops = (base + (run * block).sum(axis=(1, 2))) / total
        for budget in BUDGETS:
            now = ~reached[budget] & (flops <= budget + 1e-9)
            maps[budget][now], reached[budget] = run[now], reached[budget] | now
        active = moved & (flops > min(BUDGETS) + 1e-9)
        print(f"FLOPs {flops.mean():.3f} (rows {flops.min():.3f}-{flops.max():.3f}), mean distance "
              f"{current.mean():.3e}, {active.sum()} rows searching", flush=True)
    return maps


def agreement(run: np.ndarray) -> dict:
    """How far the rows' maps are from one map: the mean fraction of cells where a row differs from
    the cell's majority, and the number of distinct maps."""
    majority = run.mean(axis=0) >= 0.5
    return {"cells_off_majority": float((run != majority).mean()), "distinct_maps": len({r.tobytes() for r in run})}


def main(out: Path, overrides: list[str]) -> list[dict]:
    demo = demo_module.Demo.prepared(out, overrides)
    steps, order = demo.s.sample_steps, demo.s.reuse_order
    noise, cond = demo.conditions()
    sampler = SamplerConfig(num_steps=steps)
    elastic = ElasticConfig(mode="forced", decision="sample", block_cache=LearnedReuse(steps, order))
    rows = [demo.judge_run("dense", noise, cond, sampler)]
    start = time.perf_counter()
    maps = search(demo, noise, cond, sampler, elastic)
    seconds = time.perf_counter() - start
    for budget, run in maps.items():
        latents, stats, _ = run_method(demo.model, demo.base, noise, cond, sampler, elastic=elastic,
                                       decisions=row_decisions(demo, run), timing_rows=noise.shape[0], repeats=1)
        rows.append({**demo.judge_method(f"per-sample oracle at {budget}", latents, stats), "budget": budget,
                     **agreement(run)})
    rows.append({"method": "search", "seconds": seconds, "rows": int(noise.shape[0])})
    return rows


if __name__ == "__main__":
    rows = main(Path(sys.argv[1]), sys.argv[2:])
    per_step = [r for r in json.loads(Path("greedy_schedule.json").read_text())[1:] if "flops_vs_dense" in r]
    for row in rows[:-1] + per_step:
        extra = f"  off-majority {row['cells_off_majority']:.3f}" if "cells_off_majority" in row else ""
        print(f"{row['method']:28s} {row['flops_vs_dense']:.3f}  FD {row['frechet_distance']:.2f}  "
              f"PSNR {row.get('psnr_vs_dense_db', 'inf')}  acc {row['class_accuracy']:.3f}{extra}")
    print(f"search: {rows[-1]['seconds']:.0f} s on {rows[-1]['rows']} test rows")
    Path("per_sample_oracle.json").write_text(json.dumps(rows, indent=1, default=float))
