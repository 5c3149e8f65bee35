"""The seam for per-block cache methods (`edit_jax.elastic.block_cache`): a method is one class, passed as
`ElasticConfig(block_cache=...)`, and the mechanism, the models and the sampler run it unchanged."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.elastic.block_cache import RouterGuidedCache
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.models.registry import init_cache
from edit_jax.sampling.sampler import SamplerConfig, make_conditions, sample
from elastic_cases import Case
from test_cache import run_steps


@flax.struct.dataclass
class LastOutput:
    out: tuple
    stored: jax.Array


@dataclasses.dataclass(frozen=True)
class ReuseLastOutput:
    """A toy method: once a block has computed, every later call returns that output (FORA-like)."""

    name = "reuse_last_output"

    def init(self, num_layers, carry_shapes, batch):
        return LastOutput(tuple(jnp.zeros((num_layers, *s), jnp.float32) for s in carry_shapes),
                          jnp.zeros((num_layers, batch), bool))

    def decide(self, state, step, run, p, tau):
        return run & state.stored

    def reuse(self, state, carry):
        return tuple(o.astype(c.dtype) for o, c in zip(state.out, carry))

    def update(self, state, step, carry_in, carry_out, computed, reused):
        out = tuple(jnp.where(computed[:, None, None], n.astype(jnp.float32), o) for n, o in zip(carry_out, state.out))
        return LastOutput(out, state.stored | computed)


def forced_all_on(case, steps):
    return np.full((steps, 2, case.num_blocks), 0.9, np.float32)


def test_a_method_outside_the_mechanism_decides_reuse_and_keeps_its_own_state():
    case = Case("qwen-image")
    method = ReuseLastOutput()
    elastic = ElasticConfig(mode="forced", block_cache=method)
    cache = init_cache(case.config, 2, 12, 5, method)
    assert isinstance(cache["transformer_blocks"], LastOutput)
    records, caches = run_steps(case, forced_all_on(case, 3), elastic, cache)
    assert records[0]["executed"].all() and not records[0]["cache_hit"].any()
    for r in records[1:]:
        assert r["cache_hit"].all() and not r["executed"].any()
    jax.tree.map(np.testing.assert_array_equal, caches[1], caches[3])  # reuse does not overwrite what it reuses


def test_the_router_guided_cache_given_as_a_method_is_the_cache_flag():
    case = Case("qwen-image")
    p = np.random.default_rng(0).choice([0.3, 0.55, 0.9], size=(5, 2, case.num_blocks)).astype(np.float32)
    flag = ElasticConfig(mode="forced", cache=True, cache_start=1, delta_margin=0.1, max_reuse=2)
    method = ElasticConfig(mode="forced", block_cache=RouterGuidedCache(start=1, delta_margin=0.1, max_reuse=2))
    assert flag.cache_method == method.cache_method
    by_flag, _ = run_steps(case, p, flag)
    by_method, _ = run_steps(case, p, method)
    for a, b in zip(by_flag, by_method):
        np.testing.assert_array_equal(a["cache_hit"], b["cache_hit"])
    assert any(r["cache_hit"].any() for r in by_flag)


def test_the_cache_flag_and_another_method_together_are_refused():
    with pytest.raises(ValueError, match="give one of them"):
        ElasticConfig(cache=True, block_cache=ReuseLastOutput())


def test_no_cache_method_runs_without_one():
    assert ElasticConfig().cache_method is None


def test_the_sampler_threads_a_methods_state_through_its_steps():
    case = Case("qwen-image")
    cond = make_conditions(case.config, np.ones((1, 4, case.config.joint_attention_dim), np.float32), 32, 32)
    noise = jnp.ones((1, 4, case.config.in_channels), jnp.float32)
    decisions = {"run": jnp.ones((case.num_blocks,), bool), "bucket": jnp.full((case.num_blocks,), 3, jnp.int32)}
    _, records = sample(case.model, case.params, noise, cond, SamplerConfig(num_steps=3),
                        elastic=ElasticConfig(mode="forced", block_cache=ReuseLastOutput()), decisions=decisions)
    np.testing.assert_array_equal(records["cache_hit"].all(axis=(1, 2)), [False, True, True])
