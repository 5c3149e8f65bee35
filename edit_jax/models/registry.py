"""One entry point per model family: build the module, make example inputs, get abstract params
and their logical partitioning, without allocating any weights."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.block_cache import BlockCacheMethod, RouterGuidedCache
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.router import router_modulation
from edit_jax.elastic.step_cache import StepCacheMethod
from edit_jax.layers import stack_modulations
from edit_jax.models import flux, hunyuan3d, qwen_image
from edit_jax.models.family import ModelFamily

FAMILIES = {family.name: family for family in (flux.FAMILY, qwen_image.FAMILY, hunyuan3d.FAMILY)}


def family_of(config) -> ModelFamily:
    """The record of a config's model family (`edit_jax.models.family.ModelFamily`)."""
    family = FAMILIES.get(getattr(config, "family", None))
    if family is None:
        raise TypeError(f"no model family for config type {type(config).__name__}; known: {', '.join(FAMILIES)}")
    return family


def build_model(config) -> nn.Module:
    return family_of(config).transformer(config)


def router_modulations(config, params: dict, routers: dict, timestep: jax.Array, cond: dict) -> list[jax.Array]:
    """Per block stack, every router's shift and scale [L_i, B, 2D] for timestep [B] (sigmas in
    [0, 1]) and the conditioning inputs `cond` (the model's keyword arguments; FLUX reads
    pooled_projections and guidance, Qwen-Image none): what the model computes first in every
    routed call, handed to it as `router_modulations=` to skip that work. They read only the time
    embedding, so a sampler computes them for all its steps in one matmul (`jax.vmap` over the
    steps' timesteps), reading each router's [D, 3D] kernel once per run instead of once per step.
    Pass them only with the same timestep and cond as the call's.

    Args:
      config: the model config. params: its base params. routers: its routers.
      timestep: [B] sigmas in [0, 1]. cond: the call's conditioning keyword arguments.
    Returns: one [L_i, B, 2D] array per block stack.
    """
    family = family_of(config)
    temb = family.time_embedding(config, params, timestep, **cond)
    dtype = jnp.dtype(config.runtime.dtype)
    return [router_modulation(routers[name]["router"], temb, dtype) for name in family.block_stacks]


def block_modulations(config, params: dict, timestep: jax.Array, cond: dict) -> list[dict]:
    """Per block stack {modulation name: [L_i, B, kD]}: every block's AdaLN shift, scale and gate
    chunks for timestep [B] and the conditioning inputs `cond` (as `router_modulations`), what
    the model computes ahead of its block scans in every call, handed to it as
    `block_modulations=` to skip that work. They read only the time embedding, so a sampler
    computes them for all its steps at once (`jax.vmap` over the steps' timesteps): at full
    size these [D, 6D] and [D, 3D] kernels are about a quarter of the model's weights, read
    once per run instead of once per step. Pass them only with the same timestep and cond as
    the call's.

    Args:
      config: the model config. params: its base params.
      timestep: [B] sigmas in [0, 1]. cond: the call's conditioning keyword arguments.
    """
    family = family_of(config)
    temb = family.time_embedding(config, params, timestep, **cond)
    return stack_modulations(params, family.block_modulations, temb, jnp.dtype(config.runtime.dtype))


def init_cache(config, batch: int, num_img: int, num_txt: int, method: BlockCacheMethod | None = None) -> dict:
    """An empty block cache: per block stack `method.init` (by default the router-guided cache's
    `ResidualBank`) for the shapes of its blocks' carry (`ModelFamily.cache_carries`).

    Args:
      config: the model config. batch: rows per call. num_img, num_txt: image and text tokens
        per row. method: the per-block cache method (`edit_jax.elastic.block_cache`).
    """
    method = RouterGuidedCache() if method is None else method
    carries = family_of(config).cache_carries(config, batch, num_img, num_txt)
    return {name: method.init(layers, carries[name], batch) for name, layers, _ in config.block_stacks}


def init_step_cache(config, batch: int, num_img: int, num_txt: int, method: StepCacheMethod):
    """An empty per-step cache state (`method.init`) for streams of txt [B, T, D] and img [B, N, D].

    Args:
      config: the model config. batch: rows per call. num_img, num_txt: image and text tokens per
        row. method: the per-step cache method (`edit_jax.elastic.step_cache`).
    """
    d = config.inner_dim
    return method.init(((batch, num_txt, d), (batch, num_img, d)), batch)


def example_inputs(config, batch: int = 1, height: int = 4, width: int = 4, num_txt: int = 8, seed: int = 0) -> dict:
    """Random model inputs (as keyword arguments) for an image of height x width latent tokens.

    Args:
      config: the model config. batch: B. height, width: packed latent tokens per side.
      num_txt: text tokens. seed: of the random values.
    """
    return family_of(config).example_inputs(config, np.random.default_rng(seed), batch, height, width, num_txt)


def split_static(inputs: dict) -> tuple[dict, dict]:
    """(array inputs, static inputs such as Qwen's img_shapes) of an input dict."""
    arrays = {k: v for k, v in inputs.items() if isinstance(v, (jax.Array, np.ndarray))}
    return arrays, {k: v for k, v in inputs.items() if k not in arrays}


def jit_forward(model: nn.Module, inputs: dict):
    """(f, arrays): f(params, arrays) is the jitted forward with the static inputs closed over."""
    arrays, static = split_static(inputs)
    return jax.jit(lambda params, x: model.apply({"params": params}, **x, **static)), arrays


def _params_config(config):
    """The config as far as its params go: the runtime settings no param depends on (attention,
    remat, the compute dtype) at one value and the routers' dtype resolved, so that configs which
    differ only in those share one traced and compiled init (their params are bit-identical).
    Attention is XLA's: a kernel may not tile the few tokens the init traces."""
    runtime = config.runtime
    return config.with_runtime(attention="xla", remat="none", dtype="float32",
                               router_dtype=runtime.router_dtype or runtime.param_dtype)


@functools.lru_cache(maxsize=32)
def _init_fn(config):
    """The jitted init(key) -> all variables ({"params", "routers"}), boxed with logical axis names:
    one per params config (`_params_config`) in a process, so that its trace (the whole model's, the most costly part of
    starting a run) serves the abstract variables and every jitted init built on it."""
    model = build_model(config)  # a `_params_config`
    arrays, static = split_static(example_inputs(config, height=2, width=2, num_txt=2))
    return jax.jit(lambda key: model.init(key, **arrays, **static, elastic=ElasticConfig(mode="train")))


@functools.lru_cache(maxsize=32)
def _boxed_abstract_variables(config):
    return _init_fn(config).trace(jax.random.key(0)).out_info


def abstract_params(config, collection: str = "params") -> dict:
    """The params (or "routers") pytree as jax.ShapeDtypeStruct leaves (no memory allocated)."""
    return nn.meta.unbox(_boxed_abstract_variables(_params_config(config)))[collection]


def abstract_routers(config) -> dict:
    """The E-DiT router pytree (one router per block, stacked like the blocks), abstract."""
    return abstract_params(config, "routers")


def logical_axes(config, collection: str = "params") -> dict:
    """The params (or "routers") pytree with a PartitionSpec of logical axis names at each leaf."""
    return nn.get_partition_spec(_boxed_abstract_variables(_params_config(config)))[collection]


def init_variables(config, seed: int = 0, shardings: dict | None = None,
                   collections: tuple[str, ...] = ("params", "routers")) -> dict:
    """Random base params and fresh routers (full-capacity init): {"params", "routers"}, or only
    the `collections` asked for (the others are never computed).

    shardings: {"params": ..., "routers": ...} pytrees of shardings: each array is created
    directly in its sharding, never whole on one device.

    Args:
      config: the model config. seed: of the initialisation. shardings: above.
      collections: which of "params" and "routers" to make.
    """
    placement = None
    if shardings is not None:
        leaves, treedef = jax.tree.flatten({c: shardings[c] for c in collections})
        placement = (treedef, tuple(leaves))
    return _jitted_init(_params_config(config), tuple(collections), placement)(jax.random.key(seed))


@functools.lru_cache(maxsize=32)
def _jitted_init(config, collections: tuple[str, ...], placement):
    """The jitted init of one config, collections and placement ((treedef, shardings) or None):
    compiled once a process, whatever the seed (the model is traced once a config: `_init_fn`)."""
    init = _init_fn(config)
    shardings = None if placement is None else jax.tree.unflatten(*placement)
    return jax.jit(lambda key: {c: nn.meta.unbox(init(key))[c] for c in collections}, out_shardings=shardings)


def init_params(config, seed: int = 0) -> dict:
    """Randomly initialised base params (plain pytree of arrays)."""
    return init_variables(config, seed)["params"]


def init_routers(config, seed: int = 0) -> dict:
    """Freshly initialised routers ("full-capacity start": every block open at full width), the
    same as `init_variables(config, seed)["routers"]`; the base params are never drawn (their
    random init is most of the init's compile time)."""
    return init_variables(config, seed, collections=("routers",))["routers"]
