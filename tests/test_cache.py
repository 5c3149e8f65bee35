"""The router-guided block cache (SPEC section 5) against a plain-Python reference driven by
scripted router probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.models.registry import init_cache
from elastic_cases import Case

TAU, MARGIN, START, MAX_REUSE = 0.5, 0.1, 2, 2


def reference_rule(p: np.ndarray):
    """p [S, B, L] -> (computed, reused) [S, B, L] by SPEC section 5, one bank per (row, block)."""
    steps, batch, layers = p.shape
    stored = np.zeros((batch, layers), bool)
    count = np.zeros((batch, layers), int)
    computed, reused = np.zeros(p.shape, bool), np.zeros(p.shape, bool)
    for s in range(steps):
        for b in range(batch):
            for l in range(layers):
                pr = p[s, b, l]
                if pr < TAU:
                    continue
                if s >= START and pr <= TAU + MARGIN and stored[b, l] and count[b, l] < MAX_REUSE:
                    reused[s, b, l] = True
                    count[b, l] += 1
                else:
                    computed[s, b, l] = True
                    if s >= START:
                        stored[b, l], count[b, l] = True, 0
    return computed, reused


def scripted_probabilities(steps, batch, layers, seed=0):
    rng = np.random.default_rng(seed)
    # mostly borderline (reuse candidates), some clearly on, some off; rows differ
    return rng.choice([0.3, 0.55, 0.58, 0.9], size=(steps, batch, layers), p=[0.15, 0.4, 0.25, 0.2]).astype(np.float32)


def run_steps(case, p, elastic, cache=None):
    cache = init_cache(case.config, 2, 12, 5) if cache is None else cache
    apply = jax.jit(lambda c, d, s: case.model.apply(
        {"params": case.params, "routers": case.routers}, **case.arrays, **case.static,
        elastic=elastic, decisions=d, cache=c, step=s))
    records, caches = [], [cache]
    for s in range(p.shape[0]):
        decisions = {"p": jnp.asarray(p[s]), "bucket": jnp.full(p.shape[1:], 3, jnp.int32)}
        out, aux = apply(cache, decisions, s)
        cache = aux.pop("cache")
        records.append(jax.tree.map(np.asarray, aux))
        caches.append(cache)
    return records, caches


@pytest.fixture(scope="module")
def cached_run():
    case = Case("qwen-image")
    p = scripted_probabilities(8, 2, case.num_blocks)
    elastic = ElasticConfig(mode="forced", cache=True, cache_start=START, delta_margin=MARGIN, max_reuse=MAX_REUSE)
    records, caches = run_steps(case, p, elastic)
    return case, p, records, caches


def test_reuse_and_compute_follow_the_reference_rule(cached_run):
    _, p, records, _ = cached_run
    computed, reused = reference_rule(p)
    np.testing.assert_array_equal(np.stack([r["cache_hit"] for r in records]), reused)
    np.testing.assert_array_equal(np.stack([r["executed"] for r in records]), computed)
    assert reused.any() and (reused.sum(axis=(1, 2)) > 0).sum() >= 2  # the script exercises the rule


def test_no_reuse_before_cache_start_and_never_outside_the_margin(cached_run):
    _, p, records, _ = cached_run
    hits = np.stack([r["cache_hit"] for r in records])
    assert not hits[:START].any()
    assert ((p[hits] >= TAU) & (p[hits] <= TAU + MARGIN)).all()


def test_a_skipped_block_leaves_its_bank_untouched(cached_run):
    _, p, _, caches = cached_run
    for s in range(p.shape[0]):
        before, after = caches[s]["transformer_blocks"], caches[s + 1]["transformer_blocks"]
        skipped = (p[s] < TAU).T  # [L, B]
        for leaf_before, leaf_after in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(leaf_before)[skipped], np.asarray(leaf_after)[skipped])


def test_reuse_count_is_capped_and_reset_when_the_block_runs(cached_run):
    _, p, records, caches = cached_run
    counts = np.stack([np.asarray(c["transformer_blocks"].count) for c in caches[1:]])  # [S, L, B]
    assert counts.max() <= MAX_REUSE
    executed = np.stack([r["executed"] for r in records]).transpose(0, 2, 1)
    assert (counts[START:][executed[START:]] == 0).all()


def test_reused_residual_is_the_one_stored_when_the_block_last_ran():
    case = Case("qwen-image")
    layers = case.num_blocks
    elastic = ElasticConfig(mode="forced", cache=True, cache_start=0, delta_margin=MARGIN, max_reuse=MAX_REUSE)
    # step 0: every block computes (p 0.9) and stores; step 1: block 1 borderline -> reuse
    p = np.full((2, 2, layers), 0.9, np.float32)
    p[1, :, 1] = 0.55
    records, caches = run_steps(case, p, elastic)
    assert records[1]["cache_hit"][:, 1].all() and not records[1]["cache_hit"][:, [0, 2]].any()
    stored0 = jax.tree.map(lambda x: np.asarray(x)[1], caches[1]["transformer_blocks"].delta)
    stored1 = jax.tree.map(lambda x: np.asarray(x)[1], caches[2]["transformer_blocks"].delta)
    jax.tree.map(np.testing.assert_array_equal, stored0, stored1)  # reuse does not overwrite the bank
