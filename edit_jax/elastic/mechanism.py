"""The E-DiT mechanism (SPEC sections 1-3): a router per block, block skipping, MLP width buckets.

One mechanism wraps any block. A block opts in by giving (a) the token groups its router reads
(its input tokens, with their validity masks) and (b) a body `body(module, carry, width,
hidden_mask) -> carry` whose elastic MLP keeps only its first `width` hidden channels
(`width` static) and multiplies its hidden activations by `hidden_mask` [B, width].

The hidden channels are stored in G groups (the model config's `width_groups`,
`layers.channel_ranks`): channel j at position (j mod G) * M / G + j // G, so "the first m
channels" are the first m / G positions of each group, and each bucket takes an equal share of
every tensor shard of the MLP axis (with G a multiple of the shard count) instead of a prefix
that sits on the first shards and must first be moved to the others. G = 1 is the plain order.

Modes (ElasticConfig.mode):
  dense   routers ignored: the base model, bit for bit.
  train   straight-through gate and width mask; the whole block is computed and blended.
  infer   hard decisions: a block runs when p >= tau, at the bucket argmax(q).
  forced  the caller's decisions (run [B, L], bucket [B, L]).
In infer and forced modes a `lax.switch` picks one of 1 + K branches: skip (the block costs
nothing) or run at bucket k (static weight slices, so narrow buckets do fewer FLOPs). In these
modes the block stack's weights stay stacked [L, ...] through the scan and each branch slices its
layer out itself, so a skipped block never reads (or copies) its weights. With
decision="sample", each row keeps its own decisions: the block runs when any row needs it, at the
widest bucket any running row needs; rows that skip are left untouched and narrower rows have
their channels past their own bucket masked, so every row gets exactly its own result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.block_cache import BlockCacheMethod, LearnedReuse, RouterGuidedCache
from edit_jax.elastic.step_cache import StepCacheMethod
from edit_jax.layers import channel_ranks, check_values, narrow
from edit_jax.elastic.router import router_modulation, router_prelude


MODES = ("dense", "train", "infer", "forced")
DECISIONS = ("batch", "sample")


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """How the routers act in one call (static: a new value recompiles).

    tau: gate threshold on p = P(run). decision: "batch" (one decision for the whole batch from
    the batch means of p and q, as the released code) or "sample" (per-row decisions, exact).
    cache: E-DiT's router-guided block cache (`edit_jax.elastic.block_cache.RouterGuidedCache`) with
    cache_start, delta_margin and max_reuse; block_cache: another per-block cache method instead
    (`edit_jax.elastic.block_cache.BlockCacheMethod`). `cache_method` is the one that runs.
    step_cache: a per-step cache method around the block stacks (`edit_jax.elastic.step_cache`:
    first-block cache, MagCache), in any mode but "train"; with mode "dense" the base model runs
    under it (every block at full width, no router).
    """

    mode: str = "infer"
    tau: float = 0.5
    decision: str = "batch"
    cache: bool = False
    cache_start: int = 15
    delta_margin: float = 0.015
    max_reuse: int = 10
    block_cache: BlockCacheMethod | None = None
    step_cache: StepCacheMethod | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"elastic mode {self.mode!r} is not one of {MODES}")
        if self.decision not in DECISIONS:
            raise ValueError(f"elastic decision {self.decision!r} is not one of {DECISIONS}")
        if not 0.0 <= self.tau <= 1.0:  # p is a probability: past 1 no block would ever run
            raise ValueError(f"elastic tau {self.tau} must be in [0, 1]")
        if not self.delta_margin >= 0.0 or self.cache_start < 0 or self.max_reuse < 0:
            raise ValueError(f"elastic cache settings must be >= 0: delta_margin {self.delta_margin}, "
                             f"cache_start {self.cache_start}, max_reuse {self.max_reuse}")
        if self.cache and self.block_cache is not None:
            raise ValueError(f"elastic cache=True runs the router-guided cache; block_cache {self.block_cache!r} "
                             "would replace it: give one of them")
        if self.step_cache is not None and self.mode == "train":
            raise ValueError(f"step_cache {self.step_cache.name!r} runs at inference: elastic mode 'train' computes every block")

    @property
    def runs_base_model(self) -> bool:
        """Whether calls return the base model's velocity alone (mode "dense" without a step cache)."""
        return self.mode == "dense" and self.step_cache is None

    @property
    def cache_method(self) -> BlockCacheMethod | None:
        """The per-block cache method that runs (None: no block cache)."""
        if self.block_cache is not None:
            return self.block_cache
        return RouterGuidedCache(self.cache_start, self.delta_margin, self.max_reuse) if self.cache else None


def with_router_mode(elastic: ElasticConfig | None, mode: dict) -> ElasticConfig | None:
    """`elastic` for routers trained for `mode` (`edit_jax.checkpoint.router_mode`): routers trained
    to reuse run with their `LearnedReuse` where no block cache was asked for; a router-guided or
    other block cache in its place is refused (it would turn their reuse into skips). Skip-trained
    routers, dense and forced runs: as given."""
    if elastic is None or elastic.mode not in ("infer", "train") or mode.get("closed") != "reuse":
        return elastic
    trained = LearnedReuse(mode["max_reuse"], mode["order"])
    if elastic.cache_method is None:
        return dataclasses.replace(elastic, block_cache=trained)
    if elastic.cache_method != trained:
        raise ValueError(f"these routers were trained to reuse ({trained}): the block cache "
                         f"{elastic.cache_method.name!r} would replace their reuse; run them without --cache")
    return elastic


def bucket_widths(hidden_dim: int, buckets: Sequence[float]) -> tuple[int, ...]:
    """Hidden channels kept by each bucket: round(S[k] * M)."""
    widths = tuple(int(round(s * hidden_dim)) for s in buckets)
    if any(w < 1 for w in widths) or list(widths) != sorted(widths) or widths[-1] != hidden_dim:
        raise ValueError(f"width buckets {tuple(buckets)} of {hidden_dim} channels must increase to 1")
    return widths


def prefix_masks(hidden_dim: int, buckets: Sequence[float], groups: int = 1) -> jax.Array:
    """[K, M] float32 over stored positions: row k keeps the first S[k] * M channels (stored in
    `groups` groups, `layers.channel_ranks`)."""
    widths = np.asarray(bucket_widths(hidden_dim, buckets))
    return jnp.asarray(channel_ranks(hidden_dim, groups)[None, :] < widths[:, None], jnp.float32)


def _blend(new, old, weight):
    """old + weight [B] * (new - old), leaf by leaf ([B, L, D] leaves)."""
    return jax.tree.map(lambda n, o: o + weight[:, None, None].astype(o.dtype) * (n - o), new, old)


def _select_rows(new, old, rows):
    return jax.tree.map(lambda n, o: jnp.where(rows[:, None, None], n, o), new, old)


def scripted_decisions(elastic: ElasticConfig, forced: dict | None) -> bool:
    """Whether a call's decisions come from the caller, not the routers: mode "forced", or mode
    "train" given {"p", "bucket"} (a learned per-step schedule's probabilities, trained through
    the same straight-through gate as the routers' p)."""
    return elastic.mode == "forced" or (elastic.mode == "train" and forced is not None and "p" in forced)


def lazy_weights(elastic: ElasticConfig | None, initializing: bool) -> bool:
    """Whether a block stack keeps its weights stacked through the scan and slices a layer only
    where it is used (infer and forced modes: inside the switch branch that runs the block)."""
    return elastic is not None and elastic.mode in ("infer", "forced") and not initializing


def layer_view(fn: Callable, collection: str, layer: jax.Array | None) -> Callable:
    """fn(module, ...) seeing layer `layer` of its stacked `collection` variables (None: as is)."""
    if layer is None:
        return fn

    def take(x):  # x[layer], in the form that is quicker to trace
        return jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)

    return nn.map_variables(fn, collection, trans_in_fn=lambda v: jax.tree.map(take, v))


def elastic_step(
    module: nn.Module,
    body: Callable,
    carry,
    router_groups,
    temb: jax.Array,
    hidden_dim: int,
    buckets: Sequence[float],
    elastic: ElasticConfig | None,
    per_layer: dict,
    step: jax.Array | None = None,
    groups: int = 1,
):
    """Runs one block under the elastic config: returns (new carry, per-layer outputs or None).

    module: the block (has a `router` submodule); body(module, carry, width, hidden_mask).
    per_layer: {"forced": {"run" or "p", "bucket"}, [B] or [] for one decision for all rows;
    in mode "forced" the router is not run}, optionally "router_prelude": the router's temb-only
    half computed ahead (`router_preludes`), with a block cache {"cache": this layer's state of
    `elastic.cache_method`}, with a step cache {"gate": [] or [B] bool, the rows its middle
    layers may compute (`edit_jax.models.elastic_stacks.run_stacks`)}, and with lazy weights
    {"layer": []} (the module's variables are then the whole stack, see `lazy_weights`); step: the
    denoising step index; groups: G, how the MLP's hidden channels are stored. Outputs: {"aux": p [B], q [B, K], executed [B]
    (rows that computed the block), cache_hit [B], bucket [B], branch [] (0 skipped, 1 + k ran at
    bucket k)} and "cache" when given.

    Args:
      carry: the block's input, a pytree of [B, L, D]. router_groups: (tokens [B, L_i, D], valid
        [B, L_i] or None) pairs the router reads. temb: [B, D]. hidden_dim: M, the MLP's hidden
        width. buckets: the width buckets' shares of M. elastic: the call's ElasticConfig.
      module, body, per_layer, step, groups: above.
    """
    if elastic is None or elastic.mode == "dense":
        with jax.named_scope("elastic_block"):
            return body(module, carry, None, None), None
    forced, cache, layer = per_layer["forced"], per_layer.get("cache"), per_layer.get("layer")
    batch = temb.shape[0]
    scripted = scripted_decisions(elastic, forced) and not module.is_initializing()
    if scripted:  # the caller decides (in mode "train": a learned step schedule's p): the routers are not run
        given = forced["p"] if "p" in forced else forced["run"]
        p = jnp.broadcast_to(given.astype(jnp.float32), (batch,))
        q = jax.nn.one_hot(jnp.broadcast_to(forced["bucket"], (batch,)), len(buckets))
    else:
        with jax.named_scope("elastic_router"):  # profiles split a step's time by these scopes
            prelude = per_layer.get("router_prelude")
            gate_logit, width_logits = layer_view(
                lambda mdl: mdl.router(router_groups, temb, prelude), "routers", layer
            )(module)
        p, q = jax.nn.sigmoid(gate_logit), jax.nn.softmax(width_logits, axis=-1)
    masks = prefix_masks(hidden_dim, buckets, groups)
    widths = bucket_widths(hidden_dim, buckets)
    num = len(buckets)

    if module.is_initializing() or elastic.mode == "train":
        hard = (p >= elastic.tau).astype(jnp.float32)
        gate = hard + p - jax.lax.stop_gradient(p)
        bucket = jnp.argmax(q, axis=-1)
        m_soft = q @ masks
        m_hard = jax.nn.one_hot(bucket, num) @ masks
        mask = m_hard + m_soft - jax.lax.stop_gradient(m_soft)
        with jax.named_scope("elastic_block"):
            out = body(module, carry, None, mask)
        method = elastic.cache_method if cache is not None and not module.is_initializing() else None
        if method is not None and not getattr(method, "closed_skips", True):  # closed: reuse, not the identity
            reusable = method.decide(cache, step, jnp.zeros_like(hard, bool), p, elastic.tau)
            new = _blend(out, _select_rows(method.reuse(cache, carry), out, reusable), gate)
            computed = (hard > 0) | ~reusable
            cache = method.update(cache, step, carry, out, computed, ~computed)
            executed, hit = computed, ~computed
        else:
            new = _blend(out, carry, gate)
            executed, hit = hard > 0, jnp.zeros_like(hard, bool)
        aux = dict(p=p, q=q, executed=executed, cache_hit=hit, bucket=bucket.astype(jnp.int32),
                   branch=jnp.asarray(num, jnp.int32))
        return new, {"aux": aux, **({"cache": cache} if cache is not None else {})}

    decided_p = p
    if elastic.mode == "forced":
        run = p >= elastic.tau if "p" in forced else p > 0
        bucket = jnp.broadcast_to(forced["bucket"], (batch,)).astype(jnp.int32)
        per_sample = forced["bucket"].ndim > 0  # [L] decisions are the same for every row
    else:
        run, bucket = p >= elastic.tau, jnp.argmax(q, axis=-1).astype(jnp.int32)
        per_sample = elastic.decision == "sample"
        if not per_sample:
            decided_p = jnp.broadcast_to(jnp.mean(p), p.shape)
            run = decided_p >= elastic.tau
            bucket = jnp.broadcast_to(jnp.argmax(jnp.mean(q, axis=0)).astype(jnp.int32), bucket.shape)

    method = elastic.cache_method if cache is not None else None
    reuse = jnp.zeros_like(run) if method is None else method.decide(cache, step, run, decided_p, elastic.tau)
    if method is not None and not getattr(method, "closed_skips", True):
        run = jnp.ones_like(run)  # a closed block reuses; one that cannot computes
    step_gate = per_layer.get("gate")
    if step_gate is not None:  # rows the step cache reuses this step: neither computed nor counted by the block cache
        reuse, compute = reuse & step_gate, run & ~reuse & step_gate
    else:
        compute = run & ~reuse

    widest = jnp.max(jnp.where(compute, bucket, 0))
    index = jnp.where(jnp.any(compute), 1 + widest, 0)
    row_mask = masks[bucket] if per_sample else None

    def skip(mdl, c, m):
        return c

    def run_at(width):
        def branch(mdl, c, m):
            return body(mdl, c, width, None if m is None else narrow(m, 1, width, groups))

        viewed = layer_view(branch, "params", layer)

        def scoped(mdl, c, m):  # the scope holds the slicing of the layer's weights too
            with jax.named_scope("elastic_block"):
                return viewed(mdl, c, m)

        return scoped

    new = nn.switch(index, [skip] + [run_at(w) for w in widths], module, carry, row_mask)
    if per_sample or method is not None or (step_gate is not None and step_gate.ndim > 0):
        new = _select_rows(new, carry, compute)
    outputs = {}
    if method is not None:
        new = _select_rows(method.reuse(cache, carry), new, reuse)
        outputs["cache"] = method.update(cache, step, carry, new, compute, reuse)
    elif cache is not None:
        outputs["cache"] = cache
    outputs["aux"] = dict(p=p, q=q, executed=compute, cache_hit=reuse, bucket=bucket, branch=index.astype(jnp.int32))
    return new, outputs


def router_preludes(model: nn.Module, elastic: ElasticConfig | None, stacks: Sequence[str], temb: jax.Array,
                    dtype, modulations: Sequence[jax.Array] | None = None) -> list[dict] | None:
    """Per block stack, the half of every router that reads only temb (`router_prelude`: the
    modulation and the scaled proj kernel, [L_i, B, ...]), computed once per step with batched
    matmuls ahead of the scan instead of small ops and weight copies in every block. None where
    no router runs (dense and forced modes, init).

    modulations: per stack the routers' shift and scale [L_i, B, 2D] computed ahead for this
    step's temb (`edit_jax.models.router_modulations`, e.g. for every step of a sampling run at
    once); None computes them here.

    Args:
      model: the transformer (inside its call). elastic: the call's ElasticConfig. stacks: the
        block stacks' names. temb: [B, D]. dtype: the compute dtype. modulations: above.
    """
    runs_routers = elastic is not None and elastic.mode in ("infer", "train")
    if modulations is not None and not runs_routers:
        raise ValueError(f"router_modulations were given, but elastic mode {getattr(elastic, 'mode', None)!r} runs no router")
    if not runs_routers or model.is_initializing():
        return None
    routers = model.variables.get("routers")
    if routers is None:
        raise ValueError(f"elastic mode {elastic.mode!r} runs the routers: apply with {{'params', 'routers'}}")
    if modulations is not None:
        check_modulations(modulations, [routers[name]["router"] for name in stacks], temb.shape)
    with jax.named_scope("elastic_router"):
        return [router_prelude(routers[name]["router"],
                               router_modulation(routers[name]["router"], temb, dtype) if modulations is None else modulations[i],
                               dtype)
                for i, name in enumerate(stacks)]


def check_modulations(modulations: Sequence[jax.Array], stack_routers: Sequence[dict], temb_shape) -> None:
    """Raises ValueError unless there is one [L_i, B, 2D] array per block stack."""
    if len(modulations) != len(stack_routers):
        raise ValueError(f"router_modulations holds {len(modulations)} arrays, expected one per block stack ({len(stack_routers)})")
    batch, dim = temb_shape
    for i, (mod, weights) in enumerate(zip(modulations, stack_routers)):
        expected = (weights["proj"]["kernel"].shape[0], batch, 2 * dim)
        if tuple(mod.shape) != expected:
            raise ValueError(f"router_modulations[{i}] has shape {tuple(mod.shape)}, expected {list(expected)} "
                             "(layers, batch, 2 x inner_dim): computed for another model or batch?")


def check_decisions(elastic: ElasticConfig | None, decisions: dict | None, num_buckets: int, initializing: bool) -> None:
    """Forced decisions come exactly with mode "forced" (a forced call without them would run the
    placeholders, every block at the narrowest width; in another mode they would be ignored), or as
    {"p", "bucket"} with mode "train" (a learned step schedule, `scripted_decisions`) and,
    where concrete, name buckets 0..K-1 and probabilities in [0, 1] (under jit an index past the
    last bucket would be clamped to it). Raises ValueError.

    Args:
      elastic: the call's ElasticConfig. decisions: the call's forced decisions or None.
      num_buckets: K. initializing: whether the model is being initialised (nothing is checked).
    """
    if initializing:
        return
    forced = elastic is not None and elastic.mode == "forced"
    if forced and decisions is None:
        raise ValueError("elastic mode 'forced' needs decisions={'run' (or 'p'): ..., 'bucket': ...}, each [L] or [B, L]")
    if decisions is None:
        return
    trained = elastic is not None and elastic.mode == "train" and set(decisions) == {"p", "bucket"}
    if not forced and not trained:
        raise ValueError("decisions are read only in elastic mode 'forced' (and {'p', 'bucket'} in mode 'train'), "
                         f"not {getattr(elastic, 'mode', 'dense')!r}")
    check_values("forced bucket", decisions.get("bucket"), lambda b: ((b >= 0) & (b < num_buckets)).all(),
                 f"a width bucket 0..{num_buckets - 1}")
    check_values("forced p", decisions.get("p"), lambda p: ((p >= 0) & (p <= 1)).all(), "in [0, 1]")


def per_layer_inputs(
    decisions: dict | None, caches: Sequence[dict] | None, stack_sizes: Sequence[int], batch: int, lazy: bool,
    preludes: Sequence[dict] | None = None, modulations: Sequence[dict] | None = None,
) -> list[dict]:
    """The scanned per-layer inputs of each block stack: forced decisions, the stack's cache
    (when given), the routers' preludes (`router_preludes`, when given), the blocks' own
    modulations (`edit_jax.layers.modulations_ahead`, when given) and, with lazy weights
    (`lazy_weights`), the layer index.

    Args:
      decisions: forced decisions ([L] or [B, L]) or None. caches: per stack its cache state, or
        None. stack_sizes: layers per stack. batch: B. lazy: whether weights are sliced per layer.
      preludes, modulations: per stack, computed ahead, or None.
    """
    out = []
    for i, (forced, size) in enumerate(zip(forced_per_layer(decisions, stack_sizes, batch), stack_sizes)):
        inputs = {"forced": forced}
        if caches is not None:
            inputs["cache"] = caches[i]
        if preludes is not None:
            inputs["router_prelude"] = preludes[i]
        if modulations is not None:
            inputs["modulation"] = modulations[i]
        if lazy:
            inputs["layer"] = jnp.arange(size)
        out.append(inputs)
    return out


def forced_per_layer(decisions: dict | None, stack_sizes: Sequence[int], batch: int) -> list[dict]:
    """Splits forced decisions of shape [L] or [B, L] (L = all blocks, in scan order) into one
    dict of [L_i] or [L_i, B] arrays per block stack. Keys: "run" (bool) or "p" (scripted router
    probabilities, decided with tau and the cache rule), and "bucket". None: placeholders."""
    total = sum(stack_sizes)
    if decisions is None:
        decisions = {"run": jnp.ones((total,), bool), "bucket": jnp.zeros((total,), jnp.int32)}
    if set(decisions) not in ({"run", "bucket"}, {"p", "bucket"}):
        raise ValueError(f"forced decisions need the keys 'run' (or 'p') and 'bucket', got {sorted(decisions)}")
    dtypes = {"run": bool, "p": jnp.float32, "bucket": jnp.int32}
    values = {k: jnp.asarray(v).astype(dtypes[k]) for k, v in decisions.items()}
    for key, value in values.items():
        if value.shape not in ((total,), (batch, total)):
            raise ValueError(f"forced {key} has shape {value.shape}, expected [{total}] or [{batch}, {total}]")
    per_row = any(v.ndim == 2 for v in values.values())
    # [L] decisions stay [L] (one decision for every row); [B, L] become [L, B]
    out = {k: jnp.broadcast_to(v, (batch, total)).T if per_row else v for k, v in values.items()}
    bounds = np.cumsum([0, *stack_sizes])
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def gather_aux(stack_outputs: Sequence[dict]) -> dict:
    """Joins the per-stack aux records ([L_i, B, ...] from nn.scan) into p [B, L], q [B, L, K],
    executed, cache_hit, bucket [B, L] and branch [L]."""
    stack_aux = [o["aux"] for o in stack_outputs]
    joined = {k: jnp.concatenate([a[k] for a in stack_aux], axis=0) for k in stack_aux[0]}
    out = {k: jnp.moveaxis(v, 0, 1) for k, v in joined.items() if k != "branch"}
    out["branch"] = joined["branch"]
    return out


def apply_elastic(model: nn.Module, params: dict, routers: dict, *args, freeze_base: bool = False, **kwargs):
    """model.apply with base params and routers; `freeze_base` stops gradients into the base
    params (train the routers alone, SPEC section 4).

    Args:
      model: the transformer. params: its base params. routers: its routers.
      *args, **kwargs: model.apply's. freeze_base: above.
    """
    if freeze_base:
        params = jax.lax.stop_gradient(params)
    return model.apply({"params": params, "routers": routers}, *args, **kwargs)
