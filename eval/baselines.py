"""The baselines E-DiT is compared with at matched FLOPs, as forced decisions for the sampler.

    static pruning      the same blocks skipped at every step for every sample, chosen greedily
                        by held-out loss (`greedy_prune_order`), k blocks matched to a FLOPs target
    per-step schedule   a fixed [steps, blocks] run map read off trained routers' average map,
                        the same for every sample (`step_schedule`), cut to a FLOPs target
    cache alone         every block borderline: computed, then its residual reused `max_reuse`
                        times, from `cache_start` on (`cache_candidates`)
    MagCache            diffusers' per-step cache on calibrated ratios, its threshold and
                        max_skip_steps chosen from the ratios alone (`mag_cache_candidates`)
    first-block cache   diffusers' per-step cache, its threshold searched with sampling runs
                        (`next_threshold`: its decisions depend on the samples)
    TaylorSeer          diffusers' per-step Taylor prediction, its interval and warm-up steps
                        chosen from the schedule alone (`taylor_seer_candidates`)

FLOPs fractions are per sample, relative to the dense model at the same size and steps, and count
what runs: blocks at their widths and the fixed part (embedders, final layer); forced decisions
run no routers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from edit_jax.elastic.step_cache import TaylorSeer


def closest(options: Sequence[tuple[float, object]], target: float):
    """The option (fraction, value) whose FLOPs fraction is nearest `target` (ties: the cheaper)."""
    if not options:
        raise ValueError("no options to match FLOPs against")
    return min(options, key=lambda o: (abs(o[0] - target), o[0]))[1]


def greedy_prune_order(held_out_loss: Callable[[np.ndarray], float], num_blocks: int, keep: int = 1) -> list[int]:
    """Blocks in the order static pruning removes them: each round removes the block whose removal
    (with those removed before) gives the lowest held-out loss. held_out_loss(run [L] bool)."""
    run = np.ones(num_blocks, bool)
    order = []
    while run.sum() > keep:
        candidates = np.flatnonzero(run)
        losses = []
        for block in candidates:
            trial = run.copy()
            trial[block] = False
            losses.append(held_out_loss(trial))
        best = int(candidates[int(np.argmin(losses))])
        run[best] = False
        order.append(best)
    return order


def static_fraction(layer_flops: np.ndarray, fixed: float, skipped: Sequence[int]) -> float:
    """FLOPs fraction of a model without `skipped` blocks; layer_flops [L, 1 + K] (edit_jax.elastic.flops)."""
    full = layer_flops[:, -1].astype(np.float64)
    kept = full.sum() - full[list(skipped)].sum()
    return float((fixed + kept) / (fixed + full.sum()))


def static_for_target(order: Sequence[int], layer_flops: np.ndarray, fixed: float, target: float) -> list[int]:
    """The first k blocks of the prune order, k chosen so the FLOPs fraction is nearest `target`.

    Args:
      order: the blocks in prune order. layer_flops: [L, 1 + K] (`edit_jax.elastic.flops.layer_flops`).
      fixed: FLOPs outside the blocks. target: the FLOPs fraction to match.
    """
    options = [(static_fraction(layer_flops, fixed, order[:k]), list(order[:k])) for k in range(len(order) + 1)]
    return closest(options, target)


def step_schedule(run_rate: np.ndarray, bucket: np.ndarray, layer_flops: np.ndarray, fixed: float,
                  target: float) -> np.ndarray:
    """[S, L] bool: the (step, block) cells the routers ran most often (run_rate [S, L], the share
    of samples that computed the cell), kept in that order until the FLOPs fraction (each cell at
    its `bucket` [S, L] width) reaches the one nearest `target`.

    Args:
      run_rate, bucket: above. layer_flops: [L, 1 + K]. fixed: FLOPs outside the blocks.
      target: the FLOPs fraction to match.
    """
    steps, blocks = run_rate.shape
    cost = layer_flops[np.arange(blocks)[None, :], 1 + bucket].astype(np.float64)  # [S, L]
    dense = steps * (fixed + layer_flops[:, -1].sum())
    order = np.argsort(-run_rate, axis=None, kind="stable")
    fractions = (steps * fixed + np.concatenate([[0.0], np.cumsum(cost.ravel()[order])])) / dense
    count = int(np.argmin(np.abs(fractions - target)))
    run = np.zeros(steps * blocks, bool)
    run[order[:count]] = True
    return run.reshape(steps, blocks)


def cache_fraction(num_steps: int, cache_start: int, max_reuse: int, layer_flops: np.ndarray, fixed: float) -> float:
    """FLOPs fraction of the cache alone: every block computes before `cache_start`, then once
    every 1 + max_reuse steps (the first active step stores, the next max_reuse reuse).

    Args:
      num_steps: the run's steps. cache_start, max_reuse: the cache's. layer_flops: [L, 1 + K].
      fixed: FLOPs outside the blocks.
    """
    active = max(num_steps - cache_start, 0)
    computed = min(cache_start, num_steps) + math.ceil(active / (1 + max_reuse))
    blocks = layer_flops[:, -1].sum()
    return float((num_steps * fixed + computed * blocks) / (num_steps * (fixed + blocks)))


def cache_candidates(num_steps: int, layer_flops: np.ndarray, fixed: float) -> list[tuple[float, dict]]:
    """(FLOPs fraction, {"cache_start", "max_reuse"}) of the cache-alone settings worth trying."""
    out = []
    for max_reuse in (1, 2, 3, 4, 6):
        for cache_start in range(1, num_steps // 2 + 1):
            out.append((cache_fraction(num_steps, cache_start, max_reuse, layer_flops, fixed),
                        {"cache_start": cache_start, "max_reuse": max_reuse}))
    return out


def mag_cache_computed(ratios: Sequence[float], threshold: float, max_skip_steps: int, retention_steps: int) -> np.ndarray:
    """[S] bool, the steps MagCache computes on these per-step ratios (a NumPy mirror of
    `edit_jax.elastic.step_cache.MagCache.decide`, in float32 as it runs).

    Args:
      ratios: one per step (already resampled to the run's steps). threshold, max_skip_steps:
        MagCache's. retention_steps: the first steps that always compute.
    """
    one = np.float32(1.0)
    ratio, err, skipped, stored = one, np.float32(0.0), 0, False
    computed = []
    for step, scale in enumerate(np.asarray(ratios, np.float32)):
        compute = True
        if step >= retention_steps:
            ratio = np.float32(ratio * scale)
            err = np.float32(err + abs(one - ratio))
            skipped += 1
            compute = not (stored and err <= threshold and skipped <= max_skip_steps)
            if compute:
                ratio, err, skipped = one, np.float32(0.0), 0
        stored = stored or compute
        computed.append(compute)
    return np.asarray(computed)


def mag_cache_candidates(ratios: Sequence[float], layer_flops: np.ndarray, fixed: float,
                         retention_steps: int) -> list[tuple[float, dict]]:
    """(FLOPs fraction, {"threshold", "max_skip_steps"}) of MagCache settings on these ratios: a
    skipped step runs only the fixed part.

    Args:
      ratios: one per step. layer_flops: [L, 1 + K]. fixed: FLOPs outside the blocks.
      retention_steps: the first steps that always compute.
    """
    blocks = float(layer_flops[:, -1].sum())
    out = []
    for max_skip in (1, 2, 3, 4, 6):
        for threshold in np.geomspace(1e-3, 10.0, 41):
            computed = mag_cache_computed(ratios, float(threshold), max_skip, retention_steps)
            fraction = (len(computed) * fixed + computed.sum() * blocks) / (len(computed) * (fixed + blocks))
            out.append((float(fraction), {"threshold": float(threshold), "max_skip_steps": max_skip}))
    return out


def taylor_seer_candidates(num_steps: int, layer_flops: np.ndarray, fixed: float) -> list[tuple[float, dict]]:
    """(FLOPs fraction, {"cache_interval", "disable_cache_before_step", "disable_cache_after_step"})
    of TaylorSeer schedules over `num_steps` steps (computing every step from the "after" step on
    makes the fractions finer than the interval alone): a predicted step runs only the fixed part.

    Args:
      num_steps: the sampling run's. layer_flops: [L, 1 + K]. fixed: FLOPs outside the blocks.
    """
    blocks = float(layer_flops[:, -1].sum())
    out = []
    for before in (1, 2, 3):
        for interval in range(1, num_steps + 1):
            for after in (None, *range(before + 1, num_steps)):
                computed = np.asarray(TaylorSeer(interval, before, after).computes_at(np.arange(num_steps)))
                fraction = (num_steps * fixed + computed.sum() * blocks) / (num_steps * (fixed + blocks))
                out.append((float(fraction), {"cache_interval": interval, "disable_cache_before_step": before,
                                              "disable_cache_after_step": after}))
    return out


def next_threshold(tried: Sequence[tuple[float, float]], target: float) -> float:
    """The next first-block cache threshold to try, from (threshold, FLOPs fraction) pairs run so
    far (a higher threshold reuses more): the middle of the tightest bracket around `target`, or
    past the end of the tried range (doubling up, halving down)."""
    above = [t for t, f in tried if f > target]  # too costly: the threshold must rise
    below = [t for t, f in tried if f <= target]
    if above and below:
        return (max(above) + min(below)) / 2
    return 2 * max(above) if above else min(below) / 2
