"""A stored tree's data files, read without orbax: which of them are missing or truncated (from the
OCDBT stores' manifests and index nodes alone, cheap at any size), and one array read alone
through tensorstore (a checkpoint never has to be in memory at once)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edit_jax.checkpoint.format import joined_kernels, tree_names
from edit_jax.checkpoint.paths import resolve


# OCDBT locations: "btreenode:BASE:FILE:OFFSET:LENGTH" / "value:...", BASE a sub-folder or empty
_LOCATION = re.compile(r"^(?P<kind>btreenode|value):(?P<base>[^:]*):(?P<file>[^:]+):(?P<offset>\d+):(?P<length>\d+)$")


def _array_stores(tree_dir: Path) -> list[Path]:
    """The OCDBT databases (folders holding manifest.ocdbt) of one stored tree."""
    return sorted(m.parent for m in tree_dir.glob("*/manifest.ocdbt"))


def missing_array_files(path: str | Path, trees: Iterable[str] | None = None) -> list[str]:
    """The data files a checkpoint's array stores refer to that are missing or too short, as
    messages (empty: every file is there). Reads only the stores' manifests and index nodes,
    never the arrays: cheap at any size."""
    import tensorstore as ts

    path = resolve(path)
    problems = []
    for tree in tree_names(path) if trees is None else trees:
        stores = _array_stores(path / tree)
        if not stores:
            problems.append(f"{tree}/: no array store (manifest.ocdbt) in it")
        for store in stores:
            base = ts.KvStore.open(f"file://{store}/").result()
            try:
                manifest = ts.ocdbt.dump(base).result()
            except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError or its own types
                problems.append(f"{store.relative_to(path)}/manifest.ocdbt: {str(e)[:200]}")
                continue
            versions = sorted(manifest.get("versions", []), key=lambda v: v.get("generation_number", 0))
            pending = [versions[-1]["root"]["location"]] if versions and "location" in versions[-1]["root"] else []
            while pending:
                location = pending.pop()
                problem = _missing_file(store, location, path)
                if problem:
                    problems.append(problem)
                    continue
                try:
                    node = ts.ocdbt.dump(base, location).result()
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{store.relative_to(path)}: unreadable index node ({str(e)[:200]})")
                    continue
                for value in _strings(node.get("entries", [])):
                    if value.startswith("btreenode:"):
                        pending.append(value)
                    elif value.startswith("value:"):
                        problem = _missing_file(store, value, path)
                        if problem:
                            problems.append(problem)
    return sorted(set(problems))


def _strings(node):
    """Every string inside a dumped OCDBT node (locations of child nodes and of values)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _missing_file(store: Path, location: str, root: Path) -> str | None:
    match = _LOCATION.match(location)
    if match is None:
        return None
    file = store / match["base"] / match["file"]
    need = int(match["offset"]) + int(match["length"])
    if not file.is_file():
        return f"missing data file {file.relative_to(root)}"
    if file.stat().st_size < need:
        return f"data file {file.relative_to(root)} is truncated ({file.stat().st_size} of at least {need} bytes)"
    return None


def read_array(path: str | Path, tree: str, name: str) -> np.ndarray:
    """One array ("transformer_blocks/attn/to_q/kernel" of tree "params"), read alone (through
    tensorstore) so that a whole checkpoint never has to be in memory; a format-2 name of a
    format-1 checkpoint reads its rows of the stored kernel."""
    path = resolve(path)
    for whole, parts in joined_kernels(path, tree).items():
        bounds = np.cumsum([0] + [rows for _, rows in parts])
        for (part, _), start, stop in zip(parts, bounds[:-1], bounds[1:]):
            if part == name:
                return _read_stored(path, tree, whole)[..., start:stop, :]
    return _read_stored(path, tree, name)


def _read_stored(path: Path, tree: str, name: str) -> np.ndarray:
    import tensorstore as ts

    stores = _array_stores(path / tree)
    store = next((s for s in stores if (s / "_METADATA").is_file()), stores[0] if stores else path / tree)
    spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{store}/", "path": f"{name.replace('/', '.')}/"}}
    return np.asarray(ts.open(spec, open=True).result().read().result())
