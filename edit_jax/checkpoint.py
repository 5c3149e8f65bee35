"""edit-jax checkpoints: an orbax params tree plus the model config as JSON.

    CKPT/
      config.json   {"format": "edit-jax", "version": 1, "family": ..., "config": {...}, ...}
      params/       orbax PyTree checkpoint of the plain base params pytree
      routers/      (optional) the E-DiT router params, a separate pytree stacked over layers

A checkpoint is written into a hidden sibling folder and renamed into place only when complete,
so a failed or killed write never leaves something at CKPT that looks finished. Params can be
written group by group (`write_checkpoint` takes an iterator of sub-trees), so a converter never
holds the whole model in memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from edit_jax.config import config_from_dict, config_to_dict

FORMAT_NAME = "edit-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
ROUTERS_DIR = "routers"


class CheckpointError(ValueError):
    """A path that is not a complete edit-jax checkpoint, or one that does not fit its use."""


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, path + "/"))
        else:
            flat[path] = v
    return flat


def _return_freed_memory() -> None:
    """Hands memory freed by the writer's threads back to the OS (glibc keeps it in per-thread
    arenas otherwise, and the peak of a streaming conversion grows with every group)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _streaming_context() -> ocp.Context:
    """Orbax settings that keep a write's peak memory near the size of the arrays handed over.

    Orbax copies host arrays before writing (a guard against concurrent changes; ours are never
    touched again), and compression makes tensorstore hold a compressed copy of each array while
    it writes it (weights barely compress: bfloat16 noise-like mantissas)."""
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False
    context.array.saving.use_compression = False
    return context


def write_checkpoint(
    path: str | Path,
    config,
    trees: dict[str, Iterable[dict]],
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint atomically. `trees` maps a tree name ("params", "routers") to an
    iterable of disjoint nested sub-trees whose union is that tree; each sub-tree is written as
    soon as it arrives."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.incomplete-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _streaming_context():
            for name, groups in trees.items():
                for group in groups:
                    ocp.partial.save(tmp / name, group)
                    del group  # let the arrays go before the next group is built
                    _return_freed_memory()
                ocp.partial.finalize(tmp / name)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": config.family,
            "config": config_to_dict(config),
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save(path: str | Path, config, params: dict, routers: dict | None = None, *, overwrite: bool = False) -> Path:
    """Saves in-memory params (plain pytrees) with their config."""
    trees = {PARAMS_DIR: [jax.tree.map(np.asarray, params)]}
    if routers is not None:
        trees[ROUTERS_DIR] = [jax.tree.map(np.asarray, routers)]
    return write_checkpoint(path, config, trees, overwrite=overwrite)


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / CONFIG_FILE
    if not meta_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not an edit-jax checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_file} is not an edit-jax checkpoint config")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} is not {FORMAT_VERSION}")
    return meta


def load_config(path: str | Path):
    meta = read_metadata(path)
    return config_from_dict(meta["family"], meta["config"])


def tree_names(path: str | Path) -> list[str]:
    """The pytrees a checkpoint holds: "params", and "routers" when it has them."""
    return [n for n in (PARAMS_DIR, ROUTERS_DIR) if (Path(path) / n).is_dir()]


def params_metadata(path: str | Path, tree: str = PARAMS_DIR) -> dict:
    """A stored tree with (shape, dtype) leaves, read without loading any array."""
    read_metadata(path)
    meta = ocp.metadata(Path(path) / tree).metadata
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), meta)


def load_params(path: str | Path, abstract: dict, shardings=None, tree: str = PARAMS_DIR) -> dict:
    """Restores params into the structure, shapes and dtypes of `abstract` (ShapeDtypeStructs).

    shardings: None (default device), one jax.sharding.Sharding for every leaf, or a pytree of
    them matching the params.
    """
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return ocp.load(Path(path) / tree, target)


def load_routers(path: str | Path, shardings=None) -> dict | None:
    """The router subtree of a checkpoint (None when it has none), as stored."""
    if ROUTERS_DIR not in tree_names(path):
        return None
    meta = params_metadata(path, ROUTERS_DIR)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(*m), meta, is_leaf=lambda x: isinstance(x, tuple))
    return load_params(path, abstract, shardings, ROUTERS_DIR)
