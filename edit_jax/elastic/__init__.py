"""E-DiT's elastic machinery: the router (`router`), the mechanism that skips blocks and narrows
their MLPs (`mechanism`), the seams for per-block and per-step cache methods (`block_cache`; `step_cache`: first-block
cache, MagCache, TaylorSeer), FLOPs accounting
(`flops`) and MLP channel ordering (`channel_order`). The mechanism's names import from here
(`from edit_jax.elastic import ElasticConfig`)."""

from edit_jax.elastic.mechanism import (DECISIONS, ElasticConfig, MODES, apply_elastic, bucket_widths,
                                        check_decisions, check_modulations, elastic_step, forced_per_layer,
                                        gather_aux, layer_view, lazy_weights, per_layer_inputs, prefix_masks,
                                        router_preludes)
from edit_jax.elastic.step_cache import FirstBlockCache, MagCache, TaylorSeer

__all__ = ["DECISIONS", "ElasticConfig", "FirstBlockCache", "MagCache", "MODES", "apply_elastic", "bucket_widths", "check_decisions", "check_modulations", "elastic_step", "forced_per_layer", "gather_aux", "layer_view", "lazy_weights", "per_layer_inputs", "prefix_masks", "router_preludes", "TaylorSeer"]
