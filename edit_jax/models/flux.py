"""FLUX.1 transformer (diffusers `FluxTransformer2DModel`) as a pure Flax Linen module.

    model = FluxTransformer(config)
    velocity = model.apply({"params": params}, hidden_states, encoder_hidden_states,
                           pooled_projections, timestep, img_ids, txt_ids, guidance)

The 19 double-stream and 38 single-stream blocks each run under `nn.scan`: their params carry a
leading layer axis and each kind of block compiles once. Param names follow diffusers'
(`transformer_blocks/attn/to_q/kernel` is `transformer_blocks.{i}.attn.to_q.weight`, transposed
and stacked over i); the MLPs are `ff/fc1`, `ff/fc2` (diffusers `ff.net.0.proj`, `ff.net.2`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from edit_jax.models.blocks import DualStreamBlock
from edit_jax.config import FluxConfig, proj_out_parts
from edit_jax.elastic.mechanism import ElasticConfig, elastic_step
from edit_jax.models.elastic_stacks import Stack, block_elastic, run_stacks, stack_inputs, step_aux
from edit_jax.models.family import ElasticMLP, ModelFamily
from edit_jax.layers import (
    HEADS,
    HIDDEN,
    TOKENS,
    JointLinear,
    Linear,
    Modulation,
    RMSNorm,
    TimestepEmbedding,
    activation_fn,
    apply_rope,
    attention,
    check_timestep,
    constrain,
    dtype_of,
    layer_norm,
    modulate,
    modulation_chunks,
    rope_frequencies,
    scan_blocks,
    sow_hidden_magnitude,
    split_heads,
    timestep_embedding,
)
from edit_jax.sampling.latents import grid_img_ids
from edit_jax.elastic.router import Router


FLUX_DOUBLE_BLOCK_NAMES = ("norm1", "norm1_context", "ff", "ff_context")  # diffusers' names


class FluxSingleAttention(nn.Module):
    """Self-attention of a single-stream block, without output projection: h [B, L, D] ->
    [B, L, H*K] (the block's proj_out projects it together with the MLP)."""

    config: FluxConfig

    @nn.compact
    def __call__(self, h, cos, sin):
        cfg, rt = self.config, self.config.runtime
        q, k, v = (
            constrain(split_heads(Linear(cfg.inner_dim, ("embed", "heads"), rt, name=n)(h), cfg.attention_head_dim), HEADS)
            for n in ("to_q", "to_k", "to_v")
        )
        q = RMSNorm("head_dim", rt, name="norm_q")(q)
        k = RMSNorm("head_dim", rt, name="norm_k")(k)
        return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, None, rt.attention)


class FluxSingleBlock(nn.Module):
    """Single-stream parallel block over the joint sequence x [B, T + N, D]: attention and MLP
    read the same modulated input and share one output projection over their concatenation
    (diffusers' proj_out [D + M, D]), stored as two kernels, kernel_attn [D, D] and kernel_mlp
    [M, D], and taken as two matmuls into one sum.

    Elastic width (our choice; the paper released no FLUX code): the MLP half, the proj_mlp columns
    and proj_out kernel_mlp rows of the first m hidden channels (stored in `width_groups` groups,
    `layers.narrow`). The router reads the joint sequence.
    """

    config: FluxConfig
    elastic: ElasticConfig | None = None

    def setup(self):
        cfg, rt = self.config, self.config.runtime
        self.norm = Modulation(3, rt)
        self.proj_mlp = Linear(cfg.mlp_hidden_dim, ("embed", "mlp"), rt, groups=cfg.width_groups)
        self.attn = FluxSingleAttention(cfg)
        self.proj_out = JointLinear(cfg.inner_dim, proj_out_parts(cfg), "embed", rt, groups=cfg.width_groups)
        self.router = Router(cfg.router_hidden, len(cfg.width_buckets), rt)

    def forward(self, x, temb, cos, sin, width=None, hidden_mask=None, modulation=None):
        """The block itself; its MLP keeps its first `width` hidden channels.

        Args:
          x: [B, T + N, D] the joint sequence. temb: [B, D]. cos, sin: [T + N, K] RoPE tables.
          width: hidden channels kept (None: all). hidden_mask: [B, width] or None. modulation: this
            layer's [B, 3D] computed ahead, or None.
        """
        cfg = self.config
        x = constrain(x, TOKENS)
        shift, scale, gate = modulation_chunks(self.norm, temb, modulation, 3)
        h = modulate(layer_norm(x), shift, scale)
        mlp = constrain(activation_fn(cfg.activation)(self.proj_mlp(h, out_size=width)), HIDDEN)
        sow_hidden_magnitude(self, mlp)
        if hidden_mask is not None:
            mlp = mlp * hidden_mask[:, None, :].astype(mlp.dtype)
        attn = self.attn(h, cos, sin)
        out = self.proj_out((attn, mlp))
        return constrain(x + gate[:, None] * out, TOKENS)

    def __call__(self, x, per_layer, temb, cos, sin, step):
        modulation = per_layer.get("modulation", {}).get("norm")

        def body(mdl, c, width, hidden_mask):
            return mdl.forward(c, temb, cos, sin, width, hidden_mask, modulation)

        cfg = self.config
        return elastic_step(
            self, body, x, [(x, None)], temb, cfg.mlp_hidden_dim, cfg.width_buckets, self.elastic, per_layer, step,
            cfg.width_groups,
        )


class FluxTimeTextEmbedding(nn.Module):
    """temb [B, D] = timestep_embedder(t) (+ guidance_embedder(g)) + text_embedder(pooled)."""

    config: FluxConfig

    @nn.compact
    def __call__(self, timestep, pooled_projections, guidance=None):
        cfg, rt = self.config, self.config.runtime
        dtype = dtype_of(rt.dtype)
        temb = TimestepEmbedding(cfg.inner_dim, "freq", rt, name="timestep_embedder")(
            timestep_embedding(timestep * 1000).astype(dtype)
        )
        if cfg.guidance_embeds:
            temb = temb + TimestepEmbedding(cfg.inner_dim, "freq", rt, name="guidance_embedder")(
                timestep_embedding(guidance * 1000).astype(dtype)
            )
        return temb + TimestepEmbedding(cfg.inner_dim, "pooled", rt, name="text_embedder")(pooled_projections)


BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")
BLOCK_MODULATIONS = {"transformer_blocks": FLUX_DOUBLE_BLOCK_NAMES[:2], "single_transformer_blocks": ("norm",)}


def time_embedding(config: FluxConfig, params: dict, timestep, pooled_projections, guidance=None, **_) -> jax.Array:
    """temb [B, D] as the model computes it, from its params alone (other conditions ignored).

    Args:
      config: the FLUX config. params: the model's params. timestep: [B] in [0, 1].
      pooled_projections: [B, P]. guidance: [B] (dev) or None.
    """
    dtype = dtype_of(config.runtime.dtype)
    return FluxTimeTextEmbedding(config).apply({"params": params["time_text_embed"]}, timestep,
                                                jnp.asarray(pooled_projections).astype(dtype), guidance)


class FluxTransformer(nn.Module):
    """FLUX.1 velocity model.

    Args (shapes as diffusers' FluxTransformer2DModel):
      hidden_states: [B, N, in_channels] packed image latents.
      encoder_hidden_states: [B, T, joint_attention_dim] T5 token embeddings.
      pooled_projections: [B, pooled_projection_dim] pooled CLIP embedding.
      timestep: [B] in [0, 1] (sigma; scaled by 1000 inside).
      img_ids: [N, 3], txt_ids: [T, 3] RoPE positions.
      guidance: [B] guidance scale, only when `config.guidance_embeds`.
    Returns the velocity [B, N, patch_size**2 * out_channels].
    """

    config: FluxConfig

    @nn.compact
    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        img_ids,
        txt_ids,
        guidance=None,
        elastic: ElasticConfig | None = None,
        decisions: dict | None = None,
        cache: dict | None = None,
        step=None,
        router_modulations=None,
        block_modulations=None,
        step_cache=None,
    ):
        """elastic: None or mode "dense" returns the velocity; any other mode (or a step cache)
        returns (velocity, aux) with p, q, executed, cache_hit, bucket over all 19 + 38 blocks and the step's FLOPs.
        decisions: {"run" or "p", "bucket"} [L] or [B, L] for mode "forced". cache: the block
        cache (`edit_jax.models.init_cache`), returned updated as aux["cache"]; step: the denoising step index.
        router_modulations: the routers' temb-only modulation for these inputs, computed ahead
        (`edit_jax.models.router_modulations`); None computes it here. block_modulations: the
        blocks' AdaLN modulations for these inputs, computed ahead (`edit_jax.models.block_modulations`);
        None computes them here. step_cache: the state of `elastic.step_cache`
        (`edit_jax.models.init_step_cache`), returned updated as aux["step_cache"]."""
        cfg, rt = self.config, self.config.runtime
        check_flux_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        elastic, decisions = block_elastic(elastic, decisions, cfg)
        dtype = dtype_of(rt.dtype)
        batch, num_img = hidden_states.shape[:2]
        num_txt = encoder_hidden_states.shape[1]
        step = jnp.asarray(0 if step is None else step, jnp.int32)
        img = Linear(cfg.inner_dim, ("channels", "embed"), rt, name="x_embedder")(hidden_states.astype(dtype))
        temb = FluxTimeTextEmbedding(cfg, name="time_text_embed")(
            timestep, pooled_projections.astype(dtype), guidance
        )
        lazy, per_stack = stack_inputs(
            self, BLOCK_STACKS, BLOCK_MODULATIONS, elastic, decisions, cache, temb, batch, router_modulations,
            block_modulations,
        )
        txt = Linear(cfg.inner_dim, ("text_embed", "embed"), rt, name="context_embedder")(
            encoder_hidden_states.astype(dtype)
        )
        cos, sin = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)

        double_blocks = scan_blocks(DualStreamBlock, cfg.num_layers, rt, 5, lazy)(
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            cfg.mlp_hidden_dim,
            cfg.activation,
            rt,
            FLUX_DOUBLE_BLOCK_NAMES,
            cfg.router_hidden,
            cfg.width_buckets,
            elastic,
            width_groups=cfg.width_groups,
            name="transformer_blocks",
        )
        single_blocks = scan_blocks(FluxSingleBlock, cfg.num_single_layers, rt, 4, lazy)(
            cfg, elastic, name="single_transformer_blocks"
        )
        stacks = (
            Stack(lambda carry, per_layer: double_blocks(carry, per_layer, temb, cos, sin, None, step)),
            Stack(lambda joint, per_layer: single_blocks(joint, per_layer, temb, cos, sin, step),
                  enter=lambda streams: jnp.concatenate(streams, axis=1),
                  leave=lambda joint: (joint[:, :num_txt], joint[:, num_txt:])),
        )
        (txt, img), (double_out, single_out), step_out = run_stacks(
            stacks, (txt, img), per_stack, (cfg.num_layers, cfg.num_single_layers), lazy, elastic, step_cache, step)

        scale, shift = Modulation(2, rt, name="norm_out")(temb)  # diffusers' AdaLayerNormContinuous
        img = modulate(layer_norm(img), shift, scale)
        velocity = Linear(cfg.output_channels, ("embed", "channels"), rt, name="proj_out")(img)
        if double_out is None:
            return velocity
        return velocity, step_aux(cfg, BLOCK_STACKS, elastic, [double_out, single_out], cache, num_img, num_txt, step_out)


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(got)}, expected {expected}")


def check_flux_inputs(cfg, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
    """Raises ValueError naming the first input whose shape does not fit the config.

    Args:
      cfg: the FLUX config; the others: the model's inputs (`FluxTransformer`).
    """
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
        raise _shape_error("hidden_states", hidden_states.shape, f"[B, N, {cfg.in_channels}]")
    batch, num_img = hidden_states.shape[:2]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or (
        encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
    ):
        raise _shape_error("encoder_hidden_states", encoder_hidden_states.shape, f"[{batch}, T, {cfg.joint_attention_dim}]")
    num_txt = encoder_hidden_states.shape[1]
    if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
        raise _shape_error("pooled_projections", pooled_projections.shape, f"[{batch}, {cfg.pooled_projection_dim}]")
    if timestep.shape != (batch,):
        raise _shape_error("timestep", timestep.shape, f"[{batch}]")
    check_timestep(timestep)
    n_axes = len(cfg.axes_dims_rope)
    if img_ids.shape != (num_img, n_axes):
        raise _shape_error("img_ids", img_ids.shape, f"[{num_img}, {n_axes}] (one row per image token)")
    if txt_ids.shape != (num_txt, n_axes):
        raise _shape_error("txt_ids", txt_ids.shape, f"[{num_txt}, {n_axes}] (one row per text token)")
    if cfg.guidance_embeds:
        if guidance is None:
            raise ValueError("this FLUX config has guidance embeddings (dev): pass guidance [B]")
        if guidance.shape != (batch,):
            raise _shape_error("guidance", guidance.shape, f"[{batch}]")
    elif guidance is not None:
        raise ValueError("this FLUX config has no guidance embeddings (schnell): guidance must be None")


def example_inputs(config: FluxConfig, rng: np.random.Generator, batch: int, height: int, width: int,
                   num_txt: int) -> dict:
    """Random model inputs (float32) for an image of height x width packed tokens.

    Args:
      config: the FLUX config. rng: a numpy Generator. batch: B. height, width: packed tokens per
        side. num_txt: T.
    """
    inputs = dict(
        hidden_states=rng.standard_normal((batch, height * width, config.in_channels)),
        encoder_hidden_states=rng.standard_normal((batch, num_txt, config.joint_attention_dim)),
        pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)),
        timestep=rng.uniform(0.05, 0.95, (batch,)),
        **positions(config, height, width, num_txt),
    )
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,))
    return {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}


def positions(config: FluxConfig, rows: int, cols: int, num_txt: int) -> dict:
    """RoPE ids: img_ids [rows * cols, 3] (0, row, column) and txt_ids [T, 3] (zeros).

    Args:
      config: the FLUX config. rows, cols: the grid of packed tokens. num_txt: T.
    """
    return {"img_ids": jnp.asarray(grid_img_ids(rows, cols)), "txt_ids": jnp.zeros((num_txt, 3), jnp.float32)}


def prompt_extras(config: FluxConfig, batch: int, num_txt: int) -> dict:
    """The pooled CLIP embedding [B, P] beside the prompt embeddings."""
    return {"pooled_projections": ((batch, config.pooled_projection_dim), np.float32)}


def guidance(config: FluxConfig, scale: float, batch: int) -> dict:
    """FLUX.1-dev embeds the guidance scale [B]; schnell takes none."""
    return {"guidance": np.full((batch,), scale, np.float32)} if config.guidance_embeds else {}


def check_positions(config: FluxConfig, cond: dict, num_tokens: int, batch: int) -> str | None:
    """What is wrong with cond's img_ids for num_tokens image tokens (None: nothing).

    Args:
      config: the FLUX config. cond: the sampler's conditions. num_tokens: image tokens per row
        (the latents' and any reference images'). batch: rows.
    """
    rows = cond["img_ids"].shape[0]
    return None if rows == num_tokens else f"img_ids has {rows}"


def cache_carries(config: FluxConfig, batch: int, num_img: int, num_txt: int) -> dict:
    """A double block's carry (txt, img) and a single block's joint sequence.

    Args:
      config: the FLUX config. batch: B. num_img, num_txt: image and text tokens per row.
    """
    d = config.inner_dim
    return {"transformer_blocks": ((batch, num_txt, d), (batch, num_img, d)),
            "single_transformer_blocks": (batch, num_txt + num_img, d)}


FAMILY = ModelFamily(
    name="flux",
    transformer=FluxTransformer,
    block_stacks=BLOCK_STACKS,
    block_modulations=BLOCK_MODULATIONS,
    time_embedding=time_embedding,
    example_inputs=example_inputs,
    positions=positions,
    prompt_extras=prompt_extras,
    guidance=guidance,
    check_positions=check_positions,
    scheduler=lambda config: "flux-dev" if config.guidance_embeds else "flux-schnell",
    cfg_norm_rescale=False,
    cache_carries=cache_carries,
    elastic_mlps=(
        ElasticMLP("transformer_blocks", fc1=("ff", "fc1"), fc2=("ff", "fc2"), fc2_kernel="kernel", sown=("ff",)),
        ElasticMLP("single_transformer_blocks", fc1=("proj_mlp",), fc2=("proj_out",), fc2_kernel="kernel_mlp", sown=()),
    ),
)
