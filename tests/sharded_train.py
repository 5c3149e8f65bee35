"""Run in a subprocess by test_train.py with 8 simulated CPU devices: the trainer's params,
routers and optimizer state on a (data 2, fsdp 4) mesh, built as train.loop builds them, have
exactly the shardings the one rules table gives; a frozen base has no optimizer state. On a
(data 2, fsdp 2, tensor 2) mesh a train step with the loop's shardings and activation constraints
equals the unsharded step (FLUX training routers and base, Qwen-Image its routers alone)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import edit_jax  # noqa: E402
from edit_jax.checkpoint import flatten  # noqa: E402
from edit_jax.models.registry import init_variables, logical_axes  # noqa: E402
from edit_jax.placement import param_shardings, summarize  # noqa: E402
from edit_jax.sharding import batch_sharding, logical_to_mesh, make_mesh  # noqa: E402
from edit_jax.train.config import TrainConfig  # noqa: E402
from edit_jax.train.data import shared_inputs, synthetic_batch  # noqa: E402
from edit_jax.train.loop import jitted_train_step, opt_state_shardings, split_trainable  # noqa: E402
from edit_jax.train.step import make_optimizer, make_train_step  # noqa: E402


def main():
    config = TrainConfig(preset="flux-small", batch_size=8, mesh={"data": 2, "fsdp": 4, "tensor": 1})
    mesh = make_mesh(config.mesh_shape(jax.device_count()))
    model_config = edit_jax.preset("flux-small")
    shardings = {c: param_shardings(model_config, mesh, collection=c) for c in ("params", "routers")}
    variables = init_variables(model_config, 0, shardings)
    trainable, frozen = split_trainable(config, variables)
    optimizer = make_optimizer(config)
    opt_shardings = opt_state_shardings(jax.eval_shape(optimizer.init, trainable), {"routers": shardings["routers"]}, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)

    checked = 0
    for collection in ("params", "routers"):
        rules = flatten(jax.tree.map(lambda s: s, logical_axes(model_config, collection), is_leaf=lambda x: isinstance(x, PartitionSpec)))
        for path, leaf in flatten(variables[collection]).items():
            expected = logical_to_mesh(rules[path], mesh)
            assert leaf.sharding.spec == expected, (collection, path, leaf.sharding.spec, expected)
            checked += 1
    routers = flatten(variables["routers"])
    moments = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, dict) and "routers" in x)
               if isinstance(s, dict) and "routers" in s]
    assert len(moments) == 2, "Adam's mu and nu, each shaped like the trainable routers"
    for moment in moments:
        for path, leaf in flatten(moment["routers"]).items():
            assert leaf.sharding.spec == routers[path].sharding.spec, (path, leaf.sharding.spec)
            checked += 1
    assert set(trainable) == {"routers"} and "params" not in str(jax.tree.structure(opt_state))
    kernel = variables["params"]["transformer_blocks"]["attn"]["to_q"]["kernel"]  # [L, D, D], D over fsdp
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 4, kernel.shape[2])
    summary = summarize(model_config, mesh)  # the start-up's plan by rule agrees with the arrays placed
    split = sum(1 for leaf in jax.tree.leaves(variables) if any(leaf.sharding.spec))
    assert f"embed -> fsdp: {split} arrays" in summary, summary
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(variables))
    assert f"{per_device / 2**20:.3g} MiB per device" in summary, (summary, per_device)
    print(f"checked {checked} leaves")
    for preset, trainable in (("flux-tiny", "routers+base"), ("qwen-image-tiny", "routers")):
        check_step_on_three_axes(preset, trainable)


def check_step_on_three_axes(preset, trainable):
    """One train step with every mesh axis > 1 (the batch split over data x fsdp, heads and MLP
    over tensor) equals the unsharded step: the metrics, and the update of plain SGD (minus the
    gradient; Adam's first step would hide a wrong gradient's size)."""
    config = TrainConfig(preset=preset, trainable=trainable, batch_size=8, num_txt=4,
                         mesh={"data": 2, "fsdp": 2, "tensor": 2})
    model_config = edit_jax.preset(preset)
    model, optimizer = edit_jax.build_model(model_config), optax.sgd(1.0)
    batch = synthetic_batch(model_config, config, 0)
    batch.pop("label")
    shared = shared_inputs(model_config, 4, 4, 4)
    variables = jax.tree.map(np.asarray, init_variables(model_config))  # host arrays: placed with no program
    trainable_vars, frozen = split_trainable(config, variables)
    expected = jax.jit(make_train_step(config, model, optimizer, shared))(
        trainable_vars, optimizer.init(trainable_vars), frozen, batch, jnp.int32(0))

    mesh = make_mesh(config.mesh_shape(jax.device_count()))
    shardings = {c: param_shardings(model_config, mesh, collection=c) for c in ("params", "routers")}
    trainable_sh, frozen_sh = split_trainable(config, shardings)
    opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, trainable_vars), trainable_sh, mesh)
    data_sh = batch_sharding(mesh)
    with jax.set_mesh(mesh):
        step = jitted_train_step(config, model, optimizer, shared, trainable_sh, opt_sh, frozen_sh, data_sh)
        got = step(jax.device_put(trainable_vars, trainable_sh),
                   jax.jit(optimizer.init, out_shardings=opt_sh)(trainable_vars),
                   jax.device_put(frozen, frozen_sh), jax.device_put(jax.tree.map(np.asarray, batch), data_sh),
                   jnp.int32(0))
    for name, want, have in (("trainable", expected[0], got[0]), ("metrics", expected[2], got[2])):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(have)):
            error = np.linalg.norm(np.asarray(b) - np.asarray(a)) / max(np.linalg.norm(np.asarray(a)), 1e-12)
            assert error <= 1e-5, (preset, trainable, name, jax.tree_util.keystr(path), error)
    print(preset, trainable, "train step on data x fsdp x tensor equals unsharded")


if __name__ == "__main__":
    main()
