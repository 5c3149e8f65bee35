"""edit-jax checkpoints: an orbax params tree plus the model config as JSON.

    CKPT/
      config.json   {"format": "edit-jax", "version": 3, "family": ..., "config": {...}, ...}
      params/       orbax PyTree checkpoint of the plain base params pytree
      routers/      (optional) the E-DiT router params, a separate pytree stacked over layers

A checkpoint is written into a hidden sibling folder and renamed into place only when complete,
so a failed or killed write never leaves something at CKPT that looks finished; the hidden folders
of writes that died (`.CKPT.incomplete-PID-*` of a process no longer running) are removed by the
next write to the same CKPT. Overwriting replaces only an edit-jax checkpoint, never a folder of
other files nor one that holds (or lies inside) a protected path such as the conversion source,
and the old checkpoint goes only after the new one is complete. Params can be written group by
group (`write_checkpoint` takes an iterator of sub-trees), so a converter never holds the whole
model in memory. A tree that another checkpoint already stores as it would be written (the frozen
base a training run read) is hard-linked from there rather than written again (`save`'s
`params_from`). Every path is resolved first: relative paths work everywhere (orbax needs
absolute ones).

Earlier formats still load. Format 1 stored each FLUX single block's proj_out kernel whole,
[L, D + M, D]; since format 2 its attention and MLP rows are two kernels (`JointLinear`), each
sharded by its own input axis: a format-1 checkpoint's metadata lists the two kernels, and loading
splits the stored one (`format_1_joined`). Formats 1 and 2 stored the elastic MLPs' hidden
channels in PyTorch's order; since format 3 the config's `width_groups` says how they are stored
(`edit_jax.layers.channel_ranks`), and an earlier checkpoint is read with width_groups = 1, its
own order.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp

from edit_jax.config import DIFFUSERS_CLASSES, config_from_dict, config_to_dict, proj_out_parts

FORMAT_NAME = "edit-jax"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
ROUTERS_DIR = "routers"


class CheckpointError(ValueError):
    """A path that is not a complete edit-jax checkpoint, or one that does not fit its use."""


def resolve(path: str | Path) -> Path:
    """An absolute, normalised path (`~` expanded): what every library call here receives."""
    return Path(path).expanduser().resolve()


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json says it is an edit-jax checkpoint."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def overlaps(a: Path, b: Path) -> bool:
    """Whether a is b, lies inside b, or holds b."""
    return a == b or a in b.parents or b in a.parents


def check_destination(path: Path, overwrite: bool, protect: Iterable[str | Path] = ()) -> None:
    """Raises CheckpointError unless a checkpoint may be written at `path` (resolved): it must not
    overlap a protected path (the source of a conversion), and an existing `path` is replaced
    only with `overwrite` and only when it is an edit-jax checkpoint."""
    for other in protect:
        if overlaps(path, resolve(other)):
            raise CheckpointError(f"refusing to write {path}: it is, holds or lies inside {resolve(other)} (the source)")
    if not path.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if not is_checkpoint(path):
        raise CheckpointError(
            f"refusing to overwrite {path}: it is not an edit-jax checkpoint (no {CONFIG_FILE} saying so); "
            "--overwrite only replaces checkpoints this tool wrote"
        )


_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?:incomplete|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(path: Path) -> list[Path]:
    """Removes the hidden folders that earlier writes of `path` left when they were killed (their
    process is gone; folders of older versions name no process); returns them."""
    removed = []
    for entry in path.parent.glob(f".{path.name}.*"):
        match = _SCRATCH.match(entry.name)
        if not match or match["name"] != path.name or not entry.is_dir():
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue  # another write of the same path is under way
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _sigterm_raises():
    """Within the block a SIGTERM raises SystemExit (so `finally` and `except` clean up) instead
    of killing the process outright; only in the main thread, where signal handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    protect: Iterable[str | Path] = (),
    linked: dict[str, Path] | None = None,
) -> Path:
    """Writes a checkpoint atomically. `trees` maps a tree name ("params", "routers") to an
    iterable of disjoint nested sub-trees whose union is that tree; each sub-tree is written as
    soon as it arrives. `protect`: paths the checkpoint must neither be, hold nor lie inside
    (a conversion's source). `linked`: {tree name: a stored tree folder holding that very tree}
    whose files are hard-linked instead (no second copy on disk); the tree is written from
    `trees` where the filesystem cannot link. A SIGINT or SIGTERM during the write removes the
    partial folder."""
    path = resolve(path)
    lead = jax.process_index() == 0  # in a multi-process run every process writes its shards
    if lead:
        check_destination(path, overwrite, protect)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_scratch(path):
            print(f"removed {stale}, left by an earlier write of {path} that did not finish", file=sys.stderr)
    tmp = path.parent / f".{path.name}.incomplete-{_shared_token()}"
    if lead:
        tmp.mkdir()
    _barrier(f"edit-jax checkpoint {path}: folder made")
    with _sigterm_raises():
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
        _barrier(f"edit-jax checkpoint {path}: written")
        if lead:
            _move_into_place(tmp, path)
        _barrier(f"edit-jax checkpoint {path}: in place")
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


def agreed(decision: bool) -> bool:
    """Process 0's decision, in every process of a multi-process run."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        decision = bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    return decision


def _shared_token() -> str:
    """PID-uuid naming this write's temporary folder: process 0's, in a multi-process run."""
    token = np.frombuffer(f"{os.getpid():010d}{uuid.uuid4().hex[:8]}".encode(), np.uint8)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    text = token.tobytes().decode()
    return f"{int(text[:10])}-{text[10:]}"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yields a hidden temporary sibling folder to fill; when the block ends it replaces `path`
    (the old one goes only then), and on an error, SIGINT or SIGTERM it is removed. Folders that
    earlier, killed writes of `path` left are removed first. For single-process writers (exports,
    datasets); the caller has decided that `path` may be replaced."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_scratch(path):
        print(f"removed {stale}, left by an earlier write of {path} that did not finish", file=sys.stderr)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    with _sigterm_raises():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _move_into_place(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yields a hidden temporary sibling path (with `path`'s suffix) to write one file to; when the
    block ends it replaces `path`, and on an error, SIGINT or SIGTERM it is removed."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    with _sigterm_raises():
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames the finished `tmp` to `path`, replacing what is there; no signal lands between
    the two renames, so `path` is always either the old or the new checkpoint."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    trash = None
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if path.exists():
            trash = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
        os.rename(tmp, path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if trash is not None:
        shutil.rmtree(trash)


def _host_or_global(x):
    """NumPy for host data and fully addressable arrays; a global jax.Array (sharded over several
    processes) stays as it is: each process writes its own shards."""
    return x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)


def _on_host(tree: dict) -> Iterable[dict]:
    """`tree` as the one group of a tree to write, fetched to the host only if it is written (a
    hard-linked tree is never copied off its devices)."""
    yield jax.tree.map(_host_or_global, tree)


def save(path: str | Path, config, params: dict, routers: dict | None = None, *, overwrite: bool = False,
         protect: Iterable[str | Path] = (), params_from: str | Path | None = None) -> Path:
    """Saves in-memory params (plain pytrees) with their config (see `write_checkpoint`). In a
    multi-process run every process calls it with the same global arrays.

    params_from: a checkpoint the caller read `params` from unchanged (a frozen base). Where it
    stores them as this save would (the current format, the same MLP channel layout, the same
    shapes and dtypes), its params/ files are hard-linked rather than written again."""
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
    return write_checkpoint(path, config, trees, overwrite=overwrite, protect=protect, linked=linked)


def storage_mismatch(path: str | Path, config, params: dict) -> str | None:
    """None where the checkpoint at `path` stores `params` (a tree of arrays of `config`'s model)
    as `save` would write them (format version, width_groups, every array's shape and dtype);
    otherwise what differs."""
    try:
        meta = read_metadata(path)
        stored = flatten(_stored_metadata(resolve(path), PARAMS_DIR))
    except CheckpointError as e:  # gone or damaged since it was read
        return str(e)
    if meta["version"] != FORMAT_VERSION:
        return f"it is checkpoint format {meta['version']}, and this one is {FORMAT_VERSION}"
    if _model_config(meta).width_groups != config.width_groups:
        return f"it stores MLP channels with width_groups={_model_config(meta).width_groups}, this one {config.width_groups}"
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


def run_dir_hint(path: Path) -> str:
    """Where a training run's folder, given in place of a checkpoint, keeps its trained one ("" for
    other folders)."""
    if is_checkpoint(path / "edit-jax"):
        return f": it is a training run's folder, whose trained checkpoint is {path / 'edit-jax'}"
    if (path / "checkpoints").is_dir() and (path / CONFIG_FILE).is_file():
        return (": it looks like a training run's folder whose run has not finished; its trained checkpoint "
                f"will be {path / 'edit-jax'} (rerun the training command to finish it)")
    return ""


def diffusers_hint(path: Path) -> str:
    """The `convert` command that makes a checkpoint of a diffusers folder given in place of one
    ("" for other folders)."""
    family = _diffusers_family(path)
    if family is None:
        return ""
    name = path.parent.name if path.name == "transformer" else path.name
    return (f": it is a diffusers {family} model folder, not yet converted; make a checkpoint with "
            f"`edit-jax convert {family} {path} ckpt/{name}`")


def _diffusers_family(path: Path) -> str | None:
    """The family of a diffusers transformer folder, or of the pipeline folder holding one; None
    for other folders."""
    for folder in (path, path / "transformer"):
        try:
            name = json.loads((folder / CONFIG_FILE).read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if name in DIFFUSERS_CLASSES:
            return DIFFUSERS_CLASSES[name]
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking the folder is an edit-jax checkpoint."""
    path = resolve(path)
    meta_file = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if not meta_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not an edit-jax checkpoint (no {PARAMS_DIR}/ beside an edit-jax {CONFIG_FILE})"
                              + (run_dir_hint(path) or diffusers_hint(path)))
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file} is not readable JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_file} is not an edit-jax checkpoint config")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} is not one this edit-jax reads "
                              f"{READABLE_VERSIONS}")
    return meta


def load_config(path: str | Path):
    return _model_config(read_metadata(path))


def _model_config(meta: dict):
    """The model config of a checkpoint's config.json (before format 3: hidden channels in order)."""
    config = dict(meta["config"])
    if meta["version"] < 3:
        config.setdefault("width_groups", 1)
    return config_from_dict(meta["family"], config)


def tree_names(path: str | Path) -> list[str]:
    """The pytrees a checkpoint holds: "params", and "routers" when it has them."""
    return [n for n in (PARAMS_DIR, ROUTERS_DIR) if (resolve(path) / n).is_dir()]


@contextlib.contextmanager
def _reading(path: Path, what: str):
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


def _stored_metadata(path: Path, tree: str) -> dict:
    """The tree as stored, with (shape, dtype) leaves."""
    read_metadata(path)
    if not (path / tree).is_dir():
        raise CheckpointError(f"{path} has no {tree}/ tree")
    missing = missing_array_files(path, [tree])
    if missing:
        listed = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise CheckpointError(f"{path} is incomplete (array data missing):\n  {listed}")
    with _reading(path, f"{tree}/ metadata"):
        meta = ocp.metadata(path / tree).metadata
        if meta is None:  # orbax logs the cause and returns None
            raise ValueError(f"orbax found no readable tree metadata in {tree}/")
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), meta)


def format_1_joined(config) -> dict[str, list[tuple[str, int]]]:
    """{format-1 kernel: [(format-2 kernel, rows), ...] in row order} for a model config."""
    if config.family != "flux" or not config.num_single_layers:
        return {}
    stem = "single_transformer_blocks/proj_out"
    return {f"{stem}/kernel": [(f"{stem}/{name}", rows) for name, _, rows in proj_out_parts(config)]}


def _joined(path: Path, tree: str) -> dict[str, list[tuple[str, int]]]:
    """The kernels a params tree stores whole that the current format splits (format 1 only)."""
    meta = read_metadata(path)
    if meta["version"] != 1 or tree != PARAMS_DIR:
        return {}
    return format_1_joined(_model_config(meta))


def params_metadata(path: str | Path, tree: str = PARAMS_DIR) -> dict:
    """A stored tree with (shape, dtype) leaves, read without loading any array, in the current
    format's layout (a format-1 kernel listed as its parts)."""
    path = resolve(path)
    flat = flatten(_stored_metadata(path, tree))
    for whole, parts in _joined(path, tree).items():
        if whole in flat:
            shape, dtype = flat.pop(whole)
            flat.update({name: (shape[:-2] + (rows, shape[-1]), dtype) for name, rows in parts})
    return unflatten(flat)


def load_params(path: str | Path, abstract: dict, shardings=None, tree: str = PARAMS_DIR) -> dict:
    """Restores params into the structure, shapes and dtypes of `abstract` (ShapeDtypeStructs).

    shardings: None (default device), one jax.sharding.Sharding for every leaf, or a pytree of
    them matching the params. Arrays are read straight into their shardings (a format-1 kernel
    whole, then split into its parts' shardings).
    """
    path = resolve(path)
    _check_layout(path / tree, params_metadata(path, tree), abstract)
    shardings = _leaf_shardings(shardings, abstract)
    joined = _joined(path, tree)
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
    with _reading(path, f"{tree}/ arrays"):
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
    for whole, parts in _joined(path, tree).items():
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


def verify_arrays(path: str | Path, progress: bool = False) -> list[str]:
    """Reads every array of every tree, one at a time, and returns what is wrong (an unreadable
    array, non-finite values) as messages; empty when the checkpoint is sound."""
    from tqdm.auto import tqdm

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
