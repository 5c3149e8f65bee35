"""`edit-jax train ... --compile-only --topology v5e:4x4`: the real train step lowered and compiled
for a TPU slice on a CPU host (libtpu compiles for a topology without its chips), from abstract
shapes: no weights are read or made. The topology is libtpu's string (v5e:4x4, v5p:2x2x2) or the
cloud's slice name (v5litepod-16, v5p-32, v6e-8). Prints and returns the per-chip memory the compiled step
needs against the chip's HBM, or the out-of-memory error the real job would hit.

The batch is the synthetic source's shape (`height`, `width` in packed tokens, `num_txt`):
1024x1024 images are height=64 width=64; FLUX reads 512 T5 tokens, Qwen-Image about 256.
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.numpy as jnp

from edit_jax.config import ConfigError
from edit_jax.models.registry import abstract_params, build_model
from edit_jax.placement import param_shardings
from edit_jax.sharding import batch_sharding, make_mesh, replicated, use_rules
from edit_jax.train.config import TrainConfig
from edit_jax.train.data import shared_inputs, synthetic_batch
from edit_jax.train.loop import jitted_train_step, model_config_of, opt_state_shardings, split_trainable
from edit_jax.train.step import init_schedule, make_optimizer

# TPU generations: libtpu's name, the device kind JAX reports, HBM per chip (GiB; v5e: the 15.75 XLA
# reports it can use of 16), and whether the slice is a 3-D torus whose cloud name counts TensorCores
# (two per chip: v4-32 and v5p-32 are 16 chips) rather than chips (v5litepod-16, v6e-8).
CHIPS = {"v4": ("TPU v4", 32, True), "v5e": ("TPU v5 lite", 15.75, False), "v5p": ("TPU v5", 95, True),
         "v6e": ("TPU v6 lite", 32, False)}
HBM_GIB = {kind: hbm for kind, hbm, _ in CHIPS.values()}
GENERATION = {kind: name for name, (kind, _, _) in CHIPS.items()}
CLOUD_NAMES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
LIBTPU_NOTE = ("compile-only: libtpu starts up on a host without TPU chips; its start-up lines on stderr (an "
               "'unexpected worker hostname' among them) are harmless")


def libtpu_topology(name: str) -> tuple[str, str | None]:
    """(libtpu's topology string, a note or None) for a topology given as libtpu writes it
    ("v5e:4x4", "v5p:2x2x2") or as the cloud names a slice ("v5litepod-16", "v5p-32", "v6e-8",
    "v4-32"). The note warns of "v5", libtpu's name for the 95 GiB v5p, easily typed for a v5e."""
    cloud = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if cloud:
        generation = CLOUD_NAMES[cloud[1]]
        count, three_d = int(cloud[2]), CHIPS[generation][2]
        chips = count // 2 if three_d else count
        shapes = SHAPES_3D if three_d else SHAPES_2D
        if (three_d and count % 2) or chips not in shapes:
            sizes = ", ".join(f"{cloud[1]}-{c * 2 if three_d else c}" for c in shapes)
            raise ConfigError(f"--topology {name}: not a {generation} slice size ({sizes})")
        return f"{generation}:{shapes[chips]}", None
    generation = name.partition(":")[0]
    if generation == "v5":
        return name, (f"--topology {name}: 'v5' is libtpu's name for the v5p (95 GiB HBM per chip); for a v5e "
                      f"(16 GiB) give v5e:{name.partition(':')[2]} or its cloud name, e.g. v5litepod-16")
    return name, None


def topology_devices(name: str):
    """The devices of a TPU topology (`libtpu_topology`'s names; needs libtpu)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError("compile-only needs libtpu, the version jax pins: "
                          "pip install \"jax[tpu]==$(python -c 'import jax; print(jax.__version__)')\"")
    from jax.experimental import topologies

    libtpu_name, note = libtpu_topology(name)
    if note:
        print(note, file=sys.stderr)
    print(LIBTPU_NOTE, file=sys.stderr)
    try:
        return topologies.get_topology_desc(topology_name=libtpu_name, platform="tpu").devices
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot compile for TPU topology {name!r}: {str(e).splitlines()[0][:300]}") from e


def describe_chip(kind: str) -> str:
    """"v5e (TPU v5 lite), 15.75 GiB HBM per chip" for a device kind."""
    hbm = HBM_GIB.get(kind)
    return f"{GENERATION.get(kind, '?')} ({kind}), " + (f"{hbm} GiB HBM per chip" if hbm else "HBM per chip unknown")


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
    if config.trainable == "schedule":
        shardings["schedule"] = replicated(mesh)
        variables["schedule"] = with_shardings(jax.eval_shape(init_schedule, config, model_config), shardings["schedule"])
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
    runtime = model_config.runtime
    report = {"chip": describe_chip(kind), "topology": topology, "chips": len(devices), "device_kind": kind,
              "hbm_gib": HBM_GIB.get(kind), "mesh": dict(mesh.shape), "model": model_config.family,
              "trainable": config.trainable, "global_batch": config.batch_size,
              "tokens": [config.height * config.width, config.num_txt], "remat": config.remat,
              "attention": "xla" if runtime.attention == "auto" else runtime.attention,  # auto: cuDNN on NVIDIA only
              "param_dtype": runtime.param_dtype, "router_dtype": runtime.router_dtype, "dtype": runtime.dtype}
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
    verdict = {True: "fits", False: "does not fit", None: "compiled (HBM unknown)"}[report["fits"]]
    print(f"{topology}: {len(devices)} x {report['chip']}: {verdict}"
          + (f", {report['per_chip_gib']} GiB per chip needed" if "per_chip_gib" in report else ""), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return report
