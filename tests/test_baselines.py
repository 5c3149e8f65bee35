"""Baselines at matched FLOPs: static pruning, the per-step schedule and the cache alone."""

import jax.numpy as jnp
import numpy as np
import pytest

from edit_jax.elastic.step_cache import MagCache, TaylorSeer
from edit_jax.eval import baselines

# 4 blocks, each 10 FLOPs at full width (columns: skipped, 1/4, 1/2, 3/4, full); 10 fixed
TABLE = np.array([[0, 4, 6, 8, 10]] * 4)
FIXED = 10.0


def test_closest_picks_the_option_nearest_the_target_and_the_cheaper_on_a_tie():
    assert baselines.closest([(0.9, "a"), (0.6, "b"), (0.4, "c")], 0.55) == "b"
    assert baselines.closest([(0.6, "more"), (0.4, "less")], 0.5) == "less"


def test_greedy_pruning_removes_the_block_whose_loss_is_lowest_first():
    cost = np.array([5.0, 1.0, 3.0, 2.0])  # loss added by removing each block
    order = baselines.greedy_prune_order(lambda run: float(cost[~run].sum()), 4)
    assert order == [1, 3, 2]


def test_static_pruning_is_matched_to_the_flops_target():
    order = [2, 0, 3, 1]
    assert baselines.static_fraction(TABLE, FIXED, []) == 1.0
    assert baselines.static_for_target(order, TABLE, FIXED, target=0.62) == [2, 0]  # (10 + 20) / 50 = 0.6
    assert baselines.static_for_target(order, TABLE, FIXED, target=1.0) == []


def test_the_step_schedule_keeps_the_cells_run_most_often_until_the_target():
    rate = np.array([[1.0, 0.9, 0.1, 0.0], [1.0, 0.2, 0.8, 0.0]])  # [steps, blocks]
    full = np.full(rate.shape, 3)
    run = baselines.step_schedule(rate, full, TABLE, FIXED, target=(2 * 10 + 40) / 100)  # four cells of 10
    np.testing.assert_array_equal(run, [[True, True, False, False], [True, False, True, False]])


def test_the_step_schedule_counts_each_cell_at_its_bucket_width():
    rate = np.ones((1, 4))
    half = np.full((1, 4), 1)  # bucket 1: 6 FLOPs a block
    run = baselines.step_schedule(rate, half, TABLE, FIXED, target=(10 + 24) / 50)
    assert run.all()


@pytest.mark.parametrize("start, reuse, computed", [(2, 1, 2 + 1), (1, 3, 1 + 1), (4, 2, 4)])
def test_the_cache_alone_computes_every_block_before_its_start_then_once_per_1_plus_max_reuse(start, reuse, computed):
    assert baselines.cache_fraction(4, start, reuse, TABLE, FIXED) == pytest.approx((4 * 10 + computed * 40) / 200)


@pytest.mark.parametrize("threshold, max_skip", [(0.06, 3), (0.5, 2), (10.0, 6)])
def test_mag_cache_computed_mirrors_the_methods_decisions(threshold, max_skip):
    ratios = np.random.default_rng(0).uniform(0.8, 1.2, 20).astype(np.float32)
    method = MagCache(tuple(ratios), num_inference_steps=20, threshold=threshold, max_skip_steps=max_skip)
    state, decided = method.init(((1, 2, 4), (1, 3, 4)), 1), []
    for step in range(20):
        compute, state = method.decide(state, jnp.asarray(step), None, None)
        state = method.update(state, step, (jnp.zeros((1, 2, 4)), jnp.zeros((1, 3, 4))), None,
                              (jnp.zeros((1, 2, 4)), jnp.ones((1, 3, 4))), compute)
        decided.append(bool(compute[0]))

    assert baselines.mag_cache_computed(ratios, threshold, max_skip, method.retention_steps).tolist() == decided


def test_mag_cache_candidates_span_compute_every_step_to_the_most_skipping():
    table = np.ones((4, 5))
    ratios = np.random.default_rng(1).uniform(0.8, 1.2, 12)
    fractions = [f for f, _ in baselines.mag_cache_candidates(ratios, table, 1.0, 2)]
    assert max(fractions) == 1.0 and min(fractions) < 0.5


def test_the_threshold_search_brackets_the_target():
    assert baselines.next_threshold([(0.1, 0.9)], 0.5) == 0.2  # too costly: raise it
    assert baselines.next_threshold([(0.1, 0.3)], 0.5) == 0.05
    assert baselines.next_threshold([(0.1, 0.9), (0.4, 0.3)], 0.5) == 0.25


def test_taylor_seer_candidates_reach_every_budget_of_a_short_run_and_count_what_the_method_computes():
    table, fixed = np.ones((6, 5)), 0.1
    candidates = baselines.taylor_seer_candidates(12, table, fixed)
    for target in np.linspace(0.35, 1.0, 14):
        fraction, setting = min(candidates, key=lambda c: abs(c[0] - target))
        assert abs(fraction - target) <= 0.05
        computed = np.asarray(TaylorSeer(**setting).computes_at(np.arange(12))).sum()
        assert fraction == pytest.approx((12 * fixed + computed * 6) / (12 * (fixed + 6)))
