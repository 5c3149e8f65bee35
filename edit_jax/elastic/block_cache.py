"""The seam for per-block cache methods: a block that would run may instead reuse what its cache
holds, decided per row under jit, with the cache's state as arrays in the sampler's carry.

A method is a frozen, hashable config (static: a new value recompiles) with four pure functions:

    state = method.init(num_layers, carry_shapes, batch)       # a block stack's empty state [L, ...]
    reuse = method.decide(state, step, run, p, tau)            # [B] bool: rows that reuse
    carry = method.reuse(state, carry)                         # what a reusing row's block returns
    state = method.update(state, step, carry_in, carry_out, computed, reused)

`edit_jax.elastic.elastic_step` calls them for one block (the state then holds that layer's
slice: the stacks' scans hand each block its own); a row computes its block when the router says
run and the method says no reuse. A method whose `closed_skips` is False changes what a closed
block does: it is never the identity, a row either reuses or computes (`LearnedReuse`: E-DiT's
routers choosing compute or reuse), and in train mode the straight-through gate blends the
block's output with the reuse instead of with its input. The state is a `flax.struct` dataclass, so it scans, jits and
shards like any pytree; the model returns it updated as aux["cache"] and the sampler threads it.
`RouterGuidedCache` is E-DiT's (SPEC section 5); another method is one class with these four
functions, passed as `ElasticConfig(block_cache=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp


class BlockCacheMethod(Protocol):
    """What `edit_jax.elastic.elastic_step` asks of a per-block cache method (see the module)."""

    name: str
    closed_skips: bool  # optional, default True: a row neither computing nor reusing is the identity

    def init(self, num_layers: int, carry_shapes, batch: int) -> Any:
        """A block stack's empty state, every array with a leading [num_layers] axis; carry_shapes:
        the shape of each leaf of one block's carry."""

    def decide(self, state, step: jax.Array, run: jax.Array, p: jax.Array, tau: float) -> jax.Array:
        """[B] bool, the rows that reuse instead of computing.

        Args:
          state: this layer's state. step: [] int32, the denoising step. run: [B] bool, the rows
            whose router says run. p: [B] the router's P(run) as decided (the batch mean with
            one decision per batch). tau: the gate threshold.
        """

    def reuse(self, state, carry):
        """What a reusing row's block returns, shaped like `carry` (the block's input)."""

    def update(self, state, step: jax.Array, carry_in, carry_out, computed: jax.Array, reused: jax.Array):
        """This layer's state after the block.

        Args:
          state: this layer's state before. step: [] int32. carry_in, carry_out: the block's input
            and output (reused rows' output included). computed, reused: [B] bool, the rows that
            computed the block and those that reused.
        """


@flax.struct.dataclass
class ResidualBank:
    """The router-guided cache's state of one block stack (or, inside a block, of its layer):
    delta: the residual (output - input) of the block's last stored computation, shaped like the
    carry, float32 ([L, B, ...]); stored: [L, B] whether delta holds one; count: [L, B] int32,
    reuses since it was stored."""

    delta: Any
    stored: jax.Array
    count: jax.Array


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


@dataclasses.dataclass(frozen=True)
class RouterGuidedCache:
    """E-DiT's router-guided cache (SPEC section 5). From step `start` on, a block the router
    runs only just (p <= tau + delta_margin) adds the residual it stored when it last computed,
    at most `max_reuse` times in a row; a block that computes from `start` on stores its residual."""

    start: int = 15
    delta_margin: float = 0.015
    max_reuse: int = 10
    name = "router_guided"

    def __post_init__(self):
        if not self.delta_margin >= 0.0 or self.start < 0 or self.max_reuse < 0:
            raise ValueError(f"elastic cache settings must be >= 0: delta_margin {self.delta_margin}, "
                             f"cache_start {self.start}, max_reuse {self.max_reuse}")

    def init(self, num_layers: int, carry_shapes, batch: int) -> ResidualBank:
        """Nothing stored (arguments: `BlockCacheMethod.init`)."""
        return ResidualBank(
            delta=jax.tree.map(lambda shape: jnp.zeros((num_layers, *shape), jnp.float32), carry_shapes, is_leaf=_is_shape),
            stored=jnp.zeros((num_layers, batch), bool),
            count=jnp.zeros((num_layers, batch), jnp.int32),
        )

    def decide(self, state: ResidualBank, step, run, p, tau) -> jax.Array:
        """Rows the router runs only just, from `start` on, with a residual stored and fewer than
        `max_reuse` reuses since.

        Args: as `BlockCacheMethod.decide`'s.
        """
        borderline = p <= tau + self.delta_margin
        return (step >= self.start) & run & borderline & state.stored & (state.count < self.max_reuse)

    def reuse(self, state: ResidualBank, carry):
        """The block's input plus its stored residual."""
        return jax.tree.map(lambda c, d: c + d.astype(c.dtype), carry, state.delta)

    def update(self, state: ResidualBank, step, carry_in, carry_out, computed, reused) -> ResidualBank:
        """Rows that computed from `start` on store their residual and reset their count; rows that
        reused count one more.

        Args: as `BlockCacheMethod.update`'s.
        """
        store = (step >= self.start) & computed
        residual = jax.tree.map(lambda n, c: (n - c).astype(jnp.float32), carry_out, carry_in)
        return ResidualBank(
            delta=jax.tree.map(lambda r, d: jnp.where(store[:, None, None], r, d), residual, state.delta),
            stored=state.stored | store,
            count=jnp.where(store, 0, jnp.where(reused, state.count + 1, state.count)).astype(jnp.int32),
        )


@flax.struct.dataclass
class ReuseBank:
    """The learned-reuse cache's state of one block stack (or, inside a block, of its layer):
    delta: the block's residual (output - input) at its last computed step, shaped like the
    carry, float32 ([L, B, ...]); slope: its change per step between the last two computed steps
    (zeros until two are stored; empty for order 0); stored: [L, B] whether delta holds one; count: [L, B] int32,
    reuses since it was stored."""

    delta: Any
    slope: Any
    stored: jax.Array
    count: jax.Array


@dataclasses.dataclass(frozen=True)
class LearnedReuse:
    """Routers that choose compute or reuse (issue 34): a block the router closes adds the residual
    it stored at its last computed step (order 1: extrapolated along the change per step between
    its last two computed steps, as TaylorSeer's first-order term) instead of being the identity;
    after `max_reuse` reuses in a row, or with nothing stored, it computes whatever the router
    says. Every row either reuses or computes, each step."""

    max_reuse: int = 4
    order: int = 0
    name = "learned_reuse"
    closed_skips = False

    def __post_init__(self):
        if self.max_reuse < 0 or self.order not in (0, 1):
            raise ValueError(f"learned reuse: max_reuse {self.max_reuse} must be >= 0 and order {self.order} 0 or 1")

    def init(self, num_layers: int, carry_shapes, batch: int) -> ReuseBank:
        """Nothing stored (arguments: `BlockCacheMethod.init`)."""
        zeros = lambda: jax.tree.map(lambda shape: jnp.zeros((num_layers, *shape), jnp.float32), carry_shapes,  # noqa: E731
                                     is_leaf=_is_shape)
        return ReuseBank(delta=zeros(), slope=zeros() if self.order == 1 else (), stored=jnp.zeros((num_layers, batch), bool),
                         count=jnp.zeros((num_layers, batch), jnp.int32))

    def decide(self, state: ReuseBank, step, run, p, tau) -> jax.Array:
        """Rows the router closes, with a residual stored and fewer than `max_reuse` reuses since.

        Args: as `BlockCacheMethod.decide`'s.
        """
        return ~run & state.stored & (state.count < self.max_reuse)

    def reuse(self, state: ReuseBank, carry):
        """The block's input plus its stored residual (order 1: plus the slope times the steps since)."""
        if self.order == 0:
            return jax.tree.map(lambda c, d: c + d.astype(c.dtype), carry, state.delta)
        ahead = (state.count + 1).astype(jnp.float32)[:, None, None]
        return jax.tree.map(lambda c, d, s: c + (d + ahead * s).astype(c.dtype), carry, state.delta, state.slope)

    def update(self, state: ReuseBank, step, carry_in, carry_out, computed, reused) -> ReuseBank:
        """Computing rows store their residual (and, where one was stored, its change per step since)
        and reset their count; reusing rows count one more.

        Args: as `BlockCacheMethod.update`'s.
        """
        residual = jax.tree.map(lambda n, c: (n - c).astype(jnp.float32), carry_out, carry_in)
        slope = state.slope
        if self.order == 1:
            since = (state.count + 1).astype(jnp.float32)[:, None, None]
            slope = jax.tree.map(lambda r, d, s: jnp.where(computed[:, None, None] & state.stored[:, None, None],
                                                           (r - d) / since, s), residual, state.delta, state.slope)
        return ReuseBank(
            delta=jax.tree.map(lambda r, d: jnp.where(computed[:, None, None], r, d), residual, state.delta),
            slope=slope,
            stored=state.stored | computed,
            count=jnp.where(computed, 0, jnp.where(reused, state.count + 1, state.count)).astype(jnp.int32),
        )
