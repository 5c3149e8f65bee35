"""The seam for per-step cache methods: around a model's block stacks, decide once per step whether
the stacks run or their stored residual is reused, with the method's state as arrays in the
sampler's carry (no hooks, no host round-trips; data-dependent decisions under jit).

The stacks' layers, in scan order, split into three parts: the first `head_layers` always run;
the middle runs only for the rows the method says compute; the last `tail_layers` always run.
A method sees the streams (txt [B, T, D], img [B, N, D]) entering the head and leaving it:

    state = method.init(stream_shapes, batch)                          # nothing stored
    compute, state = method.decide(state, step, head_in, head_out)     # [B] bool
    streams = method.reuse(state, head_in, head_out)                   # the middle's output for reusing rows
    state = method.update(state, step, head_in, head_out, middle_out, compute)
    method.record(state)                                               # {name: [B]} for the sampler's records

`edit_jax.models.elastic_stacks.run_stacks` calls them; rows that do not compute leave the
middle's layers untouched (a layer no row computes costs nothing) and take `reuse`. With
`per_sample` each row decides on its own statistics; otherwise one decision over the whole call's
rows, as diffusers' hooks decide (its pipelines run the unconditional CFG branch as a separate
call: `SamplerConfig(cfg_mode="sequential")` matches them exactly).

`FirstBlockCache` is diffusers' `FirstBlockCacheConfig` (with cache-dit's first-F / last-B
generalisation); `MagCache` is diffusers' `MagCacheConfig`, calibration included; `TaylorSeer` is
diffusers' `TaylorSeerCacheConfig` on every block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Streams = tuple  # (txt [B, T, D], img [B, N, D])


class StepCacheMethod(Protocol):
    """What `edit_jax.models.elastic_stacks.run_stacks` asks of a per-step cache method (see the module)."""

    name: str
    head_layers: int
    tail_layers: int
    per_sample: bool

    def init(self, stream_shapes: Streams, batch: int) -> Any:
        """The empty state for streams of these shapes ((B, T, D), (B, N, D))."""

    def decide(self, state, step: jax.Array, head_in: Streams, head_out: Streams) -> tuple[jax.Array, Any]:
        """([B] bool, the rows whose middle layers compute; the state after deciding).

        Args:
          state: the method's state. step: [] int32, the denoising step. head_in, head_out: the
            streams entering and leaving the first `head_layers` layers (equal where there are none).
        """

    def reuse(self, state, head_in: Streams, head_out: Streams) -> Streams:
        """The streams a reusing row takes in place of the middle layers' output."""

    def update(self, state, step: jax.Array, head_in: Streams, head_out: Streams, middle_out: Streams,
               compute: jax.Array) -> Any:
        """The state after the step.

        Args:
          state: the state after `decide`. step: [] int32. head_in, head_out: as `decide`'s.
          middle_out: the streams leaving the middle (reusing rows' included). compute: [B] bool,
            the rows that computed the middle.
        """

    def record(self, state) -> dict:
        """Per-step values worth recording, each [B]."""


def describe(method: StepCacheMethod) -> dict:
    """A step cache's name and settings, for a JSON record."""
    fields = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}
    return {"name": method.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _zeros(shape):
    return jnp.zeros(shape, jnp.float32)


def _where_rows(rows, new, old):
    return jax.tree.map(lambda n, o: jnp.where(rows[:, None, None], n, o), new, old)


def _check_layers(head: int, tail: int, name: str) -> None:
    if head < 0 or tail < 0:
        raise ValueError(f"{name}: head_layers {head} and tail_layers {tail} must be >= 0")


@flax.struct.dataclass
class FirstBlockState:
    """head_residual: [B, N, D] float32, the head's image residual at the last computed step;
    tail_residual: (txt [B, T, D], img [B, N, D]) float32, the middle's output minus the head's
    then; stored: [B] bool, whether they hold one; diff: [B] float32, this step's relative change
    of the head residual (0 where nothing is stored)."""

    head_residual: jax.Array
    tail_residual: Streams
    stored: jax.Array
    diff: jax.Array


@dataclasses.dataclass(frozen=True)
class FirstBlockCache:
    """First-block cache (diffusers' `FirstBlockCacheConfig`; ParaAttention's FBCache): the
    middle computes when the head's image residual changed, relative to the one of the last
    computed step, by more than `threshold` (mean |r - r_prev| / mean |r_prev|); otherwise it
    adds the middle's residual stored then to the head's output (both streams).

    head_layers (F) and tail_layers (B): cache-dit's DBCache generalisation, the first F layers
    decide and always run, the last B always recompute; F = 1, B = 0 is diffusers'.
    per_sample: each row decides on its own means (diffusers: one decision over the call's rows).
    """

    threshold: float = 0.05
    head_layers: int = 1
    tail_layers: int = 0
    per_sample: bool = False
    name = "first_block"

    def __post_init__(self):
        if not self.threshold >= 0.0:
            raise ValueError(f"first-block cache threshold must be >= 0, got {self.threshold}")
        _check_layers(self.head_layers, self.tail_layers, "first-block cache")
        if self.head_layers < 1:
            raise ValueError("first-block cache needs head_layers >= 1: it decides from the head's residual")

    def init(self, stream_shapes: Streams, batch: int) -> FirstBlockState:
        """Nothing stored (arguments: `StepCacheMethod.init`)."""
        txt, img = stream_shapes
        return FirstBlockState(head_residual=_zeros(img), tail_residual=(_zeros(txt), _zeros(img)),
                               stored=jnp.zeros((batch,), bool), diff=jnp.zeros((batch,), jnp.float32))

    def decide(self, state: FirstBlockState, step, head_in, head_out):
        """Compute where nothing is stored or the head residual moved by more than the threshold.

        Args: as `StepCacheMethod.decide`'s.
        """
        residual = _f32(head_out[1]) - _f32(head_in[1])
        change, before = jnp.abs(residual - state.head_residual), jnp.abs(state.head_residual)
        if self.per_sample:
            diff = jnp.mean(change, axis=(1, 2)) / jnp.mean(before, axis=(1, 2))
        else:
            diff = jnp.broadcast_to(jnp.mean(change) / jnp.mean(before), state.stored.shape)
        diff = jnp.where(state.stored, diff, 0.0)
        compute = ~state.stored | (diff > self.threshold)
        return compute, state.replace(diff=diff)

    def reuse(self, state: FirstBlockState, head_in, head_out) -> Streams:
        """The head's output plus the stored middle residual, both streams."""
        return tuple(h + r.astype(h.dtype) for h, r in zip(head_out, state.tail_residual))

    def update(self, state: FirstBlockState, step, head_in, head_out, middle_out, compute) -> FirstBlockState:
        """Computing rows store the head's image residual and the middle's residual.

        Args: as `StepCacheMethod.update`'s.
        """
        head_residual = _f32(head_out[1]) - _f32(head_in[1])
        tail = tuple(_f32(m) - _f32(h) for m, h in zip(middle_out, head_out))
        return FirstBlockState(head_residual=_where_rows(compute, head_residual, state.head_residual),
                               tail_residual=_where_rows(compute, tail, state.tail_residual),
                               stored=state.stored | compute, diff=state.diff)

    def record(self, state: FirstBlockState) -> dict:
        """The head residual's relative change [B] (what the threshold is compared with)."""
        return {"first_block_diff": state.diff}


def nearest_interp(ratios, length: int) -> np.ndarray:
    """ratios resampled to `length` entries by nearest index, in float32 with round-half-to-even
    as diffusers' `mag_cache.nearest_interp`."""
    ratios = np.asarray(ratios, np.float32)
    if length == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (length - 1)
    return ratios[np.round(np.arange(length, dtype=np.float32) * np.float32(scale)).astype(np.int64)]


@flax.struct.dataclass
class MagCacheState:
    """residual: [B, N, D] float32, the stacks' image residual (last layer's output minus the
    first's input) at the last computed step; stored: [B] bool; ratio, err: [] float32 and
    steps: [] int32, the accumulated magnitude ratio, error and skipped steps since the last
    computed step; magnitude: [B] float32, this step's measured ratio of residual norms (1 where
    nothing was stored; recorded for calibration)."""

    residual: jax.Array
    stored: jax.Array
    ratio: jax.Array
    err: jax.Array
    steps: jax.Array
    magnitude: jax.Array


@dataclasses.dataclass(frozen=True)
class MagCache:
    """MagCache (diffusers' `MagCacheConfig`; Ma et al. 2025): from step round(retention_ratio *
    num_inference_steps) on, the product of the calibrated per-step magnitude ratios since the
    last computed step accumulates an error sum |1 - product|; while it stays <= threshold and
    at most max_skip_steps steps were skipped, the stacks are skipped and their stored image
    residual added to their input (the text stream passes through).

    mag_ratios: per step of a dense run, mean ||r_t|| / ||r_(t-1)|| of the stacks' residual
    (checkpoint-dependent; resampled to num_inference_steps by nearest index). calibrate: skip
    nothing and record those ratios (`record` gives "mag_ratio" per step;
    `edit_jax.sampling.calibration.calibrate_mag_ratios` runs it). Decisions depend on the
    step alone, so every row takes the same.
    """

    mag_ratios: tuple[float, ...] | None = None
    num_inference_steps: int = 28
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    calibrate: bool = False
    name = "mag_cache"
    head_layers = 0
    tail_layers = 0
    per_sample = False

    def __post_init__(self):
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError("MagCache needs mag_ratios (per-step magnitude ratios of this checkpoint): calibrate "
                             "them with a dense run (MagCache(calibrate=True) or `edit-jax calibrate-magcache`)")
        if self.num_inference_steps < 1 or self.max_skip_steps < 0 or not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"MagCache settings: num_inference_steps {self.num_inference_steps} >= 1, max_skip_steps "
                             f"{self.max_skip_steps} >= 0, retention_ratio {self.retention_ratio} in [0, 1]")
        if not self.threshold >= 0.0:
            raise ValueError(f"MagCache threshold must be >= 0, got {self.threshold}")
        if self.mag_ratios is not None:
            ratios = tuple(float(r) for r in self.mag_ratios)
            if not ratios or not all(np.isfinite(ratios)):
                raise ValueError(f"MagCache mag_ratios must be finite numbers, one per step, got {self.mag_ratios!r}")
            object.__setattr__(self, "mag_ratios", ratios)  # hashable, so the config stays static

    @property
    def ratios(self) -> np.ndarray:
        """[num_inference_steps] float32, the ratios resampled to the run's steps."""
        return nearest_interp(self.mag_ratios, self.num_inference_steps)

    @property
    def retention_steps(self) -> int:
        """Steps at the start that always compute."""
        return int(self.retention_ratio * self.num_inference_steps + 0.5)

    def init(self, stream_shapes: Streams, batch: int) -> MagCacheState:
        """Nothing stored, nothing accumulated (arguments: `StepCacheMethod.init`)."""
        return MagCacheState(residual=_zeros(stream_shapes[1]), stored=jnp.zeros((batch,), bool),
                             ratio=jnp.ones((), jnp.float32), err=jnp.zeros((), jnp.float32),
                             steps=jnp.zeros((), jnp.int32), magnitude=jnp.ones((batch,), jnp.float32))

    def decide(self, state: MagCacheState, step, head_in, head_out):
        """Skip while the accumulated error and skips stay within bounds (after the retained steps).

        Args: as `StepCacheMethod.decide`'s.
        """
        if self.calibrate:
            return jnp.ones_like(state.stored), state
        table = jnp.asarray(self.ratios)
        scale = jnp.where(step < table.shape[0], table[jnp.minimum(step, table.shape[0] - 1)], 1.0)
        active = step >= self.retention_steps
        ratio = state.ratio * scale
        err = state.err + jnp.abs(1.0 - ratio)
        steps = state.steps + 1
        skip = active & jnp.all(state.stored) & (err <= self.threshold) & (steps <= self.max_skip_steps)
        reset = active & ~skip
        state = state.replace(ratio=jnp.where(active, jnp.where(reset, 1.0, ratio), state.ratio),
                              err=jnp.where(active, jnp.where(reset, 0.0, err), state.err),
                              steps=jnp.where(active, jnp.where(reset, 0, steps), state.steps).astype(jnp.int32))
        return jnp.broadcast_to(~skip, state.stored.shape), state

    def reuse(self, state: MagCacheState, head_in, head_out) -> Streams:
        """The stacks' input with the stored image residual added; the text as it came in."""
        return head_in[0], head_in[1] + state.residual.astype(head_in[1].dtype)

    def update(self, state: MagCacheState, step, head_in, head_out, middle_out, compute) -> MagCacheState:
        """Computing rows store the stacks' image residual (and, calibrating, its norm ratio).

        Args: as `StepCacheMethod.update`'s.
        """
        residual = _f32(middle_out[1]) - _f32(head_in[1])
        magnitude = state.magnitude
        if self.calibrate:
            norms = jnp.linalg.norm(residual, axis=-1) / (jnp.linalg.norm(state.residual, axis=-1) + 1e-8)
            magnitude = jnp.where(state.stored, jnp.mean(norms), 1.0)
        return state.replace(residual=_where_rows(compute, residual, state.residual), stored=state.stored | compute,
                             magnitude=magnitude)

    def record(self, state: MagCacheState) -> dict:
        """Calibrating: the step's magnitude ratio [B] (the same in every row)."""
        return {"mag_ratio": state.magnitude} if self.calibrate else {}



@flax.struct.dataclass
class TaylorSeerState:
    """factors: (txt [K + 1, B, T, D], img [K + 1, B, N, D]) in the method's factors_dtype, the
    Taylor factors of the stacks' output at the last computed step (order k at index k, K =
    max_order); orders: [] int32, how many of them hold one (0: nothing stored); last: [] int32,
    the step they were taken at (-1 before any); now: [] int32, the step being decided."""

    factors: Streams
    orders: jax.Array
    last: jax.Array
    now: jax.Array


@dataclasses.dataclass(frozen=True)
class TaylorSeer:
    """TaylorSeer (diffusers' `TaylorSeerCacheConfig`; Liu et al. 2025, arXiv 2503.06923) at block
    level: the stacks compute at the first `disable_cache_before_step` steps, then at every
    `cache_interval`-th step (step s computes when s - disable_cache_before_step - 1 is a multiple
    of it) and from step `disable_cache_after_step` on. Each computed step updates the finite
    differences of the stacks' output (both streams) up to `max_order`, divided by the steps since
    the last update; the other steps take the Taylor series sum_k factor_k d^k / k!, d the steps
    since the last update.

    It equals diffusers with `cache_identifiers` on every block (`transformer_blocks\\.\\d+`,
    `single_transformer_blocks\\.\\d+`): with every block predicted, only the last one's prediction
    reaches the output. diffusers' default targets the attention modules alone, whose MLPs still
    run every step; that variant is not built here. factors_dtype: "float32" or "bfloat16"
    (diffusers' default). Decisions depend on the step alone, so every row takes the same.
    """

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    factors_dtype: str = "bfloat16"
    name = "taylor_seer"
    head_layers = 0
    tail_layers = 0
    per_sample = False

    def __post_init__(self):
        if self.cache_interval < 1 or self.disable_cache_before_step < 0 or self.max_order < 0:
            raise ValueError(f"TaylorSeer settings: cache_interval {self.cache_interval} >= 1, disable_cache_before_step "
                             f"{self.disable_cache_before_step} >= 0, max_order {self.max_order} >= 0")
        if self.disable_cache_after_step is not None and self.disable_cache_after_step < 0:
            raise ValueError(f"TaylorSeer disable_cache_after_step must be >= 0, got {self.disable_cache_after_step}")
        if self.factors_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TaylorSeer factors_dtype must be 'float32' or 'bfloat16', got {self.factors_dtype!r}")

    def computes_at(self, step) -> jax.Array:
        """[] bool: whether the schedule computes at `step` ([] int)."""
        step = jnp.asarray(step)
        compute = (step < self.disable_cache_before_step) | (
            (step - self.disable_cache_before_step - 1) % self.cache_interval == 0)
        if self.disable_cache_after_step is not None:
            compute = compute | (step >= self.disable_cache_after_step)
        return compute

    def init(self, stream_shapes: Streams, batch: int) -> TaylorSeerState:
        """No factors (arguments: `StepCacheMethod.init`)."""
        dtype = jnp.dtype(self.factors_dtype)
        return TaylorSeerState(factors=tuple(jnp.zeros((self.max_order + 1, *s), dtype) for s in stream_shapes),
                               orders=jnp.zeros((), jnp.int32), last=jnp.full((), -1, jnp.int32),
                               now=jnp.zeros((), jnp.int32))

    def decide(self, state: TaylorSeerState, step, head_in, head_out):
        """Compute on the schedule, and wherever nothing is stored yet (where diffusers fails).

        Args: as `StepCacheMethod.decide`'s.
        """
        compute = self.computes_at(step) | (state.orders == 0)
        return jnp.broadcast_to(compute, head_in[1].shape[:1]), state.replace(now=jnp.asarray(step, jnp.int32))

    def reuse(self, state: TaylorSeerState, head_in, head_out) -> Streams:
        """The Taylor series of the stacks' output at the step being decided, in the streams' dtypes."""
        offset = (state.now - state.last).astype(jnp.float32)
        out = []
        for factors, like in zip(state.factors, head_in):
            total = jnp.zeros(factors.shape[1:], like.dtype)
            for k in range(self.max_order + 1):
                coeff = (offset**k / math.factorial(k)).astype(like.dtype)
                total = total + jnp.where(k < state.orders, factors[k].astype(like.dtype) * coeff, 0)
            out.append(total)
        return tuple(out)

    def update(self, state: TaylorSeerState, step, head_in, head_out, middle_out, compute) -> TaylorSeerState:
        """A computed step takes the stacks' output as order 0 and differences it against the
        stored orders (one more order than stored, up to max_order).

        Args: as `StepCacheMethod.update`'s.
        """
        first = state.orders == 0
        delta = jnp.where(first, 1, state.now - state.last).astype(jnp.float32)
        dtype = jnp.dtype(self.factors_dtype)
        factors = []
        for stored, features in zip(state.factors, middle_out):
            new = [features]
            for k in range(self.max_order):
                new.append((new[k] - stored[k].astype(features.dtype)) / delta.astype(features.dtype))
            valid = jnp.arange(self.max_order + 1) < jnp.where(first, 1, state.orders + 1)
            new = jnp.where(valid.reshape(-1, *[1] * features.ndim), jnp.stack(new), 0).astype(dtype)
            factors.append(jnp.where(compute[0], new, stored))
        did = compute[0]
        return TaylorSeerState(factors=tuple(factors),
                               orders=jnp.where(did, jnp.minimum(state.orders + 1, self.max_order + 1), state.orders),
                               last=jnp.where(did, state.now, state.last), now=state.now)

    def record(self, state: TaylorSeerState) -> dict:
        """Nothing beyond the computed rows."""
        return {}
