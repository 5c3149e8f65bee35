"""Hunyuan3D-2 shape DiT conversion table: hy3dgen's `Hunyuan3DDiT` state dict (the release's
`model.*` tensors, prefix stripped).

Its blocks are BFL FLUX's, under the same names (fused qkv and linear1, the final adaLN as
(shift, scale)); only the embedders differ: `latent_in` and `cond_in` for FLUX's `img_in` and
`txt_in`, and no pooled `vector_in`.
"""

from __future__ import annotations

from edit_jax.checkpoints_convert.flux import bfl_table
from edit_jax.checkpoints_convert.tables import Src
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
