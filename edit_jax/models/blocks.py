"""The MMDiT dual-stream block shared by FLUX double blocks and Qwen-Image blocks, elastic-ready.

Image and text streams have their own AdaLN modulation and MLP and meet in one joint attention.
Under E-DiT the router reads the block's input tokens [text, image] (padded text left out) and
its temb; the elastic MLP is the image one.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from edit_jax.config import WIDTH_BUCKETS, RuntimeConfig
from edit_jax.elastic.mechanism import ElasticConfig, elastic_step
from edit_jax.elastic.router import Router
from edit_jax.layers import (MLP, TOKENS, JointAttention, Modulation, constrain, layer_norm, modulate, modulation_chunks,
                             per_token, split_modulation)


class DualStreamBlock(nn.Module):
    """carry (txt [B, T, D], img [B, N, D]) -> (same, outputs); temb [B, D]; cos/sin [T + N, K];
    key_mask [B, T + N] or None; per_layer: this block's forced decisions and cache (see
    `elastic_step`) and, computed ahead, its modulations ({"modulation": {name: [B, 6D]}},
    `modulations_ahead`); step: the denoising step index.

    `names` gives the submodules their family's diffusers names: (image modulation, text
    modulation, image MLP, text MLP). reference_from: the first image token of the reference
    images (Qwen-Image-Edit-2511's zero_cond_t), modulated from temb at t = 0 (the modulation
    "<image modulation>_reference" computed ahead) instead of the block's own temb.
    """

    num_heads: int
    head_dim: int
    mlp_hidden_dim: int
    activation: str
    runtime: RuntimeConfig
    names: tuple[str, str, str, str]
    router_hidden: int = 128
    width_buckets: tuple[float, ...] = WIDTH_BUCKETS
    elastic: ElasticConfig | None = None
    width_groups: int = 1  # how the image MLP's hidden channels are stored (`layers.channel_ranks`)
    reference_from: int | None = None

    def setup(self):
        rt = self.runtime
        img_mod, txt_mod, img_mlp, txt_mlp = self.names
        setattr(self, img_mod, Modulation(6, rt))
        setattr(self, txt_mod, Modulation(6, rt))
        self.attn = JointAttention(self.num_heads, self.head_dim, rt)
        setattr(self, img_mlp, MLP(self.mlp_hidden_dim, self.activation, rt, self.width_groups))
        setattr(self, txt_mlp, MLP(self.mlp_hidden_dim, self.activation, rt))
        self.router = Router(self.router_hidden, len(self.width_buckets), rt)

    def forward(self, carry, temb, cos, sin, key_mask, width=None, hidden_mask=None, modulations=None):
        """The block itself; the image MLP keeps its first `width` hidden channels.

        Args:
          carry: (txt [B, T, D], img [B, N, D]). temb: [B, D]. cos, sin: [T + N, K] RoPE tables.
          key_mask: [B, T + N] or None. width: hidden channels kept (None: all). hidden_mask: [B, width]
            or None. modulations: this layer's modulations computed ahead, or None.
        """
        img_mod, txt_mod, img_mlp, txt_mlp = (getattr(self, n) for n in self.names)
        given = modulations or {}
        txt, img = (constrain(x, TOKENS) for x in carry)
        img_chunks = modulation_chunks(img_mod, temb, given.get(self.names[0]), 6)
        reference = given.get(self.names[0] + "_reference")
        if self.reference_from is not None and reference is not None:
            img_chunks = [split_modulation(own, ref, self.reference_from, img.shape[1])
                          for own, ref in zip(img_chunks, jnp.split(reference, 6, axis=-1))]
        shift1, scale1, gate1, shift2, scale2, gate2 = img_chunks
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = modulation_chunks(
            txt_mod, temb, given.get(self.names[1]), 6)

        img_attn, txt_attn = self.attn(
            modulate(layer_norm(img), shift1, scale1), modulate(layer_norm(txt), c_shift1, c_scale1), cos, sin, key_mask
        )
        img = img + per_token(gate1) * img_attn
        img_ff = img_mlp(modulate(layer_norm(img), shift2, scale2), width, hidden_mask)
        img = img + per_token(gate2) * img_ff

        txt = txt + c_gate1[:, None] * txt_attn
        txt_ff = txt_mlp(modulate(layer_norm(txt), c_shift2, c_scale2))
        txt = txt + c_gate2[:, None] * txt_ff
        return constrain(txt, TOKENS), constrain(img, TOKENS)

    def __call__(self, carry, per_layer, temb, cos, sin, key_mask, step):
        txt, img = carry
        txt_valid = None if key_mask is None else key_mask[:, : txt.shape[1]]

        modulations = per_layer.get("modulation")

        def body(mdl, c, width, hidden_mask):
            return mdl.forward(c, temb, cos, sin, key_mask, width, hidden_mask, modulations)

        return elastic_step(
            self, body, carry, [(txt, txt_valid), (img, None)], temb,
            self.mlp_hidden_dim, self.width_buckets, self.elastic, per_layer, step, self.width_groups,
        )
