"""A checkpoint's trees through orbax: their metadata (checked for missing data files first), streamed group by group, written atomically
by every process of a run, hard-linked from a checkpoint that already stores them, restored
straight into their shardings and checked against the model's layout first."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from edit_jax.checkpoint.agreement import agreed, barrier, shared_token
from edit_jax.checkpoint.datafiles import missing_array_files
from edit_jax.checkpoint.format import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, PARAMS_DIR, ROUTER_MODE_KEY,
                                        ROUTERS_DIR, STEP_SCHEDULE_KEY, CheckpointError, check_destination, flatten,
                                        joined_kernels, model_config, read_metadata, tree_names, unflatten)
from edit_jax.checkpoint.paths import move_into_place, remove_stale_scratch, resolve, sigterm_raises
from edit_jax.config import config_to_dict


@contextlib.contextmanager
def reading(path: Path, what: str):
    """Turns orbax's and tensorstore's errors on a damaged tree into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises bare Exception, ValueError, FileNotFoundError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is incomplete or damaged: cannot read its {what} ({first[:300]}); "
            f"`edit-jax inspect {path} --verify` lists what is missing"
        ) from e


def stored_metadata(path: Path, tree: str) -> dict:
    """The tree as stored, with (shape, dtype) leaves."""
    read_metadata(path)
    if not (path / tree).is_dir():
        raise CheckpointError(f"{path} has no {tree}/ tree")
    missing = missing_array_files(path, [tree])
    if missing:
        listed = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CheckpointError(f"{path} is incomplete (array data missing):\n  {listed}")
    with reading(path, f"{tree}/ metadata"):
        meta = ocp.metadata(path / tree).metadata
        if meta is None:  # orbax logs the cause and returns None
            raise ValueError(f"orbax found no readable tree metadata in {tree}/")
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), meta)


def params_metadata(path: str | Path, tree: str = PARAMS_DIR) -> dict:
    """A stored tree with (shape, dtype) leaves, read without loading any array, in the current
    format's layout (a format-1 kernel listed as its parts)."""
    path = resolve(path)
    flat = flatten(stored_metadata(path, tree))
    for whole, parts in joined_kernels(path, tree).items():
        if whole in flat:
            shape, dtype = flat.pop(whole)
            flat.update({name: (shape[:-2] + (rows, shape[-1]), dtype) for name, rows in parts})
    return unflatten(flat)


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
    protect: Iterable[str | Path] = (),
    linked: dict[str, Path] | None = None,
) -> Path:
    """Writes a checkpoint atomically. `trees` maps a tree name ("params", "routers") to an
    iterable of disjoint nested sub-trees whose union is that tree; each sub-tree is written as
    soon as it arrives. `protect`: paths the checkpoint must neither be, hold nor lie inside
    (a conversion's source). `linked`: {tree name: a stored tree folder holding that very tree}
    whose files are hard-linked instead (no second copy on disk); the tree is written from
    `trees` where the filesystem cannot link. A SIGINT or SIGTERM during the write removes the
    partial folder.

    Args:
      path: the checkpoint folder to create. config: the model config, stored as config.json.
      trees: {tree name: iterable of sub-trees of arrays}, written group by group.
      overwrite: replace an existing edit-jax checkpoint at `path` (nothing else).
      extra: more keys for config.json (e.g. where it was converted from).
      protect, linked: above.
    """
    path = resolve(path)
    lead = jax.process_index() == 0  # in a multi-process run every process writes its shards
    if lead:
        check_destination(path, overwrite, protect)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_scratch(path):
            print(f"removed {stale}, left by an earlier write of {path} that did not finish", file=sys.stderr)
    tmp = path.parent / f".{path.name}.incomplete-{shared_token()}"
    if lead:
        tmp.mkdir()
    barrier(f"edit-jax checkpoint {path}: folder made")
    with sigterm_raises():
        try:
            with _streaming_context():
                for name, groups in trees.items():
                    if name in (linked or {}) and _hard_linked(linked[name], tmp / name, lead, path / name):
                        continue
                    for group in groups:
                        ocp.partial.save(tmp / name, group)
                        del group  # let the arrays go before the next group is built
                        _return_freed_memory()
                    ocp.partial.finalize(tmp / name)
            if lead:
                meta = {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "family": config.family,
                    "config": config_to_dict(config),
                    **(extra or {}),
                }
                (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        except BaseException:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier(f"edit-jax checkpoint {path}: written")
        if lead:
            move_into_place(tmp, path)
        barrier(f"edit-jax checkpoint {path}: in place")
    return path


def _hard_linked(source: Path, dest: Path, lead: bool, final: Path) -> bool:
    """Hard-links every file under `source` into the new folder `dest` (process 0; the others
    learn the outcome), saying so for `final`, the folder it becomes; False, with nothing left at
    `dest`, where the filesystem cannot link."""
    done = True
    if lead:
        try:
            for root, _, files in os.walk(source):
                into = dest / Path(root).relative_to(source)
                into.mkdir(parents=True, exist_ok=True)
                for name in files:
                    os.link(Path(root) / name, into / name)
        except OSError as e:  # another filesystem (EXDEV), one without hard links, or not allowed (EPERM)
            shutil.rmtree(dest, ignore_errors=True)
            done = False
            print(f"{final}: cannot hard-link the files of {source} ({e.strerror or e}): written instead",
                  file=sys.stderr)
        else:
            print(f"{final}: hard links to the files of {source} (no second copy on disk)", file=sys.stderr)
    return agreed(done)


def _host_or_global(x):
    """NumPy for host data and fully addressable arrays; a global jax.Array (sharded over several
    processes) stays as it is: each process writes its own shards."""
    return x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)


def _on_host(tree: dict) -> Iterable[dict]:
    """`tree` as the one group of a tree to write, fetched to the host only if it is written (a
    hard-linked tree is never copied off its devices)."""
    yield jax.tree.map(_host_or_global, tree)


def save(path: str | Path, config, params: dict, routers: dict | None = None, *, overwrite: bool = False,
         protect: Iterable[str | Path] = (), params_from: str | Path | None = None,
         router_mode: dict | None = None, step_schedule: dict | None = None) -> Path:
    """Saves in-memory params (plain pytrees) with their config (see `write_checkpoint`). In a
    multi-process run every process calls it with the same global arrays.

    params_from: a checkpoint the caller read `params` from unchanged (a frozen base). Where it
    stores them as this save would (the current format, the same MLP channel layout, the same
    shapes and dtypes), its params/ files are hard-linked rather than written again.

    Args:
      path: the checkpoint folder to create. config: the model config.
      params, routers: pytrees of arrays (routers None: a checkpoint without them).
      overwrite, protect: as `write_checkpoint`'s. params_from: above. router_mode: what the
        routers were trained for (`edit_jax.checkpoint.format.router_mode`), kept in config.json.
      step_schedule: a learned step schedule (`edit_jax.checkpoint.format.step_schedule`), kept there too.
    """
    trees = {PARAMS_DIR: _on_host(params)}
    if routers is not None:
        trees[ROUTERS_DIR] = _on_host(routers)
    linked = None
    if params_from is not None:
        mismatch = storage_mismatch(params_from, config, params)
        if agreed(mismatch is None):
            linked = {PARAMS_DIR: resolve(params_from) / PARAMS_DIR}
        elif jax.process_index() == 0:
            print(f"{resolve(path)}: its params are written, not hard-linked from {resolve(params_from)}: {mismatch}",
                  file=sys.stderr)
    extra = {k: v for k, v in ((ROUTER_MODE_KEY, router_mode), (STEP_SCHEDULE_KEY, step_schedule)) if v is not None}
    return write_checkpoint(path, config, trees, overwrite=overwrite, protect=protect, linked=linked, extra=extra)


def storage_mismatch(path: str | Path, config, params: dict) -> str | None:
    """None where the checkpoint at `path` stores `params` (a tree of arrays of `config`'s model)
    as `save` would write them (format version, width_groups, every array's shape and dtype);
    otherwise what differs."""
    try:
        meta = read_metadata(path)
        stored = flatten(stored_metadata(resolve(path), PARAMS_DIR))
    except CheckpointError as e:  # gone or damaged since it was read
        return str(e)
    if meta["version"] != FORMAT_VERSION:
        return f"it is checkpoint format {meta['version']}, and this one is {FORMAT_VERSION}"
    if model_config(meta).width_groups != config.width_groups:
        return f"it stores MLP channels with width_groups={model_config(meta).width_groups}, this one {config.width_groups}"
    wanted = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(params).items()}
    if stored != wanted:
        dtypes = lambda tree: sorted({str(d) for _, d in tree.values()})  # noqa: E731
        if stored.keys() == wanted.keys() and dtypes(stored) != dtypes(wanted):
            return f"it stores them in {', '.join(dtypes(stored))}, and these are {', '.join(dtypes(wanted))}"
        return "its arrays differ in names or shapes"
    return None


def stored_identity(path: str | Path) -> tuple | None:
    """Names the params/ tree now at checkpoint `path`: a checkpoint written over it (a rename into
    place) has another, so a long run can tell that the base it read is still there."""
    try:
        status = (resolve(path) / PARAMS_DIR).stat()
    except OSError:  # gone
        return None
    return status.st_dev, status.st_ino, status.st_ctime_ns  # the time too: a deleted folder's inode is reused


def load_params(path: str | Path, abstract: dict, shardings=None, tree: str = PARAMS_DIR) -> dict:
    """Restores params into the structure, shapes and dtypes of `abstract` (ShapeDtypeStructs).

    shardings: None (default device), one jax.sharding.Sharding for every leaf, or a pytree of
    them matching the params. Arrays are read straight into their shardings (a format-1 kernel
    whole, then split into its parts' shardings).

    Args:
      path: the checkpoint folder. abstract: the pytree of jax.ShapeDtypeStruct to restore into
        (`edit_jax.models.abstract_params`). shardings: above. tree: "params" or "routers".
    """
    path = resolve(path)
    _check_layout(path / tree, params_metadata(path, tree), abstract)
    shardings = _leaf_shardings(shardings, abstract)
    joined = joined_kernels(path, tree)
    if not joined:
        return _restore(path, tree, abstract, shardings)
    targets, target_shardings = flatten(abstract), flatten(shardings)
    wanted, placed = dict(targets), dict(target_shardings)
    for whole, parts in joined.items():
        first = targets[parts[0][0]]
        for name, _ in parts:
            del wanted[name], placed[name]
        wanted[whole] = jax.ShapeDtypeStruct(first.shape[:-2] + (sum(r for _, r in parts), first.shape[-1]), first.dtype)
        placed[whole] = _rows_whole(target_shardings[parts[0][0]], first.ndim)
    restored = flatten(_restore(path, tree, unflatten(wanted), unflatten(placed)))
    for whole, parts in joined.items():
        bounds = np.cumsum([0] + [rows for _, rows in parts])
        split = jax.jit(lambda w, b=bounds: tuple(w[..., b[i] : b[i + 1], :] for i in range(len(b) - 1)),
                        out_shardings=tuple(target_shardings[name] for name, _ in parts))
        restored.update(zip((name for name, _ in parts), split(restored.pop(whole))))
    return unflatten(restored)


def _rows_whole(sharding, ndim: int):
    """`sharding` with the rows axis (-2) of an [..., rows, out] array left unsplit."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    spec[-2] = None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _leaf_shardings(shardings, abstract: dict) -> dict:
    """A sharding per leaf of `abstract` from None (the default device), one sharding or a tree."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    return shardings


def _restore(path: Path, tree: str, abstract: dict, shardings) -> dict:
    """orbax restore of a checked tree into the given shardings (see `load_params`)."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with reading(path, f"{tree}/ arrays"):
        return ocp.load(path / tree, target)


def _check_layout(where: Path, stored: dict, abstract: dict) -> None:
    """Raises CheckpointError listing the arrays the model needs that the checkpoint lacks, has
    in another shape, or holds beyond it."""
    have = flatten(jax.tree.map(lambda m: m, stored, is_leaf=lambda x: isinstance(x, tuple)))
    want = flatten(abstract)
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k][0]}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: stored {have[k][0]}, the model needs {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(have)) if tuple(have[k][0]) != tuple(want[k].shape)]
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where} does not fit the model config:\n  {listed}")


def load_routers(path: str | Path, shardings=None) -> dict | None:
    """The router subtree of a checkpoint (None when it has none), as stored; placed by
    `shardings` (as `edit_jax.load`; `edit_jax.load_routers` also takes a mesh)."""
    if ROUTERS_DIR not in tree_names(path):
        return None
    meta = params_metadata(path, ROUTERS_DIR)  # checked; restored as stored
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(*m), meta, is_leaf=lambda x: isinstance(x, tuple))
    return _restore(resolve(path), ROUTERS_DIR, abstract, _leaf_shardings(shardings, abstract))
