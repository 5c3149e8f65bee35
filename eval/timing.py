"""Wall-clock timing of variants side by side in one process (see ../shared/PERF.md, "How to time")."""

from __future__ import annotations

import time

import jax
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


def compare_forms(forms: dict, xs, runs: int) -> dict:
    """Two forms of one computation, {base name: f, candidate name: g} (f, g: x -> array), each
    mapped over xs' leading axis (the layers) in one jitted call, timed side by side. Returns
    {"ms_per_layer": each form's median, "<candidate>_over_<base>": the median per-round ratio,
    "fusions": fusion ops in each compiled program, "relative_difference": of their outputs}."""
    (base, _), (candidate, _) = forms.items()
    jitted = {name: jax.jit(lambda xs, f=f: jax.lax.map(f, xs)) for name, f in forms.items()}
    fusions = {name: fn.lower(xs).compile().as_text().count(" fusion(") for name, fn in jitted.items()}
    outs = {name: np.asarray(jax.block_until_ready(fn(xs)), np.float64) for name, fn in jitted.items()}
    rounds = time_runs({name: (lambda fn=fn: jax.block_until_ready(fn(xs))) for name, fn in jitted.items()}, runs)
    return {
        "ms_per_layer": {k: round(float(np.median(v)) / len(xs), 4) for k, v in rounds.items()},
        f"{candidate}_over_{base}": round(paired_ratio(rounds, candidate, base), 3),
        "fusions": fusions,
        "relative_difference": float(np.linalg.norm(outs[candidate] - outs[base]) / np.linalg.norm(outs[base])),
    }


def form_arguments(p) -> None:
    """The flags `compare_forms` scripts share: tokens per layer, layers, dtype, rounds, --out."""
    p.add_argument("--tokens", type=int, default=4096 + 512, help="tokens per layer (default: FLUX.1-dev's 1024^2)")
    p.add_argument("--layers", type=int, default=38, help="inputs mapped over in one call (FLUX.1-dev: 38 single blocks)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out")
