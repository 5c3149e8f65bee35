"""Wall-clock timing of variants side by side in one process (see ../shared/PERF.md, "How to time")."""

from __future__ import annotations

import time

import numpy as np


def time_runs(fns: dict, runs: int) -> dict[str, np.ndarray]:
    """Wall times (ms) of each no-argument callable (which must block until its result is ready)
    over `runs` rounds. Each round calls every variant once, in an order reversed every other
    round, so slow drifts of the machine fall on all variants alike."""
    names = list(fns)
    times = {k: [] for k in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {k: np.asarray(v) for k, v in times.items()}


def time_alternating(fns: dict, runs: int) -> dict[str, float]:
    """Median wall time (ms) of each variant over `runs` alternating rounds."""
    return {k: float(np.median(v)) for k, v in time_runs(fns, runs).items()}


def paired_ratio(times: dict[str, np.ndarray], numerator: str, denominator: str) -> float:
    """Median over rounds of one variant's time over another's from the same round: steadier
    than a ratio of medians on a machine whose speed drifts."""
    return float(np.median(times[numerator] / times[denominator]))
