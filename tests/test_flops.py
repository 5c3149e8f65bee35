"""Analytic FLOPs: agree with XLA's cost analysis of the compiled dense forward, and follow the
decisions of an elastic step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edit_jax
from edit_jax.config import FluxConfig, QwenImageConfig
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.router import Router
from edit_jax.elastic.flops import dense_flops, layer_flops, router_flops
from edit_jax.models.registry import example_inputs, jit_forward, split_static
from elastic_cases import Case, forced

# wide enough for matmuls to dominate elementwise work, as at real sizes; one block per stack,
# since XLA's cost analysis counts the body of a scan (a while loop) once
MEDIUM = {
    "flux": FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=4,
                       joint_attention_dim=128, pooled_projection_dim=64, in_channels=16, axes_dims_rope=(16, 24, 24),
                       guidance_embeds=True),
    "qwen-image": QwenImageConfig(num_layers=1, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=128,
                                  in_channels=16, out_channels=4, axes_dims_rope=(16, 24, 24)),
}


@pytest.mark.parametrize("family", list(MEDIUM))
def test_dense_flops_agree_with_xla_cost_analysis_within_5_percent(family):
    config = MEDIUM[family]
    forward, arrays = jit_forward(edit_jax.build_model(config), example_inputs(config, 1, height=8, width=8, num_txt=16))
    params = edit_jax.abstract_params(config)
    xla = forward.lower(params, arrays).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla

    ours = dense_flops(config, num_img=64, num_txt=16)
    if family == "qwen-image":  # nothing reads the last block's text MLP: XLA removes it
        ours -= 2 * 2 * config.inner_dim * config.mlp_hidden_dim * 16

    assert abs(ours - xla["flops"]) / xla["flops"] <= 0.05


def test_router_flops_agree_with_xla_cost_analysis_within_5_percent():
    config = MEDIUM["flux"]
    router = Router(config.router_hidden, len(config.width_buckets), config.runtime)
    d = config.inner_dim
    groups = [(jnp.ones((1, 16, d)), jnp.ones((1, 16), bool)), (jnp.ones((1, 64, d)), None)]
    temb = jnp.ones((1, d))
    variables = jax.eval_shape(lambda: router.init(jax.random.key(0), groups, temb))
    xla = jax.jit(lambda v: router.apply(v, groups, temb)).lower(variables).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla

    assert abs(router_flops(config, num_img=64, num_txt=16) - xla["flops"]) / xla["flops"] <= 0.05


def test_step_flops_follow_the_decisions():
    case = Case("flux")
    n, t = 12, 5
    table = layer_flops(case.config, n, t)
    run = np.array([[True, False, True, True], [True, True, False, True]])
    bucket = np.array([[3, 0, 1, 0], [0, 2, 3, 3]])

    _, aux = case.elastic(ElasticConfig(mode="forced"), forced(run, bucket))
    aux = jax.tree.map(np.asarray, aux)

    fixed = aux["flops"]["per_sample"] - np.array([table[range(4), 1 + bucket[b]][run[b]].sum() for b in range(2)])
    assert fixed[0] == pytest.approx(fixed[1])
    # the batch computed each block at the widest bucket any running row needed
    computed = table[range(4), [4, 3, 2, 4]].sum()
    assert aux["flops"]["total"] == pytest.approx(2 * (fixed[0] + computed), rel=1e-6)
    assert aux["branch"].tolist() == [4, 3, 2, 4]


def test_forced_mode_counts_no_router_flops():
    case = Case("flux")
    _, aux = case.elastic(ElasticConfig(mode="forced"), forced(np.ones(4, bool), np.full(4, 3)))
    np.testing.assert_allclose(aux["flops"]["per_sample"], dense_flops(case.config, 12, 5), rtol=1e-6)


@pytest.mark.parametrize("preset", ["flux-dev", "qwen-image"])
def test_full_size_elastic_forward_traces_with_flops_past_int32(preset):
    config = edit_jax.preset(preset)
    arrays, static = split_static(example_inputs(config, 1, height=64, width=64, num_txt=512))
    variables = {"params": edit_jax.abstract_params(config), "routers": edit_jax.models.abstract_routers(config)}
    model = edit_jax.build_model(config)

    _, aux = jax.eval_shape(lambda v, x: model.apply(v, **x, **static, elastic=ElasticConfig(mode="infer")), variables, arrays)
    assert aux["flops"]["total"].dtype == np.float32
