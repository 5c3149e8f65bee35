"""One entry point per model family: build the module, make example inputs, get abstract params
and their logical partitioning, without allocating any weights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from edit_jax import flux, qwen_image
from edit_jax.config import FluxConfig, QwenImageConfig
from edit_jax.elastic import ElasticConfig
from edit_jax.layers import stack_modulations
from edit_jax.router import router_modulation


def build_model(config) -> nn.Module:
    if isinstance(config, FluxConfig):
        return flux.FluxTransformer(config)
    if isinstance(config, QwenImageConfig):
        return qwen_image.QwenImageTransformer(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


def router_modulations(config, params: dict, routers: dict, timestep: jax.Array, cond: dict) -> list[jax.Array]:
    """Per block stack, every router's shift and scale [L_i, B, 2D] for timestep [B] (sigmas in
    [0, 1]) and the conditioning inputs `cond` (the model's keyword arguments; FLUX reads
    pooled_projections and guidance, Qwen-Image none): what the model computes first in every
    routed call, handed to it as `router_modulations=` to skip that work. They read only the time
    embedding, so a sampler computes them for all its steps in one matmul (`jax.vmap` over the
    steps' timesteps), reading each router's [D, 3D] kernel once per run instead of once per step.
    Pass them only with the same timestep and cond as the call's."""
    family = _family_module(config)
    temb = family.time_embedding(config, params, timestep, **cond)
    dtype = jnp.dtype(config.runtime.dtype)
    return [router_modulation(routers[name]["router"], temb, dtype) for name in family.BLOCK_STACKS]


def block_modulations(config, params: dict, timestep: jax.Array, cond: dict) -> list[dict]:
    """Per block stack {modulation name: [L_i, B, kD]}: every block's AdaLN shift, scale and gate
    chunks for timestep [B] and the conditioning inputs `cond` (as `router_modulations`), what
    the model computes ahead of its block scans in every call, handed to it as
    `block_modulations=` to skip that work. They read only the time embedding, so a sampler
    computes them for all its steps at once (`jax.vmap` over the steps' timesteps): at full
    size these [D, 6D] and [D, 3D] kernels are about a quarter of the model's weights, read
    once per run instead of once per step. Pass them only with the same timestep and cond as
    the call's."""
    family = _family_module(config)
    temb = family.time_embedding(config, params, timestep, **cond)
    return stack_modulations(params, family.BLOCK_MODULATIONS, temb, jnp.dtype(config.runtime.dtype))


def _family_module(config):
    if isinstance(config, FluxConfig):
        return flux
    if isinstance(config, QwenImageConfig):
        return qwen_image
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
    if isinstance(config, QwenImageConfig):
        return dict(
            hidden_states=jnp.asarray(rng.standard_normal((batch, height * width, config.in_channels)), jnp.float32),
            encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, num_txt, config.joint_attention_dim)), jnp.float32),
            encoder_hidden_states_mask=jnp.ones((batch, num_txt), jnp.int32),
            timestep=jnp.asarray(rng.uniform(0.05, 0.95, (batch,)), jnp.float32),
            img_shapes=(1, height, width),
        )
    raise TypeError(f"no example inputs for config type {type(config).__name__}")


def split_static(inputs: dict) -> tuple[dict, dict]:
    """(array inputs, static inputs such as Qwen's img_shapes) of an input dict."""
    arrays = {k: v for k, v in inputs.items() if isinstance(v, (jax.Array, np.ndarray))}
    return arrays, {k: v for k, v in inputs.items() if k not in arrays}


def jit_forward(model: nn.Module, inputs: dict):
    """(f, arrays): f(params, arrays) is the jitted forward with the static inputs closed over."""
    arrays, static = split_static(inputs)
    return jax.jit(lambda params, x: model.apply({"params": params}, **x, **static)), arrays


def _init_fn(config):
    """init(key) -> all variables ({"params", "routers"}), boxed with logical axis names."""
    model = build_model(config.with_runtime(attention="xla"))  # the params do not depend on it; a kernel may not tile 6 tokens
    arrays, static = split_static(example_inputs(config, height=2, width=2, num_txt=2))
    return lambda key: model.init(key, **arrays, **static, elastic=ElasticConfig(mode="train"))


@functools.lru_cache(maxsize=32)
def _boxed_abstract_variables(config):
    return jax.eval_shape(_init_fn(config), jax.random.key(0))


def abstract_params(config, collection: str = "params") -> dict:
    """The params (or "routers") pytree as jax.ShapeDtypeStruct leaves (no memory allocated)."""
    return nn.meta.unbox(_boxed_abstract_variables(config))[collection]


def abstract_routers(config) -> dict:
    """The E-DiT router pytree (one router per block, stacked like the blocks), abstract."""
    return abstract_params(config, "routers")


def logical_axes(config, collection: str = "params") -> dict:
    """The params (or "routers") pytree with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(_boxed_abstract_variables(config))[collection]


def init_variables(config, seed: int = 0, shardings: dict | None = None,
                   collections: tuple[str, ...] = ("params", "routers")) -> dict:
    """Random base params and fresh routers (full-capacity init): {"params", "routers"}, or only
    the `collections` asked for (the others are never computed).

    shardings: {"params": ..., "routers": ...} pytrees of shardings: each array is created
    directly in its sharding, never whole on one device."""
    init = _init_fn(config)
    if shardings is not None:
        shardings = {c: shardings[c] for c in collections}
    return jax.jit(lambda key: {c: nn.meta.unbox(init(key))[c] for c in collections},
                   out_shardings=shardings)(jax.random.key(seed))


def init_params(config, seed: int = 0) -> dict:
    """Randomly initialised base params (plain pytree of arrays)."""
    return init_variables(config, seed)["params"]


def init_routers(config, seed: int = 0) -> dict:
    """Freshly initialised routers ("full-capacity start": every block open at full width)."""
    return init_variables(config, seed)["routers"]
