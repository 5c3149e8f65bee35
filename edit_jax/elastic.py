"""The E-DiT mechanism (SPEC sections 1-3): a router per block, block skipping, MLP width buckets.

One mechanism wraps any block. A block opts in by giving (a) the token groups its router reads
(its input tokens, with their validity masks) and (b) a body `body(module, carry, width,
hidden_mask) -> carry` whose elastic MLP keeps only its first `width` hidden channels
(`width` static) and multiplies its hidden activations by `hidden_mask` [B, width].

Modes (ElasticConfig.mode):
  dense   routers ignored: the base model, bit for bit.
  train   straight-through gate and width mask; the whole block is computed and blended.
  infer   hard decisions: a block runs when p >= tau, at the bucket argmax(q).
  forced  the caller's decisions (run [B, L], bucket [B, L]).
In infer and forced modes a `lax.switch` picks one of 1 + K branches: skip (the block costs
nothing) or run at bucket k (static weight slices, so narrow buckets do fewer FLOPs). With
decision="sample", each row keeps its own decisions: the block runs when any row needs it, at the
widest bucket any running row needs; rows that skip are left untouched and narrower rows have
their channels past their own bucket masked, so every row gets exactly its own result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.config import RuntimeConfig
from edit_jax.layers import Linear, Modulation, layer_norm, modulate

MODES = ("dense", "train", "infer", "forced")
DECISIONS = ("batch", "sample")


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """How the routers act in one call (static: a new value recompiles).

    tau: gate threshold on p = P(run). decision: "batch" (one decision for the whole batch from
    the batch means of p and q, as the released code) or "sample" (per-row decisions, exact).
    """

    mode: str = "infer"
    tau: float = 0.5
    decision: str = "batch"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"elastic mode {self.mode!r} is not one of {MODES}")
        if self.decision not in DECISIONS:
            raise ValueError(f"elastic decision {self.decision!r} is not one of {DECISIONS}")


def bucket_widths(hidden_dim: int, buckets: Sequence[float]) -> tuple[int, ...]:
    """Hidden channels kept by each bucket: round(S[k] * M)."""
    widths = tuple(int(round(s * hidden_dim)) for s in buckets)
    if any(w < 1 for w in widths) or list(widths) != sorted(widths) or widths[-1] != hidden_dim:
        raise ValueError(f"width buckets {tuple(buckets)} of {hidden_dim} channels must increase to 1")
    return widths


def prefix_masks(hidden_dim: int, buckets: Sequence[float]) -> jax.Array:
    """[K, M] float32: row k keeps the first S[k] * M channels."""
    widths = np.asarray(bucket_widths(hidden_dim, buckets))
    return jnp.asarray(np.arange(hidden_dim)[None, :] < widths[:, None], jnp.float32)


def _kaiming_uniform_sqrt5():
    # PyTorch Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class Router(nn.Module):
    """One block's router (SPEC section 1), params in the "routers" collection.

    shift, scale = Linear_D->3D(SiLU(temb)) (third chunk unused); h = ReLU(proj(LN(x)*(1+scale)+shift));
    gate logit = mean over valid tokens of gate_head(h); width logits = mean of width_head(h).
    groups: sequence of (tokens [B, L_i, D], valid [B, L_i] or None); the mean runs over all
    valid tokens of all groups. Returns (gate_logit [B], width_logits [B, K]) in float32.
    Init ("full-capacity start"): p = 0.7 and the full-width bucket ahead by 2 logits.
    """

    hidden: int
    num_buckets: int
    runtime: RuntimeConfig

    @nn.compact
    def __call__(self, groups, temb):
        rt = self.runtime
        small = nn.initializers.normal(1e-3)
        trunk = dict(collection="routers", kernel_init=_kaiming_uniform_sqrt5())
        shift, scale, _ = Modulation(3, rt, name="img_mod", **trunk)(temb)
        proj = Linear(self.hidden, ("embed", "router"), rt, name="proj", **trunk)
        gate_head = Linear(1, ("router", "gate"), rt, name="gate_head", collection="routers", kernel_init=small,
                           bias_init=nn.initializers.constant(_logit(0.7)))
        full_width = np.zeros(self.num_buckets, np.float32)
        full_width[-1] = 2.0
        width_head = Linear(self.num_buckets, ("router", "bucket"), rt, name="width_head", collection="routers",
                            kernel_init=small, bias_init=lambda key, shape, dtype: jnp.asarray(full_width, dtype))
        total, count = 0.0, 0.0
        for tokens, valid in groups:
            h = nn.relu(proj(modulate(layer_norm(tokens), shift, scale)))
            logits = jnp.concatenate([gate_head(h), width_head(h)], axis=-1).astype(jnp.float32)
            weight = jnp.ones(tokens.shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
            total = total + jnp.einsum("bl,blc->bc", weight, logits)
            count = count + weight.sum(axis=1)
        mean = total / jnp.maximum(count, 1.0)[:, None]
        return mean[:, 0], mean[:, 1:]


def _blend(new, old, weight):
    """old + weight [B] * (new - old), leaf by leaf ([B, L, D] leaves)."""
    return jax.tree.map(lambda n, o: o + weight[:, None, None].astype(o.dtype) * (n - o), new, old)


def _select_rows(new, old, rows):
    return jax.tree.map(lambda n, o: jnp.where(rows[:, None, None], n, o), new, old)


def elastic_step(
    module: nn.Module,
    body: Callable,
    carry,
    router_groups,
    temb: jax.Array,
    hidden_dim: int,
    buckets: Sequence[float],
    elastic: ElasticConfig | None,
    forced: dict | None = None,
):
    """Runs one block under the elastic config: returns (new carry, aux or None).

    module: the block (has a `router` submodule); body(module, carry, width, hidden_mask).
    forced: {"run": [B] bool, "bucket": [B] int} for mode "forced".
    aux: p [B], q [B, K], executed [B] bool, bucket [B] int32, and branch [] int32: what the
    batch actually computed (0: skipped, 1 + k: ran at bucket k).
    """
    if elastic is None or elastic.mode == "dense":
        return body(module, carry, None, None), None
    gate_logit, width_logits = module.router(router_groups, temb)
    p, q = jax.nn.sigmoid(gate_logit), jax.nn.softmax(width_logits, axis=-1)
    masks = prefix_masks(hidden_dim, buckets)
    widths = bucket_widths(hidden_dim, buckets)
    num = len(buckets)

    if module.is_initializing() or elastic.mode == "train":
        hard = (p >= elastic.tau).astype(jnp.float32)
        gate = hard + p - jax.lax.stop_gradient(p)
        bucket = jnp.argmax(q, axis=-1)
        m_soft = q @ masks
        m_hard = jax.nn.one_hot(bucket, num) @ masks
        mask = m_hard + m_soft - jax.lax.stop_gradient(m_soft)
        new = _blend(body(module, carry, None, mask), carry, gate)
        branch = jnp.asarray(num, jnp.int32)  # the whole block, at full width
        return new, dict(p=p, q=q, executed=hard > 0, bucket=bucket.astype(jnp.int32), branch=branch)

    if elastic.mode == "forced":
        run, bucket = forced["run"].astype(bool), forced["bucket"].astype(jnp.int32)
        per_sample = True
    else:
        run, bucket = p >= elastic.tau, jnp.argmax(q, axis=-1).astype(jnp.int32)
        per_sample = elastic.decision == "sample"
        if not per_sample:
            run = jnp.broadcast_to(jnp.mean(p) >= elastic.tau, p.shape)
            bucket = jnp.broadcast_to(jnp.argmax(jnp.mean(q, axis=0)).astype(jnp.int32), bucket.shape)

    widest = jnp.max(jnp.where(run, bucket, 0))
    index = jnp.where(jnp.any(run), 1 + widest, 0)
    row_mask = masks[bucket] if per_sample else None

    def skip(mdl, c, m):
        return c

    def run_at(width):
        def branch(mdl, c, m):
            return body(mdl, c, width, None if m is None else m[:, :width])

        return branch

    new = nn.switch(index, [skip] + [run_at(w) for w in widths], module, carry, row_mask)
    if per_sample:
        new = _select_rows(new, carry, run)
    return new, dict(p=p, q=q, executed=run, bucket=bucket, branch=index.astype(jnp.int32))


def forced_per_layer(decisions: dict | None, stack_sizes: Sequence[int], batch: int) -> list[dict]:
    """Splits forced decisions {"run", "bucket"} of shape [L] or [B, L] (L = all blocks, in scan
    order) into one {"run", "bucket"} [L_i, B] per block stack. None: placeholders, never read."""
    total = sum(stack_sizes)
    if decisions is None:
        decisions = {"run": jnp.ones((total,), bool), "bucket": jnp.zeros((total,), jnp.int32)}
    if set(decisions) != {"run", "bucket"}:
        raise ValueError(f"forced decisions need exactly the keys 'run' and 'bucket', got {sorted(decisions)}")
    out = {}
    for key, dtype in (("run", bool), ("bucket", jnp.int32)):
        value = jnp.asarray(decisions[key]).astype(dtype)
        if value.shape not in ((total,), (batch, total)):
            raise ValueError(f"forced {key} has shape {value.shape}, expected [{total}] or [{batch}, {total}]")
        out[key] = jnp.broadcast_to(value, (batch, total)).T
    bounds = np.cumsum([0, *stack_sizes])
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def gather_aux(stack_aux: Sequence[dict]) -> dict:
    """Joins the per-stack aux records ([L_i, B, ...] from nn.scan) into p [B, L], q [B, L, K],
    executed [B, L], bucket [B, L] and branch [L]."""
    joined = {k: jnp.concatenate([a[k] for a in stack_aux], axis=0) for k in stack_aux[0]}
    out = {k: jnp.moveaxis(v, 0, 1) for k, v in joined.items() if k != "branch"}
    out["branch"] = joined["branch"]
    return out


def apply_elastic(model: nn.Module, params: dict, routers: dict, *args, freeze_base: bool = False, **kwargs):
    """model.apply with base params and routers; `freeze_base` stops gradients into the base
    params (train the routers alone, SPEC section 4)."""
    if freeze_base:
        params = jax.lax.stop_gradient(params)
    return model.apply({"params": params, "routers": routers}, *args, **kwargs)
