"""One entry point per model family: build the module, make example inputs, get abstract params
and their logical partitioning, without allocating any weights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from edit_jax.config import FluxConfig


def build_model(config) -> nn.Module:
    if isinstance(config, FluxConfig):
        from edit_jax.flux import FluxTransformer

        return FluxTransformer(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


def example_inputs(config, batch: int = 1, height: int = 4, width: int = 4, num_txt: int = 8, seed: int = 0) -> dict:
    """Random model inputs (as keyword arguments) for an image of height x width latent tokens."""
    rng = np.random.default_rng(seed)
    if isinstance(config, FluxConfig):
        num_img = height * width
        rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        img_ids = np.stack([np.zeros(num_img), rows.ravel(), cols.ravel()], axis=-1)
        inputs = dict(
            hidden_states=rng.standard_normal((batch, num_img, config.in_channels)),
            encoder_hidden_states=rng.standard_normal((batch, num_txt, config.joint_attention_dim)),
            pooled_projections=rng.standard_normal((batch, config.pooled_projection_dim)),
            timestep=rng.uniform(0.05, 0.95, (batch,)),
            img_ids=img_ids,
            txt_ids=np.zeros((num_txt, 3)),
        )
        if config.guidance_embeds:
            inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,))
        return {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    raise TypeError(f"no example inputs for config type {type(config).__name__}")


@functools.lru_cache(maxsize=32)
def _boxed_abstract_variables(config):
    model = build_model(config)
    inputs = example_inputs(config, height=2, width=2, num_txt=2)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))


def abstract_params(config) -> dict:
    """The params pytree as jax.ShapeDtypeStruct leaves (no memory allocated)."""
    return nn.meta.unbox(_boxed_abstract_variables(config))["params"]


def logical_axes(config) -> dict:
    """The params pytree with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(_boxed_abstract_variables(config))["params"]


def init_params(config, seed: int = 0) -> dict:
    """Randomly initialised params (plain pytree of arrays)."""
    model = build_model(config)
    inputs = example_inputs(config, height=2, width=2, num_txt=2)
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), **inputs))["params"]
