"""No training: TaylorSeer's own compute map run as a forced per-step schedule for every block, with
residual reuse of order 0 and 1 (LearnedReuse), beside TaylorSeer itself (which extrapolates the
stacks' output). Prints the table its_map_without_training.txt holds.

    python its_map_without_training.py DEMO_OUT [KEY=VALUE ...]

DEMO_OUT: a folder `edit-jax demo` ran in with the same settings (its dense model is reused);
KEY=VALUE: the demo settings that run changed (`--set`'s arguments)."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.eval import demo as demo_module
from edit_jax.sampling.sampler import SamplerConfig
from edit_jax.sampling.step_schedule import ScheduleDecisions

SETTINGS = ((2, 1, 10), (3, 1, None), (4, 1, None))  # TaylorSeer's interval, warm-up and last cached step


def main(out: Path, overrides: list[str]) -> list[dict]:
    demo = demo_module.Demo.prepared(out, overrides)
    settings = demo.s
    noise, cond = demo.conditions()
    sampler = SamplerConfig(num_steps=settings.sample_steps)

    def judged(name, **method):
        return demo.judge_run(name, noise, cond, sampler, **method)

    rows = [judged("dense")]
    steps, blocks, full = settings.sample_steps, demo.config.num_blocks, len(demo.config.width_buckets) - 1
    for interval, before, after in SETTINGS:
        taylor_seer = TaylorSeer(cache_interval=interval, disable_cache_before_step=before,
                                 disable_cache_after_step=after, max_order=1, factors_dtype="float32")
        rows.append(judged(f"TaylorSeer k={interval}", elastic=ElasticConfig(mode="dense", step_cache=taylor_seer)))
        computes = np.asarray(taylor_seer.computes_at(jnp.arange(steps)))
        its_map = ScheduleDecisions(jnp.asarray(np.repeat(computes[:, None], blocks, 1)),
                                    jnp.full((steps, blocks), full, jnp.int32))
        for order in (0, 1):
            rows.append(judged(f"its map, residual reuse order {order}", decisions=its_map,
                               elastic=ElasticConfig(mode="forced", block_cache=LearnedReuse(steps, order))))
    return rows


if __name__ == "__main__":
    for row in main(Path(sys.argv[1]), sys.argv[2:]):
        print(f"{row['method']:40s} {row['flops_vs_dense']:.3f}  FD {row['frechet_distance']:.2f}  "
              f"PSNR {row.get('psnr_vs_dense_db', 'inf')}  acc {row['class_accuracy']:.3f}")
