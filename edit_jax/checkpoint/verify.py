"""Checking every value of a stored checkpoint: each array read alone and checked to be finite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edit_jax.checkpoint.datafiles import read_array
from edit_jax.checkpoint.format import flatten, tree_names
from edit_jax.checkpoint.paths import resolve
from edit_jax.checkpoint.store import params_metadata


def verify_arrays(path: str | Path, progress: bool = False) -> list[str]:
    """Reads every array of every tree, one at a time, and returns what is wrong (an unreadable
    array, non-finite values) as messages; empty when the checkpoint is sound."""
    path = resolve(path)
    problems = []
    for tree in tree_names(path):
        leaves = flatten(params_metadata(path, tree))
        for name in tqdm(sorted(leaves), desc=f"verify {tree}", unit="array", disable=not progress):
            try:
                values = read_array(path, tree, name)
            except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError or its own types
                problems.append(f"{tree}/{name}: unreadable ({str(e).splitlines()[0][:200]})")
                continue
            if values.dtype.kind == "f" or values.dtype.name == "bfloat16":
                bad = int(np.size(values) - np.count_nonzero(np.isfinite(values.astype(np.float32))))
                if bad:
                    problems.append(f"{tree}/{name}: {bad} non-finite values")
    return problems
