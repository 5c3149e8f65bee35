"""Random initialisation: one traced and compiled init per config, collections and placement in a
process, whatever the seed (tests, the demo and every training run start from it)."""

import jax
import numpy as np

import edit_jax
from edit_jax.models import registry
from edit_jax.models.registry import init_variables
from edit_jax.placement import param_shardings
from edit_jax.sharding import make_mesh


def test_init_variables_traces_once_per_config_and_draws_each_seed_anew():
    config = edit_jax.preset("qwen-image-tiny")
    before = registry._jitted_init.cache_info()
    one, two, one_again = (init_variables(config, seed=s) for s in (1, 2, 1))

    after = registry._jitted_init.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 2
    jax.tree.map(np.testing.assert_array_equal, one, one_again)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"]))
               if a.size > 1 and np.std(a) > 0)


def test_the_model_is_traced_once_per_config_for_its_abstract_params_and_every_init(monkeypatch):
    import dataclasses

    import flax.linen as nn

    config = dataclasses.replace(edit_jax.preset("flux-tiny"), router_hidden=24)  # new to this process
    traced, init = [], nn.Module.init
    monkeypatch.setattr(nn.Module, "init", lambda self, *args, **kw: traced.append(1) or init(self, *args, **kw))
    registry.abstract_params(config)
    init_variables(config, collections=("routers",))
    init_variables(config, seed=1)

    assert len(traced) == 1


def test_init_variables_on_a_mesh_places_each_collection_asked_for_by_its_shardings():
    config = edit_jax.preset("qwen-image-tiny")
    mesh = make_mesh()
    shardings = {c: param_shardings(config, mesh, collection=c) for c in ("params", "routers")}
    routers = init_variables(config, seed=3, shardings=shardings, collections=("routers",))

    assert set(routers) == {"routers"}
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), routers["routers"],
                                     shardings["routers"]))
    jax.tree.map(np.testing.assert_array_equal, routers["routers"], init_variables(config, seed=3)["routers"])


def test_configs_that_differ_only_in_how_they_run_share_one_init_and_its_params():
    config = edit_jax.preset("qwen-image-tiny")
    init_variables(config, seed=4)
    before = registry._jitted_init.cache_info()
    variants = [config.with_runtime(attention="auto", remat="full", dtype="bfloat16"),
                config.with_runtime(router_dtype="float32")]
    params = [init_variables(c, seed=4) for c in variants]

    assert registry._jitted_init.cache_info().misses == before.misses
    for v in params:
        jax.tree.map(np.testing.assert_array_equal, v, init_variables(config, seed=4))


def test_fresh_routers_are_the_routers_of_the_whole_init_without_drawing_the_base(monkeypatch):
    config = edit_jax.preset("qwen-image-tiny")
    drawn, jitted_init = [], registry._jitted_init
    monkeypatch.setattr(registry, "_jitted_init", lambda c, collections, p: drawn.append(collections) or jitted_init(
        c, collections, p))
    routers = edit_jax.init_routers(config, seed=5)

    assert drawn == [("routers",)]
    jax.tree.map(np.testing.assert_array_equal, routers, init_variables(config, seed=5)["routers"])
