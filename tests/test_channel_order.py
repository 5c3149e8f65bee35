"""MLP channel ordering: function-preserving, and the width-1/2 prefix keeps more of the output."""

import jax
import numpy as np
import pytest

from edit_jax.elastic.channel_order import elastic_mlps, order_mlp_channels
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.models.registry import example_inputs
from elastic_cases import FAMILIES, Case, forced, relative


def heterogeneous(case):
    """Channels of unequal importance, as in trained models: fc2 rows scaled over two decades."""
    params = jax.tree.map(lambda x: x, case.params)
    rng = np.random.default_rng(1)
    for m in elastic_mlps(case.config):
        node = params[m.stack]
        for key in m.fc2:
            node = node[key]
        scale = np.logspace(-1, 1, case.hidden)[rng.permutation(case.hidden)]
        node[m.fc2_kernel] = node[m.fc2_kernel] * scale[None, :, None]
    return params


@pytest.mark.parametrize("family", FAMILIES)
def test_ordering_preserves_the_dense_function_and_helps_at_half_width(family):
    case = Case(family)
    params = heterogeneous(case)
    calibration = [example_inputs(case.config, 2, 3, 4, 5, seed=s) for s in (10, 11)]

    ordered, scores = order_mlp_channels(case.config, params, calibration)

    assert relative(case.dense(ordered), case.dense(params)) <= 1e-6
    half = forced(np.ones(case.num_blocks), np.ones(case.num_blocks, int))  # bucket 1: width 1/2
    dense = case.dense(params)
    before = relative(case.elastic(ElasticConfig(mode="forced"), half, params=params)[0], dense)
    after = relative(case.elastic(ElasticConfig(mode="forced"), half, params=ordered)[0], dense)
    assert after < before
    assert [s.shape for s in scores] == [(c, case.hidden) for _, c, _ in case.stacks()]


def test_ordering_refuses_trained_routers():
    case = Case("qwen-image")
    with pytest.raises(ValueError, match="refusing to reorder MLP channels under trained routers"):
        order_mlp_channels(case.config, case.params, [], routers=case.routers)
