"""FLUX.1's VAE: our Flax AutoencoderKL params <-> diffusers' AutoencoderKL state dict.

Our module names are diffusers' with "_N" for a list index ("down_blocks_0/resnets_1/conv1"
<-> "down_blocks.0.resnets.1.conv1"), so the table is built by one renaming rule per kind of
leaf, and reads both ways (every transform has its inverse).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from checkpoints_convert.tables import Src, transpose
from edit_jax.checkpoint import flatten


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def _conv_weight(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (3, 2, 0, 1))


conv_kernel.inverse = _conv_weight

LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}  # our leaf name -> diffusers'


def diffusers_key(path: str) -> str:
    """"decoder/up_blocks_0/upsamplers_0/conv/kernel" -> "decoder.up_blocks.0.upsamplers.0.conv.weight"."""
    *modules, leaf = path.split("/")
    return ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in modules) + "." + LEAVES[leaf]


def vae_table(abstract: dict) -> dict[str, Src]:
    """Our params <- diffusers AutoencoderKL, for every leaf of `abstract` (our param tree)."""
    table = {}
    for path, leaf in flatten(abstract).items():
        transforms = {4: (conv_kernel,), 2: (transpose,)}.get(len(leaf.shape), ())
        table[path] = Src(diffusers_key(path), transforms if path.endswith("kernel") else ())
    return table


def load_vae(folder: str | Path, dtype: str = "float32"):
    """(config, params) from a diffusers VAE folder (config.json + weights), checked against the
    config first: every missing, unexpected or mis-shaped tensor is named in one error."""
    import jax

    from checkpoints_convert.engine import build_params
    from checkpoints_convert.sources import SourceError, open_source
    from edit_jax.checkpoint import resolve
    from edit_jax.vae import AutoencoderKL, AutoencoderKLConfig

    folder = resolve(folder)
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder} is not a diffusers VAE folder: no config.json")
    config = AutoencoderKLConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    size = 2 * config.downscale
    images = jax.ShapeDtypeStruct((1, config.in_channels, size, size), np.float32)
    abstract = jax.eval_shape(lambda x: AutoencoderKL(config).init(jax.random.key(0), x), images)["params"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype)), abstract)
    source = open_source(folder)
    return config, build_params(vae_table(abstract), source, abstract)
