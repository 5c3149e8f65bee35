"""`edit-jax train ... --compile-only --topology v5e:4x4`: the real train step lowered and compiled
for a TPU slice on a CPU host (libtpu compiles for a topology without its chips), from abstract
shapes: no weights are read or made. Prints and returns the per-chip memory the compiled step
needs against the chip's HBM, or the out-of-memory error the real job would hit.

The batch is the synthetic source's shape (`height`, `width` in packed tokens, `num_txt`):
1024x1024 images are height=64 width=64; FLUX reads 512 T5 tokens, Qwen-Image about 256.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

from edit_jax.config import ConfigError
from edit_jax.models import abstract_params, build_model
from edit_jax.sharding import batch_sharding, make_mesh, param_shardings, use_rules
from train.config import TrainConfig
from train.data import shared_inputs, synthetic_batch
from train.loop import jitted_train_step, model_config_of, opt_state_shardings, split_trainable
from train.step import make_optimizer

# HBM per chip by device kind, GiB (v5e: the 15.75 XLA reports it can use of 16)
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 15.75, "TPU v5": 95, "TPU v6 lite": 32}


def topology_devices(name: str):
    """The devices of a TPU topology such as "v5e:4x4" or "v5p:2x2x2" (needs libtpu)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("compile-only needs libtpu, the version jax pins: "
                          "pip install \"jax[tpu]==$(python -c 'import jax; print(jax.__version__)')\"")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot compile for TPU topology {name!r}: {str(e).splitlines()[0][:300]}") from e


def with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_only(config: TrainConfig, topology: str) -> dict:
    """Compiles the train step for `topology`; returns the memory report (also printed)."""
    with use_rules(config.axis_rules):
        return _compile_only(config, topology)


def _compile_only(config: TrainConfig, topology: str) -> dict:
    devices = topology_devices(topology)
    mesh = make_mesh(config.mesh_shape(len(devices)), devices=devices)
    model_config = model_config_of(config, devices[0].platform)
    model = build_model(model_config)
    shardings = {"params": param_shardings(model_config, mesh),
                 "routers": param_shardings(model_config, mesh, collection="routers")}
    variables = {c: with_shardings(abstract_params(model_config, c), shardings[c]) for c in ("params", "routers")}
    trainable, frozen = split_trainable(config, variables)
    trainable_shardings = {k: shardings[k] for k in trainable}
    optimizer = make_optimizer(config)
    abstract_opt = jax.eval_shape(optimizer.init, trainable)
    opt_shardings = opt_state_shardings(abstract_opt, trainable_shardings, mesh)
    opt_state = with_shardings(abstract_opt, opt_shardings)
    data_sharding = batch_sharding(mesh)
    batch = jax.eval_shape(lambda: synthetic_batch(model_config, config, 0))
    batch.pop("label")
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data_sharding), batch)
    step = jitted_train_step(config, model, optimizer, shared_inputs(model_config, config.height, config.width, config.num_txt),
                             trainable_shardings, opt_shardings, {k: shardings[k] for k in frozen}, data_sharding)
    kind = devices[0].device_kind
    report = {"topology": topology, "chips": len(devices), "device_kind": kind, "mesh": dict(mesh.shape),
              "model": model_config.family, "trainable": config.trainable, "global_batch": config.batch_size,
              "tokens": [config.height * config.width, config.num_txt], "remat": config.remat,
              "param_dtype": model_config.runtime.param_dtype, "dtype": model_config.runtime.dtype, "hbm_gib": HBM_GIB.get(kind)}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(trainable, opt_state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    except Exception as e:  # XLA reports running out of HBM as a compile error
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        report.update(fits=False, error=str(e).strip().splitlines()[0][:500])
    else:
        memory = compiled.memory_analysis()
        gib = lambda b: round(b / 2**30, 2)  # noqa: E731
        used = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
        report.update(arguments_gib=gib(memory.argument_size_in_bytes), outputs_gib=gib(memory.output_size_in_bytes),
                      temporaries_gib=gib(memory.temp_size_in_bytes), aliased_gib=gib(memory.alias_size_in_bytes),
                      per_chip_gib=gib(used), fits=None if report["hbm_gib"] is None else gib(used) <= report["hbm_gib"])
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    if report["fits"] is False:
        print(f"does not fit: {report.get('per_chip_gib', '?')} GiB per chip needed, {report['hbm_gib']} GiB on a "
              f"{kind}", file=sys.stderr)
    return report
