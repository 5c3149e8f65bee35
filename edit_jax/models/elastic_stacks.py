"""The elastic wiring every transformer shares around its scanned block stacks: what each stack's
scan reads per layer (forced decisions, cache, the routers' and the blocks' modulations computed
ahead, the layer index of lazy weights), running the stacks in order (split around a per-step
cache method where there is one), and the step's routing record from what the scans return.

    elastic, decisions = block_elastic(elastic, decisions, config)
    lazy, per_stack = stack_inputs(self, names, modulation_names, elastic, decisions, cache, temb, batch,
                                   router_modulations, block_modulations)
    streams, outputs, step_out = run_stacks(stacks, (txt, img), per_stack, sizes, lazy, elastic, step_cache, step)
    return velocity if outputs[0] is None else (velocity, step_aux(cfg, names, elastic, outputs, cache, n, t, step_out))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.flops import step_flops
from edit_jax.elastic.mechanism import (ElasticConfig, check_decisions, gather_aux, lazy_weights, per_layer_inputs,
                                        router_preludes, scripted_decisions)
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
    scripted = elastic is not None and decisions is not None and scripted_decisions(elastic, decisions)
    preludes = None if scripted else router_preludes(model, elastic, names, temb, dtype, router_modulations)
    modulations = modulations_ahead(model, modulation_names, temb, dtype, block_modulations)
    if more_modulations is not None and modulations is not None:
        modulations = more_modulations(modulations)
    check_decisions(elastic, decisions, len(config.width_buckets), model.is_initializing())
    caches = None if cache is None else [cache[name] for name in names]
    sizes = [layers for _, layers, _ in config.block_stacks]
    return lazy, per_layer_inputs(decisions, caches, sizes, batch, lazy, preludes, modulations)


def step_aux(config, names: Sequence[str], elastic: ElasticConfig, outputs: Sequence[dict], cache: dict | None,
             num_img: int, num_txt: int, step_out: dict | None = None) -> dict:
    """The routing record of one elastic call from its stacks' scan outputs: p, q, executed,
    cache_hit, bucket [B, L], branch [L] (`gather_aux`), the step's FLOPs (`step_flops`) and,
    with a cache, the updated cache under each stack's name.

    Args:
      config: the model config. names: the block stacks' names. elastic: the call's ElasticConfig.
      outputs: per stack its scan's outputs. cache: the call's cache, or None.
      num_img, num_txt: image and text tokens per sample (for the FLOPs).
      step_out: `run_stacks`' step-cache record ({"state", "computed", "record"}), or None: adds
        aux["step_cache"] (the updated state), aux["step_computed"] [B] and the method's record.
    """
    aux = gather_aux(outputs)
    aux["flops"] = step_flops(config, num_img, num_txt, aux, with_routers=elastic.mode != "forced")
    if cache is not None:
        aux["cache"] = {name: out["cache"] for name, out in zip(names, outputs)}
    if step_out is not None:
        aux["step_cache"] = step_out["state"]
        aux["step_computed"] = step_out["computed"]
        aux.update(step_out["record"])
    return aux


def block_elastic(elastic: ElasticConfig | None, decisions: dict | None, config) -> tuple[ElasticConfig | None, dict | None]:
    """The ElasticConfig and forced decisions the blocks run under: mode "dense" with a step cache
    runs as mode "forced" with every block on at full width (its blocks can then be left out
    cheaply), anything else as given.

    Args:
      elastic, decisions: the model call's. config: the model config (`num_blocks`, `width_buckets`).
    """
    if elastic is None or elastic.mode != "dense" or elastic.step_cache is None:
        return elastic, decisions
    total = config.num_blocks
    return dataclasses.replace(elastic, mode="forced"), {
        "run": jnp.ones((total,), bool), "bucket": jnp.full((total,), len(config.width_buckets) - 1, jnp.int32)}


class Stack(NamedTuple):
    """One block stack for `run_stacks`: apply(carry, per_layer) -> (carry, outputs) scans its
    layers (as many as per_layer's leading axis); enter(streams) -> carry and leave(carry) ->
    streams convert between its carry and the (txt, img) streams (FLUX's single-stream blocks
    carry them joined)."""

    apply: Callable
    enter: Callable = lambda streams: streams  # noqa: E731
    leave: Callable = lambda carry: carry  # noqa: E731


def _slice(tree, a: int, b: int):
    return jax.tree.map(lambda x: x[a:b], tree)


def run_stacks(stacks: Sequence[Stack], streams, per_stack: Sequence[dict], sizes: Sequence[int], lazy: bool,
               elastic: ElasticConfig | None, state: Any = None, step: jax.Array | None = None):
    """Runs the block stacks in order on the streams (txt [B, T, D], img [B, N, D]): returns (streams,
    per stack its scan outputs, the step cache's {"state", "computed" [B], "record"} or None).

    With a step cache (`elastic.step_cache`, lazy weights only: inference), the layers in scan order
    split into head, middle and tail (`edit_jax.elastic.step_cache`); the method decides after the
    head which rows compute the middle, whose layers then see a "gate" (`elastic_step`); the others
    take the method's reuse, and the method updates its state where the middle ends.

    Args:
      stacks: the block stacks (`Stack`). streams: (txt, img) entering the first. per_stack: each
        stack's scanned per-layer inputs ([L_i, ...] leaves). sizes: L_i. lazy: whether the scans take
        the weights whole (`lazy_weights`; a stack can then run any slice of its layers).
      elastic: the call's ElasticConfig. state: the step cache's state. step: [] int32.
    """
    method = None if elastic is None else elastic.step_cache
    if method is None or not lazy:
        outputs = []
        for stack, per_layer in zip(stacks, per_stack):
            carry, out = stack.apply(stack.enter(streams), per_layer)
            streams = stack.leave(carry)
            outputs.append(out)
        return streams, outputs, None
    if state is None:
        raise ValueError(f"step cache {method.name!r} needs its state: pass step_cache (`edit_jax.models.init_step_cache`)")
    total = sum(sizes)
    head, tail = method.head_layers, total - method.tail_layers
    if head > tail:
        raise ValueError(f"step cache {method.name!r}: head_layers {method.head_layers} + tail_layers "
                         f"{method.tail_layers} exceed the model's {total} blocks")
    starts = np.cumsum([0, *sizes])
    cuts = sorted({*starts.tolist(), head, tail})
    head_in, head_out, compute = streams, None, None
    pieces = [[] for _ in stacks]

    def at_boundary(g, streams, state):
        nonlocal head_out, compute
        if g == head:
            head_out = streams
            compute, state = method.decide(state, step, head_in, head_out)
        if g == tail:
            reused = method.reuse(state, head_in, head_out)
            streams = jax.tree.map(lambda n, o: jnp.where(compute[:, None, None], n, o), streams, reused)
            state = method.update(state, step, head_in, head_out, streams, compute)
        return streams, state

    for a, b in zip(cuts[:-1], cuts[1:]):
        streams, state = at_boundary(a, streams, state)
        i = int(np.searchsorted(starts, a, side="right")) - 1
        stack, offset = stacks[i], int(starts[i])
        per_layer = _slice(per_stack[i], a - offset, b - offset)
        if head <= a < tail:
            gate = compute if method.per_sample else compute[0]
            per_layer = {**per_layer, "gate": jnp.broadcast_to(gate, (b - a, *gate.shape))}
        carry, out = stack.apply(stack.enter(streams), per_layer)
        streams = stack.leave(carry)
        pieces[i].append(out)
    streams, state = at_boundary(total, streams, state)
    outputs = [jax.tree.map(lambda *xs: jnp.concatenate(xs), *p) if len(p) > 1 else p[0] for p in pieces]
    return streams, outputs, {"state": state, "computed": compute, "record": method.record(state)}
