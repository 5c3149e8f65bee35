"""Sampling many prompts a batch at a time: the loop `edit-jax sample`, `generate` and `eval` share.

    for batch in sample_in_batches(model, params, noise, rows_conditions(cond, negative), sampler, 4,
                                   routers=routers, elastic=elastic):
        batch.ids, batch.latents, batch.records      # its n prompts, [n (+ padding), N, C], records of its n rows

Each batch is one `edit_jax.sampling.sampler.sample` call on its rows of the noise and the conditions
(`conditions(ids)` gives them, so a caller may read embeddings lazily); with `pad_last` the last
batch is padded to `batch_size` by repeating its last prompt (one compiled program for every
batch; the padded rows are dropped). Records keep only the batch's own rows (`first_rows`), and
`concat_records` joins the batches' records as one run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.sampling.sampler import SamplerConfig, first_rows, sample

SHARED_CONDITIONS = ("img_ids", "txt_ids", "img_shapes")  # one value for every row of a batch


def rows_of(cond: dict, rows, start: int = 0) -> dict:
    """Some rows of a sampler cond: `rows` consecutive ones from `start`, or the rows listed
    (a sequence of indices); shared inputs such as RoPE ids are kept whole."""
    index = slice(start, start + rows) if isinstance(rows, int) else np.asarray(rows)
    return {k: v if k in SHARED_CONDITIONS else v[index] for k, v in cond.items()}


def rows_conditions(cond: dict, negative: dict | None = None) -> Callable[[list[int]], tuple[dict, dict | None]]:
    """`conditions` for `sample_in_batches` from whole conds held in memory."""
    return lambda ids: (rows_of(cond, ids), None if negative is None else rows_of(negative, ids))


@dataclasses.dataclass
class SampledBatch:
    """ids: the prompts of the batch (padding left out); latents: [rows, N, C] packed, on device,
    every row sampled (the first len(ids) are the prompts', any padding after them); records: the
    sampler's records of the prompts' rows (host arrays; {} when dense); cond: the conditions the
    batch sampled with (padding included); seconds: the sampling's wall-clock."""

    ids: list[int]
    latents: jax.Array
    records: dict
    cond: dict
    seconds: float


def sample_in_batches(
    model,
    params: dict,
    noise: jax.Array,
    conditions: Callable[[list[int]], tuple[dict, dict | None]],
    sampler: SamplerConfig,
    batch_size: int,
    *,
    routers: dict | None = None,
    elastic: ElasticConfig | None = None,
    decisions=None,
    pad_last: bool = False,
    progress: Callable[[int], None] | None = None,
    mesh=None,
) -> Iterator[SampledBatch]:
    """Samples the rows of `noise` `batch_size` at a time, yielding each batch as it finishes.

    Args:
      noise: [B, N, C] packed initial noise, one row per prompt.
      conditions: conditions(ids) -> (cond, negative cond or None) of those prompts, in order.
      sampler, routers, elastic, decisions, progress: as `edit_jax.sampling.sampler.sample`'s.
      pad_last: pad the last batch to `batch_size` (repeating its last prompt) when there are
        several batches, so that every batch runs the same compiled program.
      mesh: a device mesh the sampling runs under (`jax.set_mesh`), the caller's work between
        batches outside it; None: as the caller set it.
    """
    total = noise.shape[0]
    starts = range(0, total, batch_size)
    for start in starts:
        ids = list(range(start, min(start + batch_size, total)))
        count = len(ids)
        if pad_last and len(starts) > 1:
            ids += [ids[-1]] * (batch_size - count)
        cond, negative = conditions(ids)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            latents, records = sample(model, params, noise[np.asarray(ids)], cond, sampler, routers=routers,
                                      elastic=elastic, negative_cond=negative, decisions=decisions, progress=progress)
            latents = jax.block_until_ready(latents)
        seconds = time.perf_counter() - t0
        yield SampledBatch(ids[:count], latents, first_rows(jax.device_get(records), count, len(ids)), cond, seconds)
