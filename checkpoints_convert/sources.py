"""Readers for PyTorch weight files that hand out one tensor at a time as NumPy.

Safetensors files are memory-mapped with NumPy (no torch needed; bfloat16 via ml_dtypes): a
tensor's bytes are only read when it is asked for, and the mapping is dropped right after.
`.bin`/`.pt` pickles need torch (the `torch` extra) and are memory-mapped by torch.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from edit_jax.config import DIFFUSERS_CLASSES, ConfigError, read_json_object

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


ROUTERS_FILE = "routers.safetensors"  # beside a diffusers export's weights: what diffusers' model has no place for


class SourceError(ValueError):
    """A weight source that cannot be read: missing files, bad headers, unknown dtypes."""


class SafetensorsFile:
    """One .safetensors file: header parsed once, tensors memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if 8 + header_len > size:
                    raise SourceError(f"{self.path} is not a safetensors file: its first 8 bytes announce a "
                                      f"{header_len}-byte header, but the file has {size} bytes")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{self.path} is not a readable safetensors file: {e}") from e
        if not isinstance(header, dict) or not all(
            isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v) for k, v in header.items() if k != "__metadata__"
        ):
            raise SourceError(f"{self.path} is not a safetensors file: its header is not a table of tensors")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = header
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if self._data_start + end > size:
            raise SourceError(f"{self.path} is truncated: its header needs {self._data_start + end} bytes, "
                              f"the file has {size} (an interrupted download or copy?)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        code = self._entries[key]["dtype"]
        if code not in _SAFETENSORS_DTYPES:
            raise SourceError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def get(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor."""
        begin, end = self._entries[key]["data_offsets"]
        shape, dtype = self.shape(key), self.dtype(key)
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise SourceError(f"{self.path}: tensor {key!r} byte range does not match shape {shape} {dtype}")
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def _flat(state: dict, prefix: str = "") -> dict:
    """A nested state dict ({"model": {...}, "vae": {...}}, Hunyuan3D-2's .ckpt) as one flat dict
    with "."-joined keys."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TorchFile:
    """A torch pickle (.bin/.pt/.pth), loaded with mmap so tensors stay on disk until read."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise SourceError(
                f"{path} is a torch pickle; reading it needs torch (pip install 'edit-jax[torch]'), "
                "or convert it to safetensors first"
            ) from e
        self.path = Path(path)
        state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        self._tensors = _flat(state.get("state_dict", state) if isinstance(state, dict) else state)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        import torch

        t = self._tensors[key]
        return np.dtype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy().dtype

    def get(self, key: str) -> np.ndarray:
        import torch

        t = self._tensors[key].detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


class Source:
    """All tensors of a checkpoint that may span several files (a sharded diffusers folder)."""

    def __init__(self, files: list, description: str, folder: Path | None = None):
        self.description = description
        self.folder = folder
        self._where: dict[str, tuple[object, str]] = {}
        for f in files:
            for key in f.keys():
                if key in self._where:
                    raise SourceError(f"tensor {key!r} appears in both {self._where[key][0].path} and {f.path}")
                self._where[key] = (f, key)

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of its files, merged; a SourceError where two files disagree."""
        merged: dict[str, str] = {}
        for f, _ in self._where.values():
            for k, v in getattr(f, "metadata", {}).items():
                if merged.setdefault(k, v) != v:
                    raise SourceError(f"{self.description}: its files disagree on the metadata {k!r} ({merged[k]!r} "
                                      f"and {v!r} in {f.path})")
        return merged

    def strip_prefix(self, prefix: str) -> None:
        """Drops `prefix` from every key that has it (BFL's `model.diffusion_model.`)."""
        self._where = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in self._where.items()}

    def keys(self) -> list[str]:
        return list(self._where)

    def drop_prefix(self, prefix: str) -> int:
        """Leaves out every tensor whose key starts with `prefix`; returns how many."""
        dropped = [k for k in self._where if k.startswith(prefix)]
        for k in dropped:
            del self._where[k]
        return len(dropped)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._where[key]
        return f.shape(k)

    def dtype(self, key: str) -> np.dtype:
        f, k = self._where[key]
        return f.dtype(k)

    def get(self, key: str) -> np.ndarray:
        f, k = self._where[key]
        return f.get(k)


class StateDictFile:
    """An in-memory PyTorch state dict (name -> tensor) seen as a source file."""

    def __init__(self, state_dict: dict, name: str = "<state dict>"):
        self.path = name
        self._tensors = state_dict

    keys = TorchFile.keys
    shape = TorchFile.shape
    dtype = TorchFile.dtype
    get = TorchFile.get


def from_state_dict(state_dict: dict, config_folder: Path | None = None) -> Source:
    """A Source over an in-memory torch state dict (benchmarks, tests, notebooks)."""
    return Source([StateDictFile(state_dict)], "<state dict>", config_folder)


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchFile(path)
    raise SourceError(f"{path}: unknown weight file type (expected .safetensors, .bin, .pt, .pth or .ckpt)")


def _model_config_folder(folder: Path) -> Path | None:
    """The folder of a single weight file when its config.json may be the model's: a diffusers
    config of a model we convert, or one that cannot be read (the conversion then says why);
    None when there is none or it is another's (a BFL or release file beside other things)."""
    if not (folder / "config.json").is_file():
        return None
    try:
        return folder if read_json_object(folder / "config.json").get("_class_name") in DIFFUSERS_CLASSES else None
    except ConfigError:
        return folder


def open_source(path: str | Path) -> Source:
    """Opens a weight file, or a folder holding one (or a sharded set with its index.json, and the
    routers.safetensors an edit-jax export writes beside it).

    A diffusers model folder may be given as the pipeline root: its `transformer/` is used.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"no such file or folder: {path}")
    if path.is_file():
        return Source([_open_file(path)], str(path), _model_config_folder(path.parent))
    if (path / "transformer").is_dir() and not any(path.glob("*.safetensors*")):
        path = path / "transformer"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise SourceError(f"{path} holds several safetensors indexes: {[i.name for i in indexes]}")
    if indexes:
        weight_map = read_json_object(indexes[0]).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise SourceError(f"{indexes[0]} lists shards that are not in {path}: {missing}")
        if (path / ROUTERS_FILE).is_file() and ROUTERS_FILE not in shards:  # an edit-jax export's routers
            shards.append(ROUTERS_FILE)
        return Source([SafetensorsFile(path / s) for s in shards], str(path), path)
    files = sorted(path.glob("*.safetensors")) or sorted(
        p for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext)
    )
    if not files:
        raise SourceError(f"{path} holds no .safetensors (or .bin/.pt/.ckpt) weight files")
    return Source([_open_file(f) for f in files], str(path), path)
