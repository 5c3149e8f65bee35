"""Qwen-Image transformer (diffusers `QwenImageTransformer2DModel`) as a pure Flax Linen module.

    model = QwenImageTransformer(config)
    velocity = model.apply({"params": params}, hidden_states, encoder_hidden_states,
                           encoder_hidden_states_mask, timestep, img_shapes=(1, h, w))

The 60 dual-stream blocks run under `nn.scan`. Param names follow diffusers'
(`transformer_blocks/img_mod/linear` is `transformer_blocks.{i}.img_mod.1`; `img_mlp/fc1`,
`img_mlp/fc2` are `img_mlp.net.0.proj`, `img_mlp.net.2`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models.blocks import DualStreamBlock
from edit_jax.config import QwenImageConfig
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.models.elastic_stacks import Stack, block_elastic, run_stacks, stack_inputs, step_aux
from edit_jax.models.family import ElasticMLP, ModelFamily
from edit_jax.layers import (
    Linear,
    Modulation,
    RMSNorm,
    TimestepEmbedding,
    check_timestep,
    check_values,
    dtype_of,
    layer_norm,
    modulate,
    rope_frequencies,
    scan_blocks,
    stacked_modulation,
    timestep_embedding,
)

QWEN_BLOCK_NAMES = ("img_mod", "txt_mod", "img_mlp", "txt_mlp")  # diffusers' names


def qwen_rope_positions(segments: tuple[tuple[int, int, int], ...], num_txt: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen's centred RoPE positions: (text [T, 3], image [sum of F*H*W, 3]) as float32 constants.

    segments: the images of a sample in token order, (frames, height, width) each (see
    `normalize_img_shapes`). Image rows/columns are centred: the top/left half gets negative
    positions (-(h - h//2) .. h//2 - 1); segment i's frames start at position i. Text positions
    start after the largest half-size of any segment and repeat the same index on all three axes.
    """
    parts = []
    for index, (frames, height, width) in enumerate(segments):
        f, h, w = np.meshgrid(
            np.arange(frames) + index, np.arange(height) - (height - height // 2), np.arange(width) - (width - width // 2),
            indexing="ij",
        )
        parts.append(np.stack([f.ravel(), h.ravel(), w.ravel()], axis=-1))
    start = max(max(height // 2, width // 2) for _, height, width in segments)
    txt = np.repeat(np.arange(start, start + num_txt)[:, None], 3, axis=1)
    return txt.astype(np.float32), np.concatenate(parts).astype(np.float32)


def _triple(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and len(x) == 3 and all(isinstance(v, (int, np.integer)) for v in x)


def _segments(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_triple(s) for s in x)


def normalize_img_shapes(img_shapes, batch: int) -> tuple[tuple[int, int, int], ...]:
    """The images every sample's tokens hold, in order: ((frames, height, width), ...) in packed
    units. img_shapes: one (f, h, w); the images of every sample [(f, h, w), ...] (Qwen-Image-Edit:
    the image generated, then the reference images); or diffusers' per-sample list
    [[(f, h, w), ...], ...] of B equal entries."""
    def ints(segments):
        return tuple(tuple(int(v) for v in s) for s in segments)

    if _triple(img_shapes):
        return ints([img_shapes])
    if _segments(img_shapes):
        return ints(img_shapes)
    if isinstance(img_shapes, (list, tuple)) and len(img_shapes) == batch and all(_segments(s) for s in img_shapes):
        per_sample = {ints(s) for s in img_shapes}
        if len(per_sample) == 1:
            return per_sample.pop()
    raise ValueError(f"img_shapes {img_shapes!r}: give one (frames, height, width), the images of every sample "
                     f"[(f, h, w), ...], or diffusers' per-sample list of {batch} equal [(f, h, w), ...]")


def image_tokens(segments) -> int:
    """The image tokens of `normalize_img_shapes`'s segments."""
    return sum(int(np.prod(s)) for s in segments)


class QwenTimestepEmbedding(nn.Module):
    """temb [B, D] from timestep [B] in [0, 1] (sinusoid of 1000 t, then two linears)."""

    config: QwenImageConfig

    @nn.compact
    def __call__(self, timestep):
        cfg, rt = self.config, self.config.runtime
        sinusoid = timestep_embedding(timestep, scale=1000.0).astype(dtype_of(rt.dtype))
        return TimestepEmbedding(cfg.inner_dim, "freq", rt, name="timestep_embedder")(sinusoid)


BLOCK_STACKS = ("transformer_blocks",)
BLOCK_MODULATIONS = {"transformer_blocks": QWEN_BLOCK_NAMES[:2]}


def time_embedding(config: QwenImageConfig, params: dict, timestep, **_) -> jax.Array:
    """temb [B, D] as the model computes it, from its params alone (the conditions ignored)."""
    return QwenTimestepEmbedding(config).apply({"params": params["time_text_embed"]}, timestep)


class QwenImageTransformer(nn.Module):
    """Qwen-Image velocity model.

    Args (as diffusers' QwenImageTransformer2DModel):
      hidden_states: [B, N, in_channels] latents packed 2x2 (N = frames * height * width).
      encoder_hidden_states: [B, T, joint_attention_dim] text encoder states.
      encoder_hidden_states_mask: [B, T], 1 for valid tokens (any pattern), or None (all valid).
      timestep: [B] in [0, 1].
      img_shapes: static (frames, height, width) in packed units; for several images in one sequence
        (Qwen-Image-Edit: the image generated, then the references) a list of them, or diffusers'
        per-sample list (`normalize_img_shapes`).
    Returns the velocity [B, N, patch_size**2 * out_channels].
    """

    config: QwenImageConfig

    @nn.compact
    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        encoder_hidden_states_mask,
        timestep,
        img_shapes,
        elastic: ElasticConfig | None = None,
        decisions: dict | None = None,
        cache: dict | None = None,
        step=None,
        router_modulations=None,
        block_modulations=None,
        step_cache=None,
    ):
        """elastic: None or mode "dense" returns the velocity; any other mode (or a step cache)
        returns (velocity, aux) with p, q, executed, cache_hit, bucket over the blocks and the step's FLOPs.
        decisions: {"run" or "p", "bucket"} [L] or [B, L] for mode "forced". cache: the block
        cache (`edit_jax.models.init_cache`), returned updated as aux["cache"]; step: the denoising step index.
        router_modulations: the routers' temb-only modulation for these inputs, computed ahead
        (`edit_jax.models.router_modulations`); None computes it here. block_modulations: the
        blocks' AdaLN modulations for these inputs, computed ahead (`edit_jax.models.block_modulations`);
        None computes them here. step_cache: the state of `elastic.step_cache`
        (`edit_jax.models.init_step_cache`), returned updated as aux["step_cache"]."""
        cfg, rt = self.config, self.config.runtime
        segments = check_qwen_inputs(cfg, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes)
        elastic, decisions = block_elastic(elastic, decisions, cfg)
        dtype = dtype_of(rt.dtype)
        batch, num_img = hidden_states.shape[:2]
        num_txt = encoder_hidden_states.shape[1]

        img = Linear(cfg.inner_dim, ("channels", "embed"), rt, name="img_in")(hidden_states.astype(dtype))
        txt = RMSNorm("text_embed", rt, name="txt_norm")(encoder_hidden_states.astype(dtype))
        txt = Linear(cfg.inner_dim, ("text_embed", "embed"), rt, name="txt_in")(txt)
        embed_time = QwenTimestepEmbedding(cfg, name="time_text_embed")
        temb = embed_time(timestep)
        # zero_cond_t: the reference images (every image after the first) are modulated as at t = 0
        reference_from = int(np.prod(segments[0])) if cfg.zero_cond_t and len(segments) > 1 else None
        txt_pos, img_pos = qwen_rope_positions(segments, num_txt)
        cos, sin = rope_frequencies(jnp.asarray(np.concatenate([txt_pos, img_pos])), cfg.axes_dims_rope)
        key_mask = None
        if encoder_hidden_states_mask is not None:
            key_mask = jnp.concatenate(
                [encoder_hidden_states_mask.astype(bool), jnp.ones((batch, num_img), bool)], axis=1
            )

        def reference_modulation(modulations):  # zero_cond_t: the reference images' modulation at t = 0
            at_zero = embed_time(jnp.zeros_like(timestep))
            reference = stacked_modulation(self.variables["params"]["transformer_blocks"]["img_mod"], at_zero, dtype)
            return [{**modulations[0], "img_mod_reference": reference}]

        lazy, per_stack = stack_inputs(
            self, BLOCK_STACKS, BLOCK_MODULATIONS, elastic, decisions, cache, temb, batch, router_modulations,
            block_modulations, reference_modulation if reference_from is not None else None,
        )

        blocks = scan_blocks(DualStreamBlock, cfg.num_layers, rt, 5, lazy)(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            cfg.mlp_hidden_dim,
            cfg.activation,
            rt,
            QWEN_BLOCK_NAMES,
            cfg.router_hidden,
            cfg.width_buckets,
            elastic,
            width_groups=cfg.width_groups,
            reference_from=reference_from,
            name="transformer_blocks",
        )
        step = jnp.asarray(0 if step is None else step, jnp.int32)
        (txt, img), (block_out,), step_out = run_stacks(
            [Stack(lambda carry, per_layer: blocks(carry, per_layer, temb, cos, sin, key_mask, step))],
            (txt, img), per_stack, (cfg.num_layers,), lazy, elastic, step_cache, step)

        scale, shift = Modulation(2, rt, name="norm_out")(temb)  # diffusers' AdaLayerNormContinuous
        img = modulate(layer_norm(img), shift, scale)
        velocity = Linear(cfg.output_channels, ("embed", "channels"), rt, name="proj_out")(img)
        if block_out is None:
            return velocity
        return velocity, step_aux(cfg, BLOCK_STACKS, elastic, [block_out], cache, num_img, num_txt, step_out)


def check_qwen_inputs(cfg, hidden_states, encoder_hidden_states, mask, timestep, img_shapes) -> tuple[tuple[int, int, int], ...]:
    """Raises ValueError naming the first input that does not fit; returns the image segments.

    Args:
      cfg: the Qwen-Image config. hidden_states, encoder_hidden_states, mask, timestep,
        img_shapes: the model's inputs (`QwenImageTransformer`; mask its encoder_hidden_states_mask).
    """
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}, expected [B, N, {cfg.in_channels}]")
    batch, num_img = hidden_states.shape[:2]
    segments = normalize_img_shapes(img_shapes, batch)
    if image_tokens(segments) != num_img:
        shown = segments[0] if len(segments) == 1 else list(segments)
        raise ValueError(f"img_shapes {shown} hold {image_tokens(segments)} tokens but hidden_states has {num_img}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or (
        encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
    ):
        raise ValueError(
            f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}, "
            f"expected [{batch}, T, {cfg.joint_attention_dim}]"
        )
    if mask is not None and mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(
            f"encoder_hidden_states_mask has shape {tuple(mask.shape)}, expected {tuple(encoder_hidden_states.shape[:2])}"
        )
    if timestep.shape != (batch,):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}, expected [{batch}]")
    check_timestep(timestep)
    check_values("encoder_hidden_states_mask", mask, lambda m: np.all(m.sum(axis=-1) > 0),
                 "1 for at least one text token in every row (a row of zeros hides the whole prompt)")
    return segments


def example_inputs(config: QwenImageConfig, rng: np.random.Generator, batch: int, height: int, width: int,
                   num_txt: int) -> dict:
    """Random model inputs (float32; the text mask all valid) for height x width packed tokens.

    Args:
      config: the Qwen-Image config. rng: a numpy Generator. batch: B. height, width: packed
        tokens per side. num_txt: T.
    """
    return dict(
        hidden_states=jnp.asarray(rng.standard_normal((batch, height * width, config.in_channels)), jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, num_txt, config.joint_attention_dim)), jnp.float32),
        encoder_hidden_states_mask=jnp.ones((batch, num_txt), jnp.int32),
        timestep=jnp.asarray(rng.uniform(0.05, 0.95, (batch,)), jnp.float32),
        **positions(config, height, width, num_txt),
    )


def positions(config: QwenImageConfig, rows: int, cols: int, num_txt: int) -> dict:
    """The static img_shapes (1, rows, cols); the text positions follow from them.

    Args:
      config: the Qwen-Image config. rows, cols: the grid of packed tokens. num_txt: T (unused:
        the text positions follow from img_shapes).
    """
    return {"img_shapes": (1, int(rows), int(cols))}


def prompt_extras(config: QwenImageConfig, batch: int, num_txt: int) -> dict:
    """The text mask [B, T] (int32, 1 = valid) beside the prompt embeddings."""
    return {"encoder_hidden_states_mask": ((batch, num_txt), np.int32)}


def check_positions(config: QwenImageConfig, cond: dict, num_tokens: int, batch: int) -> str | None:
    """What is wrong with cond's img_shapes for num_tokens image tokens (None: nothing).

    Args:
      config: the Qwen-Image config. cond: the sampler's conditions. num_tokens: image tokens per
        row (the latents' and any reference images'). batch: rows.
    """
    shape = getattr(cond["img_shapes"], "value", cond["img_shapes"])  # a sampler's `Static` or the value
    tokens = image_tokens(normalize_img_shapes(shape, batch))
    return None if tokens == num_tokens else f"img_shapes {shape} has {tokens}"


def cache_carries(config: QwenImageConfig, batch: int, num_img: int, num_txt: int) -> dict:
    """A block's carry (txt, img).

    Args:
      config: the Qwen-Image config. batch: B. num_img, num_txt: image and text tokens per row.
    """
    d = config.inner_dim
    return {"transformer_blocks": ((batch, num_txt, d), (batch, num_img, d))}


FAMILY = ModelFamily(
    name="qwen-image",
    transformer=QwenImageTransformer,
    block_stacks=BLOCK_STACKS,
    block_modulations=BLOCK_MODULATIONS,
    time_embedding=time_embedding,
    example_inputs=example_inputs,
    positions=positions,
    prompt_extras=prompt_extras,
    guidance=lambda config, scale, batch: {},
    check_positions=check_positions,
    scheduler=lambda config: "qwen-image",
    cfg_norm_rescale=True,
    cache_carries=cache_carries,
    elastic_mlps=(ElasticMLP("transformer_blocks", fc1=("img_mlp", "fc1"), fc2=("img_mlp", "fc2"), fc2_kernel="kernel",
                             sown=("img_mlp",)),),
)
