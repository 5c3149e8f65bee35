"""A per-step schedule of block decisions, the same for every sample: which blocks compute at which
sampling step. One read off routers' average map (the demo's per-step schedules) or learned directly
(`edit-jax train trainable=schedule`, Learning-to-Cache's per-step router, arXiv 2406.01733;
`edit_jax.checkpoint.step_schedule` reads it from a checkpoint). The sampler takes it as forced
decisions, a function of the step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleDecisions:
    """Forced decisions of step i: row i of a [S, L] run table (bool) and bucket table (width
    bucket indices); steps past the last take the last row. A pytree of the two tables: the
    sampler traces them as arguments, so every schedule of one shape runs one compiled loop."""

    run: jax.Array
    bucket: jax.Array

    def __call__(self, step):
        i = jnp.minimum(step, self.run.shape[0] - 1)
        return {"run": self.run[i], "bucket": self.bucket[i]}


def learned_schedule(schedule: dict, num_steps: int, num_buckets: int) -> tuple[ElasticConfig, ScheduleDecisions]:
    """(elastic config, decisions) that sample with a learned step schedule (as
    `edit_jax.checkpoint.step_schedule` returns it): block l computes at step s where p[s][l] >=
    tau, at full width; below it, it reuses its residual (`LearnedReuse`, computing anyway after
    max_reuse reuses in a row) or skips, as the schedule was trained. Raises ValueError when the
    schedule was learned for another number of steps.

    Args:
      schedule: {"p" [S][L], "tau", "closed", "max_reuse", "order"}. num_steps: the sampler's
        steps (S). num_buckets: the model's width buckets.
    """
    p = np.asarray(schedule["p"], np.float64)
    if p.shape[0] != num_steps:
        raise ValueError(f"the step schedule was learned for {p.shape[0]} sampling steps, not {num_steps}: sample "
                         f"with --steps {p.shape[0]}, or train one for {num_steps} (rollout_schedule={num_steps})")
    cache = LearnedReuse(schedule["max_reuse"], schedule["order"]) if schedule["closed"] == "reuse" else None
    run = jnp.asarray(p >= schedule["tau"])
    return (ElasticConfig(mode="forced", block_cache=cache),
            ScheduleDecisions(run, jnp.full(run.shape, num_buckets - 1, jnp.int32)))
