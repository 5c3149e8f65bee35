"""The elastic wiring every transformer shares around its scanned block stacks: what each stack's
scan reads per layer (forced decisions, cache, the routers' and the blocks' modulations computed
ahead, the layer index of lazy weights), and the step's routing record from what the scans return.

    lazy, per_stack = stack_inputs(self, names, modulation_names, elastic, decisions, cache, temb, batch,
                                   router_modulations, block_modulations)
    ...  # scan each stack with its per_stack entry
    return velocity if outputs[0] is None else (velocity, step_aux(cfg, names, elastic, outputs, cache, n, t))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax

from edit_jax.elastic.mechanism import (ElasticConfig, check_decisions, gather_aux, lazy_weights, per_layer_inputs,
                              router_preludes)
from edit_jax.elastic.flops import step_flops
from edit_jax.layers import dtype_of, modulations_ahead


def stack_inputs(
    model: nn.Module,
    names: Sequence[str],
    modulation_names: Mapping[str, tuple[str, ...]],
    elastic: ElasticConfig | None,
    decisions: dict | None,
    cache: dict | None,
    temb: jax.Array,
    batch: int,
    router_modulations: Sequence[jax.Array] | None,
    block_modulations: Sequence[dict] | None,
    more_modulations: Callable[[list[dict]], list[dict]] | None = None,
) -> tuple[bool, list[dict]]:
    """(lazy weights, per block stack its scanned per-layer inputs) for a transformer `model`
    whose config's `block_stacks` are scanned under `names`.

    Args:
      modulation_names: per stack the names of its blocks' Modulation submodules.
      elastic, decisions, cache: the model call's (`edit_jax.elastic.elastic_step`).
      temb: [B, D] the time embedding. batch: B.
      router_modulations, block_modulations: computed ahead by the caller, or None.
      more_modulations: adds to the block modulations computed ahead (Qwen-Image's reference
        images modulated at t = 0); not called where there are none (init).
    """
    config = model.config
    dtype = dtype_of(config.runtime.dtype)
    lazy = lazy_weights(elastic, model.is_initializing())
    preludes = router_preludes(model, elastic, names, temb, dtype, router_modulations)
    modulations = modulations_ahead(model, modulation_names, temb, dtype, block_modulations)
    if more_modulations is not None and modulations is not None:
        modulations = more_modulations(modulations)
    check_decisions(elastic, decisions, len(config.width_buckets), model.is_initializing())
    caches = None if cache is None else [cache[name] for name in names]
    sizes = [layers for _, layers, _ in config.block_stacks]
    return lazy, per_layer_inputs(decisions, caches, sizes, batch, lazy, preludes, modulations)


def step_aux(config, names: Sequence[str], elastic: ElasticConfig, outputs: Sequence[dict], cache: dict | None,
             num_img: int, num_txt: int) -> dict:
    """The routing record of one elastic call from its stacks' scan outputs: p, q, executed,
    cache_hit, bucket [B, L], branch [L] (`gather_aux`), the step's FLOPs (`step_flops`) and,
    with a cache, the updated cache under each stack's name.

    Args:
      config: the model config. names: the block stacks' names. elastic: the call's ElasticConfig.
      outputs: per stack its scan's outputs. cache: the call's cache, or None.
      num_img, num_txt: image and text tokens per sample (for the FLOPs).
    """
    aux = gather_aux(outputs)
    aux["flops"] = step_flops(config, num_img, num_txt, aux, with_routers=elastic.mode != "forced")
    if cache is not None:
        aux["cache"] = {name: out["cache"] for name, out in zip(names, outputs)}
    return aux
