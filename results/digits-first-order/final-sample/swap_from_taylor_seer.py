"""Whether TaylorSeer's map can be improved at the same FLOPs: from its map at interval 3 (first-order
residual reuse), each round measures closing each open cell and opening each closed cell alone on
calibration images from the training labels, tries the pairs (close one, open one of the same block
kind, so the FLOPs stay) whose two changes add up to the largest fall of the final sample's squared
distance to dense, and keeps the best pair that lowers it. Stops when no pair does. The map found
is judged on the demo's test labels beside the map it started from.

    python swap_from_taylor_seer.py DEMO_OUT [KEY=VALUE ...]"""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from greedy_schedule import calibration_conditions

from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.eval import demo as demo_module
from edit_jax.sampling.sampler import SamplerConfig, sample
from edit_jax.sampling.step_schedule import ScheduleDecisions

INTERVAL, ROUNDS, PAIRS = 3, 12, 8


def main(out: Path, overrides: list[str]) -> list[dict]:
    demo = demo_module.Demo.prepared(out, overrides)
    settings = demo.s
    steps, blocks = settings.sample_steps, demo.config.num_blocks
    full = len(demo.config.width_buckets) - 1
    kind = np.asarray([k for _, layers, k in demo.config.block_stacks for _ in range(layers)])
    elastic = ElasticConfig(mode="forced", block_cache=LearnedReuse(steps, settings.reuse_order))
    sampler = SamplerConfig(num_steps=steps)
    noise, cond = calibration_conditions(demo, 128)
    dense = sample(demo.model, demo.base, noise, cond, sampler)[0]

    def decisions(run):
        return ScheduleDecisions(jnp.asarray(run), jnp.full(run.shape, full, jnp.int32))

    def distance(run):
        return float(jnp.mean(jnp.square(sample(demo.model, demo.base, noise, cond, sampler, elastic=elastic,
                                                decisions=decisions(run))[0] - dense)))

    taylor_seer = TaylorSeer(cache_interval=INTERVAL, disable_cache_before_step=1)
    computes = np.asarray(taylor_seer.computes_at(jnp.arange(steps)))
    start = run = np.repeat(computes[:, None], blocks, axis=1)
    current = distance(run)
    print(f"TaylorSeer's map at interval {INTERVAL}: distance {current:.4e}", flush=True)
    for round_ in range(ROUNDS):
        change = np.zeros(run.shape)
        for s in range(1, steps):
            for b in range(blocks):
                trial = run.copy()
                trial[s, b] = ~trial[s, b]
                change[s, b] = distance(trial) - current
        pairs = sorted((change[c] + change[o], c, o) for c in zip(*np.nonzero(run)) if c[0] > 0
                       for o in zip(*np.nonzero(~run)) if kind[c[1]] == kind[o[1]])
        best = None
        for _, c, o in pairs[:PAIRS]:
            trial = run.copy()
            trial[c], trial[o] = False, True
            d = distance(trial)
            if d < current and (best is None or d < best[0]):
                best = (d, trial, c, o)
        if best is None:
            print(f"round {round_}: no pair of the best {PAIRS} lowers the distance", flush=True)
            break
        current, run = best[0], best[1]
        print(f"round {round_}: closed {best[2]}, opened {best[3]}: distance {current:.4e}", flush=True)

    noise, cond = demo.conditions()

    def judged(name, **method):
        return demo.judge_run(name, noise, cond, sampler, **method)

    return [judged("dense"), judged("TaylorSeer's map", elastic=elastic, decisions=decisions(start)),
            {**judged("after the swaps", elastic=elastic, decisions=decisions(run)), "run": run.astype(int).tolist()}]


if __name__ == "__main__":
    rows = main(Path(sys.argv[1]), sys.argv[2:])
    for row in rows:
        print(f"{row['method']:20s} {row['flops_vs_dense']:.3f}  FD {row['frechet_distance']:.2f}  "
              f"PSNR {row.get('psnr_vs_dense_db', 'inf')}  acc {row['class_accuracy']:.3f}")
    Path("swap_from_taylor_seer.json").write_text(json.dumps(rows, indent=1, default=float))
