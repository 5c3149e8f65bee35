"""The conversion engine: check a source against a table, then stream it into a checkpoint.

Checking reads only tensor names and shapes (headers), so every missing key, unexpected key and
shape mismatch is reported at once, before anything is written. Writing builds one stacked
param at a time from per-layer tensors (memory-mapped, read once) and hands it to orbax in
groups of about `group_bytes`: peak memory is about one stacked tensor plus one group.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from edit_jax.checkpoint import check_destination, flatten, resolve, unflatten, write_checkpoint
from edit_jax.checkpoints_convert.tables import Src

MAX_LISTED = 20


class ConversionError(ValueError):
    """A source that does not match the table or the config; nothing was written."""


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {x}" for x in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _num_layers(src: Src, target) -> int | None:
    return target.shape[0] if src.stacked else None


def check(trees: dict[str, tuple[dict[str, Src], dict]], source, what: str = "checkpoint") -> None:
    """Raises ConversionError listing every missing key, unexpected key and shape mismatch.

    trees: name -> (table, abstract tree); the source must hold exactly the keys of all tables."""
    expected: set[str] = set()
    for table, abstract in trees.values():
        targets = flatten(abstract)
        if set(table) != set(targets):
            raise AssertionError(
                f"conversion table and model disagree: table-only {sorted(set(table) - set(targets))}, "
                f"model-only {sorted(set(targets) - set(table))}"
            )
        for path, src in table.items():
            expected.update(src.keys(_num_layers(src, targets[path])))
    present = set(source.keys())
    problems = []
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    mismatched = []
    for path, src, target in (
        (p, t[p], a) for t, abstract in trees.values() for p, a in flatten(abstract).items()
    ):
        want = tuple(target.shape[1:]) if src.stacked else tuple(target.shape)
        for key in src.keys(_num_layers(src, target)):
            if key not in present:
                continue
            dummy = np.broadcast_to(np.zeros((), np.float32), source.shape(key))
            try:
                got = src.apply(dummy).shape
            except ValueError as e:
                mismatched.append(f"{key} {source.shape(key)}: {e}")
                continue
            if tuple(got) != want:
                mismatched.append(f"{key} {source.shape(key)} -> {path} needs {want}, got {tuple(got)}")
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise ConversionError(
            f"{what} {source.description} does not match the model config:\n" + "\n".join(problems)
        )


_BLOCK = 256


def _fill(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src (converting the dtype). A transposed 2-D view (a PyTorch weight turned into
    our kernel) is copied in square blocks that stay in cache: numpy's element-strided copy of
    a whole transpose runs at a third of the speed."""
    if src.shape != dst.shape:
        raise ConversionError(f"a converted tensor has shape {src.shape}, expected {dst.shape}")
    if src.dtype == dst.dtype and src.dtype.kind == "V":  # ml_dtypes' floats: their bits copy faster
        unsigned = np.dtype(f"u{src.dtype.itemsize}")
        src, dst = src.view(unsigned), dst.view(unsigned)
    if src.ndim == 2 and not src.flags.c_contiguous and src.T.flags.c_contiguous:
        for i in range(0, src.shape[0], _BLOCK):
            for j in range(0, src.shape[1], _BLOCK):
                dst[i : i + _BLOCK, j : j + _BLOCK] = src[i : i + _BLOCK, j : j + _BLOCK]
    else:
        dst[...] = src


# 2-byte floats: a value is NaN or infinite exactly when all its exponent bits are set. Testing the
# bits in cache-sized chunks is several times faster than isfinite on a float32 copy (bfloat16 has
# no native ufunc).
_EXPONENT_BITS = {np.dtype(ml_dtypes.bfloat16): np.uint16(0x7F80), np.dtype(np.float16): np.uint16(0x7C00)}
_CHUNK = 1 << 16


def _count_non_finite(values: np.ndarray) -> int:
    if values.dtype in _EXPONENT_BITS:
        exponent, bits = _EXPONENT_BITS[values.dtype], values.reshape(-1).view(np.uint16)
        buffer, bad = np.empty(min(_CHUNK, bits.size), np.uint16), 0
        for start in range(0, bits.size, _CHUNK):
            chunk = buffer[: min(_CHUNK, bits.size - start)]
            np.bitwise_and(bits[start : start + _CHUNK], exponent, out=chunk)
            if chunk.max(initial=0) == exponent:
                bad += int(np.count_nonzero(chunk == exponent))
        return bad
    finite = np.isfinite(values if values.dtype.kind == "f" else values.astype(np.float32))
    return int(values.size - np.count_nonzero(finite))


def _check_finite(values: np.ndarray, key: str, path: str) -> None:
    """Raises ConversionError naming the source tensor when it holds a NaN or an infinity."""
    if values.dtype.kind in "iub":
        return
    bad = _count_non_finite(values)
    if bad:
        raise ConversionError(f"source tensor {key!r} (-> {path}) holds {bad} non-finite values (NaN or inf): "
                              "the file is damaged or was saved from a diverged model; nothing was written")


def _build(src: Src, source, target, dtype: np.dtype, path: str = "") -> np.ndarray:
    out = np.empty(target.shape, dtype)
    for i, key in enumerate(src.keys(target.shape[0] if src.stacked else None)):
        part = out[i] if src.stacked else out
        _fill(part, src.apply(source.get(key)))
        _check_finite(part, key, path)
    return out


def build_params(table: dict[str, Src], source, abstract: dict) -> dict:
    """Checks, then builds the whole params tree in memory (small models, benchmarks)."""
    check({"params": (table, abstract)}, source)
    targets = flatten(abstract)
    return unflatten({p: _build(table[p], source, targets[p], np.dtype(targets[p].dtype), p) for p in table})


def stream_params(table, source, abstract, group_bytes: int, progress: bool, desc: str = "params"):
    """Yields nested param sub-trees of about `group_bytes` each, built one tensor at a time, in
    the dtypes of `abstract`.

    Args:
      table: the conversion table. source: the opened weights. abstract: the params' shapes and
        dtypes. group_bytes: above. progress: show progress. desc: the progress bar's label.
    """
    targets = flatten(abstract)
    total = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in targets.values())
    group, size = {}, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for path in sorted(table):
            group[path] = _build(table[path], source, targets[path], np.dtype(targets[path].dtype), path)
            size += group[path].nbytes
            bar.update(group[path].nbytes)
            if size >= group_bytes:
                yield unflatten(group)
                group, size = {}, 0
        if group:
            yield unflatten(group)


def convert_source(
    trees: dict[str, tuple[dict[str, Src], dict]],
    source,
    config,
    dst: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    group_bytes: int = 64 << 20,
    extra: dict | None = None,
    protect=(),
) -> Path:
    """Checks `source` against every (table, abstract) tree, then writes the checkpoint `dst`
    atomically; abstract trees (ShapeDtypeStructs) give the shapes and the dtypes to store.
    Every converted tensor must be finite. `protect`: paths `dst` must not overlap (the source).

    Args:
      trees: {tree name: (table, abstract)}. source: the opened weights. config: the model
        config. dst: the checkpoint to write. overwrite: replace an edit-jax checkpoint there.
      progress: show progress. group_bytes: as `stream_params`'s. extra: more config.json keys.
      protect: above.
    """
    check_destination(resolve(dst), overwrite, protect)
    check(trees, source)
    groups = {
        name: stream_params(table, source, abstract, group_bytes, progress, name)
        for name, (table, abstract) in trees.items()
    }
    return write_checkpoint(dst, config, groups, overwrite=overwrite, extra=extra, protect=protect)
