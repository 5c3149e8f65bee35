"""Hunyuan3D-2's shape DiT (hy3dgen `Hunyuan3DDiT`) as a pure Flax Linen module.

    model = Hunyuan3DTransformer(config)
    velocity = model.apply({"params": params}, hidden_states, encoder_hidden_states, timestep)

FLUX.1's blocks without positions: 16 double-stream blocks over (image features, shape latents),
then 32 single-stream blocks over their joint sequence, each stack under `nn.scan`. The blocks,
their params and their elastic MLPs are FLUX's (`edit_jax.models.flux`; the converter maps
hy3dgen's BFL-style names onto them); the time embedding has no pooled text vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.config import Hunyuan3DConfig
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.layers import (Linear, Modulation, TimestepEmbedding, check_timestep, dtype_of, layer_norm, modulate,
                             scan_blocks, timestep_embedding)
from edit_jax.models import flux
from edit_jax.models.blocks import DualStreamBlock
from edit_jax.models.elastic_stacks import Stack, block_elastic, run_stacks, stack_inputs, step_aux
from edit_jax.models.family import ModelFamily


class Hunyuan3DTimeEmbedding(nn.Module):
    """temb [B, D] = timestep_embedder(t) (+ guidance_embedder(g)) (hy3dgen's time_in and
    guidance_in). hy3dgen passes its `time_factor` where its sinusoid takes `max_period`, and
    scales by that function's default factor 1000: the release's frequencies are
    exp(-ln(1000) j / 128), not FLUX's exp(-ln(10000) j / 128)."""

    config: Hunyuan3DConfig

    @nn.compact
    def __call__(self, timestep, guidance=None):
        cfg, rt = self.config, self.config.runtime
        dtype = dtype_of(rt.dtype)
        temb = TimestepEmbedding(cfg.inner_dim, "freq", rt, name="timestep_embedder")(
            timestep_embedding(timestep * 1000, max_period=cfg.time_factor).astype(dtype))
        if cfg.guidance_embeds:
            temb = temb + TimestepEmbedding(cfg.inner_dim, "freq", rt, name="guidance_embedder")(
                timestep_embedding(guidance * 1000, max_period=cfg.time_factor).astype(dtype))
        return temb


def time_embedding(config: Hunyuan3DConfig, params: dict, timestep, guidance=None, **_) -> jax.Array:
    """temb [B, D] as the model computes it, from its params alone (other conditions ignored).

    Args:
      config: the Hunyuan3D config. params: the model's params. timestep: [B] in [0, 1].
      guidance: [B] (guidance-distilled configs) or None.
    """
    return Hunyuan3DTimeEmbedding(config).apply({"params": params["time_text_embed"]}, timestep, guidance)


class Hunyuan3DTransformer(nn.Module):
    """Hunyuan3D-2 shape velocity model.

    Args (shapes as hy3dgen's Hunyuan3DDiT):
      hidden_states: [B, N, in_channels] shape latent tokens.
      encoder_hidden_states: [B, T, joint_attention_dim] image features (DINOv2; hy3dgen's contexts["main"]).
      timestep: [B] in [0, 1] (scaled by time_factor inside).
      guidance: [B] guidance scale, only when `config.guidance_embeds`.
    Returns the velocity [B, N, in_channels] in hy3dgen's convention (its pipeline integrates t
    from 0 to 1). elastic, decisions, cache, step, router_modulations, block_modulations and
    step_cache as `edit_jax.models.flux.FluxTransformer`'s.
    """

    config: Hunyuan3DConfig

    @nn.compact
    def __call__(
        self,
        hidden_states,
        encoder_hidden_states,
        timestep,
        guidance=None,
        elastic: ElasticConfig | None = None,
        decisions: dict | None = None,
        cache: dict | None = None,
        step=None,
        router_modulations=None,
        block_modulations=None,
        step_cache=None,
    ):
        cfg, rt = self.config, self.config.runtime
        check_hunyuan3d_inputs(cfg, hidden_states, encoder_hidden_states, timestep, guidance)
        elastic, decisions = block_elastic(elastic, decisions, cfg)
        dtype = dtype_of(rt.dtype)
        batch, num_img = hidden_states.shape[:2]
        num_txt = encoder_hidden_states.shape[1]
        step = jnp.asarray(0 if step is None else step, jnp.int32)
        img = Linear(cfg.inner_dim, ("channels", "embed"), rt, name="x_embedder")(hidden_states.astype(dtype))
        temb = Hunyuan3DTimeEmbedding(cfg, name="time_text_embed")(timestep, guidance)
        lazy, per_stack = stack_inputs(self, flux.BLOCK_STACKS, flux.BLOCK_MODULATIONS, elastic, decisions, cache,
                                       temb, batch, router_modulations, block_modulations)
        txt = Linear(cfg.inner_dim, ("text_embed", "embed"), rt, name="context_embedder")(
            encoder_hidden_states.astype(dtype))

        double_blocks = scan_blocks(DualStreamBlock, cfg.num_layers, rt, 5, lazy)(
            cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_hidden_dim, cfg.activation, rt,
            flux.FLUX_DOUBLE_BLOCK_NAMES, cfg.router_hidden, cfg.width_buckets, elastic,
            width_groups=cfg.width_groups, name="transformer_blocks")
        single_blocks = scan_blocks(flux.FluxSingleBlock, cfg.num_single_layers, rt, 4, lazy)(
            cfg, elastic, name="single_transformer_blocks")
        stacks = (
            Stack(lambda carry, per_layer: double_blocks(carry, per_layer, temb, None, None, None, step)),
            Stack(lambda joint, per_layer: single_blocks(joint, per_layer, temb, None, None, step),
                  enter=lambda streams: jnp.concatenate(streams, axis=1),
                  leave=lambda joint: (joint[:, :num_txt], joint[:, num_txt:])),
        )
        (txt, img), (double_out, single_out), step_out = run_stacks(
            stacks, (txt, img), per_stack, (cfg.num_layers, cfg.num_single_layers), lazy, elastic, step_cache, step)

        scale, shift = Modulation(2, rt, name="norm_out")(temb)
        img = modulate(layer_norm(img), shift, scale)
        velocity = Linear(cfg.output_channels, ("embed", "channels"), rt, name="proj_out")(img)
        if double_out is None:
            return velocity
        return velocity, step_aux(cfg, flux.BLOCK_STACKS, elastic, [double_out, single_out], cache, num_img, num_txt,
                                  step_out)


def check_hunyuan3d_inputs(cfg: Hunyuan3DConfig, hidden_states, encoder_hidden_states, timestep, guidance) -> None:
    """Raises ValueError naming the first input whose shape does not fit the config.

    Args:
      cfg: the Hunyuan3D config; the others: the model's inputs (`Hunyuan3DTransformer`).
    """
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}, expected [B, N, {cfg.in_channels}]")
    batch = hidden_states.shape[0]
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or (
            encoder_hidden_states.shape[-1] != cfg.joint_attention_dim):
        raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}, expected "
                         f"[{batch}, T, {cfg.joint_attention_dim}] (image features)")
    if timestep.shape != (batch,):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}, expected [{batch}]")
    check_timestep(timestep)
    if cfg.guidance_embeds and (guidance is None or guidance.shape != (batch,)):
        raise ValueError(f"this Hunyuan3D config embeds the guidance scale: pass guidance [{batch}]")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError("this Hunyuan3D config has no guidance embedding: guidance must be None")


def example_inputs(config: Hunyuan3DConfig, rng: np.random.Generator, batch: int, height: int, width: int,
                   num_txt: int) -> dict:
    """Random model inputs (float32) for height * width shape latent tokens.

    Args:
      config: the Hunyuan3D config. rng: a numpy Generator. batch: B. height, width: their
        product is the number of latent tokens. num_txt: T, image feature tokens.
    """
    inputs = dict(hidden_states=rng.standard_normal((batch, height * width, config.in_channels)),
                  encoder_hidden_states=rng.standard_normal((batch, num_txt, config.joint_attention_dim)),
                  timestep=rng.uniform(0.05, 0.95, (batch,)))
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,))
    return {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}


def guidance(config: Hunyuan3DConfig, scale: float, batch: int) -> dict:
    """A guidance-distilled config embeds the scale [B]; the release takes none (it runs CFG)."""
    return {"guidance": np.full((batch,), scale, np.float32)} if config.guidance_embeds else {}


FAMILY = ModelFamily(
    name="hunyuan3d",
    transformer=Hunyuan3DTransformer,
    block_stacks=flux.BLOCK_STACKS,
    block_modulations=flux.BLOCK_MODULATIONS,
    time_embedding=time_embedding,
    example_inputs=example_inputs,
    positions=lambda config, rows, cols, num_txt: {},
    prompt_extras=lambda config, batch, num_txt: {},
    guidance=guidance,
    check_positions=lambda config, cond, num_tokens, batch: None,
    scheduler=lambda config: "hunyuan3d",
    cfg_norm_rescale=False,
    cache_carries=flux.cache_carries,
    elastic_mlps=flux.FAMILY.elastic_mlps,
)
