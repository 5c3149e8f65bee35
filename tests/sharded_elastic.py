"""Run in a subprocess by test_sharding.py with 8 simulated CPU devices: the elastic forwards (infer
and forced, whose block weights stay stacked through the scan) with params sharded over (fsdp 4,
tensor 2) equal the unsharded ones, and so does E-DiT sampling (its modulations computed ahead for
every step; on FLUX), through the sample and generate commands too; under a set mesh the models
constrain their activations (the batch over data x fsdp) and still give the same result, on a mesh
with every axis > 1 (dense, forced, infer, and with tokamax's attention run per shard); and under
tensor parallelism no block moves weights between devices, dense or at narrow widths."""

import os
import sys
import traceback

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import edit_jax  # noqa: E402
from edit_jax.elastic.mechanism import ElasticConfig  # noqa: E402
from edit_jax.models.registry import example_inputs, init_variables, split_static  # noqa: E402
from edit_jax.placement import param_shardings  # noqa: E402
from edit_jax.sharding import make_mesh  # noqa: E402


def main(preset: str, part: str):
    """part "forwards": the elastic forwards, activation constraints and weight movement of one
    preset; "commands" (FLUX): sampling, loading, and the sample and generate commands on a mesh."""
    assert jax.device_count() == 8, jax.devices()
    config = edit_jax.preset(preset)
    model = edit_jax.build_model(config)
    variables = jax.tree.map(np.asarray, init_variables(config))  # host arrays: placed with no program
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = {"params": jax.device_put(variables["params"], param_shardings(config, mesh)),
               "routers": jax.device_put(variables["routers"], NamedSharding(mesh, PartitionSpec()))}
    if part == "commands":  # the sampler's sharding is the same for both families
        check_sampling(config, model, variables, sharded)
        check_load_on_a_mesh(config, model, variables, split_static(example_inputs(config, 2, 4, 4, 8))[0])
        check_the_sample_command_on_a_mesh(config, variables)
        check_the_generate_command_on_a_mesh()
        return
    arrays, cases = forward_cases(config, model)
    expected = {name: np.asarray(jax.jit(cases[name])(variables, arrays)) for name in ("dense", "forced", "infer")}
    for name in ("forced", "infer"):  # params sharded, no mesh set: jit places the activations
        got = np.asarray(jax.jit(cases[name])(sharded, arrays))
        error = np.linalg.norm(got - expected[name]) / np.linalg.norm(expected[name])
        assert error <= 1e-5, (preset, name, error)
        print(preset, name, f"relative error {error:.1e}")
    check_activation_constraints(config, variables, arrays, cases, expected)
    check_modulation_kernels_stay_split(config, model, variables)
    check_blocks_move_no_weights(config, model, variables)


def check_load_on_a_mesh(config, model, variables, arrays):
    """edit_jax.load and load_routers with a mesh place every array by the rules table, and the
    forward under that mesh equals the unsharded one."""
    import tempfile

    from edit_jax.checkpoint import save

    mesh = make_mesh({"data": -1, "tensor": 2})
    with tempfile.TemporaryDirectory() as tmp:
        save(f"{tmp}/ckpt", config, variables["params"], variables["routers"])
        model, params = edit_jax.load(f"{tmp}/ckpt", mesh=mesh)
        routers = edit_jax.load_routers(f"{tmp}/ckpt", mesh=mesh)
    for tree, collection in ((params, "params"), (routers, "routers")):
        expected = param_shardings(config, mesh, collection=collection)
        assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), tree, expected))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, **x))
    expected = np.asarray(forward(variables["params"], arrays))
    with jax.set_mesh(mesh):
        got = np.asarray(forward(params, arrays))
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert error <= 1e-5, error
    print(config.family, "loaded on a mesh", f"relative error {error:.1e}")


def check_the_sample_command_on_a_mesh(config, variables):
    """`edit-jax sample --mesh data=-1,tensor=2` with E-DiT and the cache gives the one-device latents."""
    import contextlib
    import io
    import tempfile

    from edit_jax.checkpoint import save
    from edit_jax.cli import main

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        save(f"{tmp}/ckpt", config, variables["params"], variables["routers"])
        np.savez(f"{tmp}/emb.npz", prompt_embeds=rng.standard_normal((4, 8, config.joint_attention_dim)).astype(np.float32),
                 pooled_prompt_embeds=rng.standard_normal((4, config.pooled_projection_dim)).astype(np.float32))
        latents = {}
        for name, extra in (("one device", []), ("mesh", ["--mesh", "data=-1,tensor=2"])):
            args = ["sample", f"{tmp}/ckpt", "--embeddings", f"{tmp}/emb.npz", "--out", f"{tmp}/{name}", "--height", "64",
                    "--width", "64", "--steps", "3", "--elastic", "infer", "--cache", "--cache-start", "1", *extra]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert main(args) == 0, name
            latents[name] = np.load(f"{tmp}/{name}/latents.npy")
    error = np.linalg.norm(latents["mesh"] - latents["one device"]) / np.linalg.norm(latents["one device"])
    assert error <= 1e-5, error
    print(config.family, "sample --mesh", f"relative error {error:.1e}")


def check_the_generate_command_on_a_mesh():
    """`edit-jax generate --mesh data=-1,tensor=2` on a diffusers FLUX pipeline folder (its
    transformer converted in memory, then placed on the mesh) gives the one-device images."""
    import contextlib
    import io
    import json
    import tempfile
    from pathlib import Path

    from PIL import Image

    from edit_jax.cli import main
    from tiny_pipeline import make_tiny_flux_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_flux_pipeline(Path(tmp) / "FLUX.1-tiny")
        images = {}
        for name, extra in (("one device", []), ("mesh", ["--mesh", "data=-1,tensor=2"])):
            args = ["generate", "--model", f"{tmp}/FLUX.1-tiny", "--prompt", "a red fox", "--prompt", "two cats",
                    "--height", "64", "--width", "48", "--steps", "3", "--embeddings-cache", f"{tmp}/cache",
                    "--out", f"{tmp}/{name}", "--quiet", *extra]
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert main(args) == 0, name
            images[name] = np.stack([np.asarray(Image.open(f"{tmp}/{name}/image-{i}.png"), np.float32) for i in range(2)])
        mesh = json.loads(Path(f"{tmp}/mesh/generate.json").read_text())["mesh"]
    assert mesh == {"data": 4, "fsdp": 1, "tensor": 2}, mesh
    assert np.abs(images["mesh"] - images["one device"]).max() <= 1, "a pixel moved by more than rounding"
    error = np.linalg.norm(images["mesh"] - images["one device"]) / np.linalg.norm(images["one device"])
    print("flux generate --mesh", f"relative error {error:.1e}")


def check_sampling(config, model, variables, sharded):
    """Three Euler steps with routers and the cache, sharded params and routers against unsharded."""
    from edit_jax.sampling.latents import initial_noise
    from edit_jax.sampling.sampler import SamplerConfig, make_conditions, sample

    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((2, config.pooled_projection_dim)) if config.family == "flux" else None
    cond = make_conditions(config, rng.standard_normal((2, 8, config.joint_attention_dim)), 64, 64, pooled)
    noise = initial_noise(jax.random.key(0), 2, config.in_channels // 4, 64, 64)
    elastic = ElasticConfig(mode="infer", decision="sample", cache=True, cache_start=1)
    run = lambda v: np.asarray(sample(model, v["params"], noise, cond, SamplerConfig(num_steps=3),  # noqa: E731
                                      routers=v["routers"], elastic=elastic)[0])
    expected, got = run(variables), run(sharded)
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert error <= 1e-5, (config.family, "sampling", error)
    print(config.family, "sampling", f"relative error {error:.1e}")


def forward_cases(config, model):
    """(arrays, {name: forward(variables, arrays)}): inputs of batch 4 (on Qwen-Image, a text mask
    with holes) and the forwards the mesh checks compare: dense, forced (every other block run,
    each at another width), infer, and dense with tokamax's attention."""
    arrays, static = split_static(example_inputs(config, 4, 4, 4, 8))
    if "encoder_hidden_states_mask" in arrays:
        arrays["encoder_hidden_states_mask"] = arrays["encoder_hidden_states_mask"].at[1, 5:].set(0)
    num_blocks = config.num_blocks
    pattern = {"run": jnp.arange(num_blocks) % 2 == 0, "bucket": jnp.arange(num_blocks, dtype=jnp.int32) % 4}
    tokamax = edit_jax.build_model(config.with_runtime(attention="tokamax"))
    return arrays, {
        "dense": lambda v, x: model.apply({"params": v["params"]}, **x, **static),
        "forced": lambda v, x: model.apply(v, **x, **static, elastic=ElasticConfig(mode="forced"), decisions=pattern)[0],
        "infer": lambda v, x: model.apply(v, **x, **static, elastic=ElasticConfig(mode="infer", decision="sample"))[0],
        "dense, tokamax attention": lambda v, x: tokamax.apply({"params": v["params"]}, **x, **static),
    }


def check_activation_constraints(config, variables, arrays, cases, expected):
    """The `cases` traced under jax.set_mesh, on a mesh with every axis > 1 (the batch split over
    data x fsdp, heads and MLP over tensor), hold sharding constraints and equal the unconstrained,
    unsharded forwards (`expected`, by name; tokamax's attention, whose kernels run per shard,
    against dense)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    on_mesh = {c: jax.device_put(variables[c], param_shardings(config, mesh, collection=c)) for c in ("params", "routers")}
    for name, forward in cases.items():
        want = expected["dense" if "dense" in name else name]
        with jax.set_mesh(mesh):
            traced = jax.jit(forward).trace(on_mesh, arrays)  # one trace: its jaxpr read, then run
            jaxpr = str(traced.jaxpr)
            got = np.asarray(traced.lower().compile()(on_mesh, arrays))
        assert jaxpr.count("sharding_constraint") >= 4, "the models constrain no activations"
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error <= 1e-5, (config.family, name, error)
        print(config.family, "on data x fsdp x tensor:", name, f"relative error {error:.1e}")


def check_modulation_kernels_stay_split(config, model, variables):
    """Under pure FSDP the modulations computed ahead of the scan never gather a stacked
    [L, D, kD] kernel whole (at full size that is GiBs a chip)."""
    import re

    arrays, static = split_static(example_inputs(config, 8, 4, 4, 8))
    mesh = make_mesh({"fsdp": 8})
    params = jax.device_put(variables["params"], param_shardings(config, mesh))
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda p, x: model.apply({"params": p}, **x, **static)).lower(params, arrays).compile().as_text()
    stacked = {tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if "linear" in jax.tree_util.keystr(path) and leaf.ndim == 3}
    gathered = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} all-gather\(", hlo)}
    assert stacked and not stacked & gathered, (config.family, stacked & gathered)
    print(config.family, "modulation kernels stay split")


def check_blocks_move_no_weights(config, model, variables):
    """Under tensor parallelism no block moves weights between devices, dense or at narrow widths:
    a FLUX single block's proj_out finds the rows of its attention heads and of its MLP channels
    where those heads and channels are (as one kernel split in halves, half its rows moved every
    step), and a width bucket's channels are an equal share of every shard's (`width_groups`; as a
    prefix of the MLP axis, they sat on the first shard and were moved to the others)."""
    import re

    arrays, static = split_static(example_inputs(config, 4, 4, 4, 8))
    mesh = make_mesh({"data": 4, "tensor": 2})
    params = jax.device_put(variables["params"], param_shardings(config, mesh))
    num_blocks = config.num_blocks
    narrow = {"run": jnp.ones(num_blocks, bool), "bucket": jnp.arange(num_blocks, dtype=jnp.int32) % 3}
    forwards = {
        "dense": lambda p, x: model.apply({"params": p}, **x, **static),
        "forced narrow": lambda p, x: model.apply({"params": p}, **x, **static, elastic=ElasticConfig(mode="forced"),
                                                  decisions=narrow),
    }
    for name, forward in forwards.items():
        with jax.set_mesh(mesh):
            hlo = jax.jit(forward).lower(params, arrays).compile().as_text()
        moved = [line.strip()[:200] for line in hlo.splitlines()
                 if re.search(r" collective-permute(-start)?\(", line) and "transformer_blocks" in line]
        assert not moved, (config.family, name, moved)
        print(config.family, name, "blocks move no weights")


def run_parts(parts: list[str]) -> int:
    """Runs each "PRESET:PART" under a "== PRESET PART" line, a failing one's traceback under its
    own line; the exit status says whether any failed."""
    failed = 0
    for preset_part in parts:
        preset, part = preset_part.split(":")
        print(f"== {preset} {part}", flush=True)
        try:
            main(preset, part)
        except Exception:  # the next part still runs: each test reads its own part
            traceback.print_exc(file=sys.stdout)
            failed = 1
        sys.stdout.flush()
    return failed


if __name__ == "__main__":
    sys.exit(run_parts(sys.argv[1:]))
