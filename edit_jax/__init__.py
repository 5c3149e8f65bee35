"""edit-jax: Elastic Diffusion Transformers (E-DiT) for FLUX.1, Qwen-Image and Hunyuan3D-2 in JAX/Flax."""

from __future__ import annotations

from edit_jax import checkpoint
from edit_jax.checkpoint import SHAPE_VAE_DIR, CheckpointError, load_config, load_params, read_metadata
from edit_jax.config import FluxConfig, Hunyuan3DConfig, QwenImageConfig, RuntimeConfig, from_diffusers_config, preset
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.models.registry import abstract_params, build_model, init_params, init_routers, logical_axes
from edit_jax.models.shape_vae import ShapeVAEConfig, abstract_shape_vae
from edit_jax.placement import mesh_shardings

__all__ = [
    "ElasticConfig",
    "FluxConfig",
    "Hunyuan3DConfig",
    "QwenImageConfig",
    "RuntimeConfig",
    "abstract_params",
    "build_model",
    "from_diffusers_config",
    "init_params",
    "init_routers",
    "load",
    "load_routers",
    "load_shape_vae",
    "logical_axes",
    "preset",
]


def load(path, shardings=None, activation=None, mesh=None, **runtime):
    """Loads an edit-jax checkpoint: returns (model, params).

    shardings: None (first device), one jax.sharding.Sharding for all params, or a pytree of
    them matching the params. mesh: instead of shardings, a (data, fsdp, tensor) mesh
    (`edit_jax.sharding.make_mesh`) on which every param is placed as the logical-axis rules
    table says. activation: overrides the MLP activation ("gelu_tanh", "sigmoid_gelu").
    runtime: RuntimeConfig overrides, e.g. dtype="bfloat16", attention="cudnn",
    param_dtype="float32" (params are cast on restore).

    Args:
      path: the checkpoint folder (relative paths work).
      shardings, mesh: where the params go (above); give one or neither.
      activation: the MLP activation to run instead of the stored one.
      **runtime: `edit_jax.config.RuntimeConfig` fields.
    """
    config = load_config(path)
    if activation is not None:
        config = config.replace(activation=activation)
    if runtime:
        config = config.with_runtime(**runtime)
    params = load_params(path, abstract_params(config), mesh_shardings(config, mesh, shardings))
    return build_model(config), params


def load_routers(path, shardings=None, mesh=None) -> dict | None:
    """The routers of an edit-jax checkpoint as stored (None when it has none), placed by
    `shardings` (as `load`), or on `mesh` as the logical-axis rules table says."""
    if mesh is not None:
        shardings = mesh_shardings(load_config(path), mesh, shardings, "routers")
    return checkpoint.load_routers(path, shardings)


def load_shape_vae(path) -> tuple[ShapeVAEConfig, dict]:
    """(config, params) of the ShapeVAE decoder a converted Hunyuan3D-2 checkpoint holds
    (`edit-jax convert hunyuan3d`); a CheckpointError where it holds none."""
    meta = read_metadata(path)
    if SHAPE_VAE_DIR not in meta:
        raise CheckpointError(f"{path} holds no ShapeVAE: convert a Hunyuan3D-2 release folder (edit-jax convert hunyuan3d)")
    config = ShapeVAEConfig(**meta[SHAPE_VAE_DIR])
    return config, load_params(path, abstract_shape_vae(config), tree=SHAPE_VAE_DIR)
