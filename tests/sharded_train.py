"""Run in a subprocess by test_train.py with 8 simulated CPU devices: the trainer's params,
routers and optimizer state on a (data 2, fsdp 4) mesh, built as train.loop builds them, have
exactly the shardings the one rules table gives; a frozen base has no optimizer state."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

import edit_jax  # noqa: E402
from edit_jax.checkpoint import flatten  # noqa: E402
from edit_jax.models import init_variables, logical_axes  # noqa: E402
from edit_jax.sharding import logical_to_mesh, make_mesh, param_shardings  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loop import opt_state_shardings, split_trainable  # noqa: E402
from train.step import make_optimizer  # noqa: E402


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
    print(f"checked {checked} leaves")


if __name__ == "__main__":
    main()
