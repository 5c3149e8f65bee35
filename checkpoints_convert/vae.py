"""The VAEs: our Flax params <-> diffusers' state dicts, for FLUX.1's AutoencoderKL and
Qwen-Image's AutoencoderKLQwenImage.

Our module names are diffusers' with "_N" for a list index ("down_blocks_0/resnets_1/conv1"
<-> "down_blocks.0.resnets.1.conv1"), so a table is built by one renaming rule per kind of
leaf, and reads both ways (every transform has its inverse).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edit_jax.checkpoints_convert.engine import build_params
from edit_jax.checkpoints_convert.sources import SourceError, open_source
from edit_jax.checkpoints_convert.tables import Src, transpose
from edit_jax.checkpoint import flatten, resolve
from edit_jax.config import read_json_object
from edit_jax.models.qwen_image_vae import AutoencoderKLQwenImageConfig
from edit_jax.models.vae import AutoencoderKLConfig, abstract_vae


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


conv_kernel.inverse = lambda k: np.transpose(k, (3, 2, 0, 1))


def conv3d_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv3d weight [out, in, kt, kh, kw] -> our kernel [kt, kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 4, 1, 0))


conv3d_kernel.inverse = lambda k: np.transpose(k, (4, 3, 0, 1, 2))


def channel_vector(source_ndim: int):
    """A per-channel parameter stored broadcastable ([C, 1, 1(, 1)]) -> our [C]."""

    def squeeze(w: np.ndarray) -> np.ndarray:
        return np.reshape(w, (-1,))

    squeeze.inverse = lambda g: g.reshape(g.shape[0], *(1,) * (source_ndim - 1))
    squeeze.__name__ = f"channel_vector[{source_ndim}d]"
    return squeeze


LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}  # our leaf name -> diffusers'
KERNELS = {5: (conv3d_kernel,), 4: (conv_kernel,), 2: (transpose,)}  # by our kernel's rank


def diffusers_key(path: str) -> str:
    """"decoder/up_blocks_0/upsamplers_0/conv/kernel" -> "decoder.up_blocks.0.upsamplers.0.conv.weight"."""
    *modules, leaf = path.split("/")
    return ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in modules) + "." + LEAVES[leaf]


def _transforms(path: str, shape: tuple) -> tuple:
    module, leaf = path.split("/")[-2:]
    if leaf == "kernel":
        return KERNELS.get(len(shape), ())
    if leaf == "gamma":  # QwenImageRMS_norm: [C, 1, 1] in attention blocks (images), else [C, 1, 1, 1]
        return (channel_vector(3 if module == "norm" else 4),)
    return ()


def vae_table(abstract: dict) -> dict[str, Src]:
    """Our params <- diffusers' VAE state dict, for every leaf of `abstract` (our param tree)."""
    return {path: Src(diffusers_key(path), _transforms(path, leaf.shape)) for path, leaf in flatten(abstract).items()}


def vae_config(config: dict):
    """Our config from a diffusers vae/config.json dict, by its `_class_name`."""
    kinds = {"AutoencoderKL": AutoencoderKLConfig, "AutoencoderKLQwenImage": AutoencoderKLQwenImageConfig}
    name = config.get("_class_name", "AutoencoderKL")
    if name not in kinds:
        raise ValueError(f"vae class {name!r} is not supported (only {', '.join(kinds)})")
    return kinds[name].from_diffusers(config)


def load_vae(folder: str | Path, dtype: str = "float32"):
    """(config, params) from a diffusers VAE folder (config.json + weights), checked against the
    config first: every missing, unexpected or mis-shaped tensor is named in one error."""
    import jax

    folder = resolve(folder)
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a diffusers VAE folder: no config.json")
    config = vae_config(read_json_object(folder / "config.json"))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype)), abstract_vae(config))
    return config, build_params(vae_table(abstract), open_source(folder), abstract)
