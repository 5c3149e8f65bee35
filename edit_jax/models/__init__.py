"""The models: shared blocks (`blocks`), one module per family (`flux`, `qwen_image`; each exports
its `FAMILY` record, `family`), the elastic wiring around their block stacks (`elastic_stacks`),
the VAEs (`vae`, `qwen_image_vae`) and the registry (`registry`: build a model, example inputs,
abstract params, initialisation), whose names import from here
(`from edit_jax.models import build_model, example_inputs`)."""

from edit_jax.models.registry import (FAMILIES, abstract_params, abstract_routers, block_modulations, build_model,
                                      example_inputs, family_of, init_cache, init_params, init_routers, init_step_cache,
                                      init_variables, jit_forward, logical_axes, router_modulations, split_static)

__all__ = ["FAMILIES", "abstract_params", "abstract_routers", "block_modulations", "build_model", "example_inputs", "family_of", "init_cache", "init_params", "init_routers", "init_step_cache", "init_variables", "jit_forward", "logical_axes", "router_modulations", "split_static"]
