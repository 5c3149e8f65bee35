"""Hunyuan3D-2 conversion tables: hy3dgen's `Hunyuan3DDiT` and `ShapeVAE` state dicts (the
release file's `model.*` and `vae.*` tensors, prefixes stripped).

The DiT's blocks are BFL FLUX's, under the same names (fused qkv and linear1, the final adaLN as
(shift, scale)); only the embedders differ: `latent_in` and `cond_in` for FLUX's `img_in` and
`txt_in`, and no pooled `vector_in`. The ShapeVAE's modules carry hy3dgen's names with "_N" for
its one list (`resblocks_3`).
"""

from __future__ import annotations

import re

from edit_jax.checkpoint import flatten
from edit_jax.checkpoints_convert.flux import bfl_table
from edit_jax.checkpoints_convert.tables import Src, transpose
from edit_jax.config import Hunyuan3DConfig

RELEASE_PREFIX = "model."
EMBEDDERS = {"img_in.": "latent_in.", "txt_in.": "cond_in."}  # BFL FLUX's -> hy3dgen's


def dit_table(cfg: Hunyuan3DConfig) -> dict[str, Src]:
    """Our params <- Hunyuan3DDiT's state dict."""
    table = {}
    for ours, src in bfl_table(cfg).items():
        if ours.startswith("time_text_embed/text_embedder/"):
            continue  # FLUX's pooled vector; Hunyuan3D-2 has none
        key = next((new + src.key[len(old):] for old, new in EMBEDDERS.items() if src.key.startswith(old)), src.key)
        table[ours] = Src(key, src.transforms, src.offset)
    return table


LEAVES = {"kernel": ("weight", (transpose,)), "scale": ("weight", ()), "bias": ("bias", ())}  # Dense, LayerNorm


def shape_vae_table(abstract: dict) -> dict[str, Src]:
    """Our ShapeVAE params <- hy3dgen ShapeVAE's state dict, for every leaf of `abstract`."""
    table = {}
    for path in flatten(abstract):
        *modules, leaf = path.split("/")
        name, transforms = LEAVES[leaf]
        key = ".".join(re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", m) for m in modules)
        table[path] = Src(f"{key}.{name}", transforms)
    return table
