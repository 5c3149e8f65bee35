"""Router training: config validation, SPEC 4's loss, frozen base, exact resume, sharded steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edit_jax
from edit_jax.checkpoint import load_routers
from edit_jax.config import ConfigError
from edit_jax.models import init_variables
from train.config import TrainConfig, load_config
from train.data import shared_inputs, synthetic_batch
from train.loop import train
from train.step import make_loss_fn

REPO = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path, name="run", **overrides) -> TrainConfig:
    fields = dict(preset="flux-tiny", steps=4, batch_size=4, log_every=1, save_every=2, run_dir=str(tmp_path / name),
                  learning_rate=1e-2, warmup_steps=1, num_txt=4)
    return TrainConfig(**{**fields, **overrides})


def test_config_reads_a_file_and_applies_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 50\nrho_g: 0.5\nmesh: {data: 2}\n")
    config = load_config(tmp_path / "run.yaml", ["steps=7", "mesh.fsdp=4", "gate_budget=soft"])
    assert (config.steps, config.rho_g, config.gate_budget) == (7, 0.5, "soft")
    assert config.mesh == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("overrides, message", [
    (["stpes=3"], "unknown config field 'stpes'"),
    (["trainable=everything"], "trainable='everything'"),
    (["target=teacher", "trainable=routers+base"], "needs a frozen base"),
    (["batch_size=6", "grad_accum=4"], "not divisible by grad_accum"),
], ids=["unknown-field", "unknown-trainable", "teacher-with-base", "accumulation"])
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("mesh, devices, message", [
    ({"data": 3, "fsdp": -1}, 8, "does not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "needs 4 devices"),
    ({"data": 8, "fsdp": 1, "tensor": 1}, 8, "not divisible by the data-parallel size"),
])
def test_a_mesh_that_does_not_fit_is_one_clear_error(mesh, devices, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(mesh=mesh, batch_size=4).mesh_shape(devices)


def test_the_teacher_target_with_every_block_open_at_full_width_has_zero_flow_loss():
    config = TrainConfig(preset="flux-tiny", target="teacher", batch_size=2, num_txt=4)
    model_config = edit_jax.preset("flux-tiny")
    variables = init_variables(model_config)  # fresh routers: every block open at full width
    batch = {**synthetic_batch(model_config, config, 0), **shared_inputs(model_config, config)}
    batch.pop("label")

    _, metrics = make_loss_fn(config, edit_jax.build_model(model_config))(
        {"routers": variables["routers"]}, {"params": variables["params"]}, batch, jax.random.key(0))

    assert float(metrics["open_rate"]) == 1.0
    assert float(metrics["flow_loss"]) < 1e-12


def test_router_training_leaves_the_base_bitwise_unchanged_and_keeps_no_optimizer_state_for_it(tmp_path):
    config = tiny_run(tmp_path)
    train(config, progress=False)

    trained = edit_jax.load(tmp_path / "run" / "edit-jax")[1]
    initial = init_variables(edit_jax.preset("flux-tiny"), config.seed)
    jax.tree.map(np.testing.assert_array_equal, trained, jax.tree.map(np.asarray, initial["params"]))
    routers = load_routers(tmp_path / "run" / "edit-jax")
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(routers), jax.tree.leaves(initial["routers"])))
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "4" / "opt_state").rglob("*") if p.is_dir())
    assert not any("transformer_blocks.attn" in name or name.startswith("params") for name in saved)


def test_a_hard_gate_budget_moves_the_open_rate_to_rho_g(tmp_path):
    config = tiny_run(tmp_path, steps=40, rho_g=0.5, lambda_g=10.0, gate_budget="hard", batch_size=8, log_every=40)
    metrics = train(config, progress=False)
    assert abs(float(metrics["open_rate"]) - 0.5) <= 0.25  # fresh routers start with every block open


def test_a_resumed_run_equals_an_uninterrupted_one_exactly(tmp_path):
    train(tiny_run(tmp_path, "whole", steps=6), progress=False)
    train(tiny_run(tmp_path, "parts", steps=6), progress=False, max_steps=3)  # stopped after step 3
    train(tiny_run(tmp_path, "parts", steps=6), progress=False)  # resumes at 3

    whole, parts = (load_routers(tmp_path / n / "edit-jax") for n in ("whole", "parts"))
    jax.tree.map(np.testing.assert_array_equal, whole, parts)
    lines = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("whole", "parts")}
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
    assert strip(lines["whole"]) == strip(lines["parts"])


def test_the_cli_trains_from_overrides_alone(tmp_path, capsys):
    from edit_jax.cli import main

    assert main(["train", f"run_dir={tmp_path / 'cli'}", "steps=2", "batch_size=2", "num_txt=4", "--quiet"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out)
    assert (tmp_path / "cli" / "config.json").is_file() and list((tmp_path / "cli" / "tb").iterdir())


def test_a_sharded_step_on_data_2_fsdp_4_equals_one_device(tmp_path):
    """Two processes: the same run on 8 simulated devices (data 2 x fsdp 4) and on one device."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {"sharded": ("--xla_force_host_platform_device_count=8", "mesh.data=2", "mesh.fsdp=4"),
            "single": ("--xla_force_host_platform_device_count=1", "mesh.data=1", "mesh.fsdp=1")}
    for name, (flag, *mesh) in runs.items():
        args = [sys.executable, "-m", "edit_jax.cli", "train", f"run_dir={tmp_path / name}", "steps=2", "batch_size=8",
                "num_txt=4", "learning_rate=1e-2", "warmup_steps=1", "log_every=1", "preset=flux-small", *mesh, "--quiet"]
        done = subprocess.run(args, env={**env, "XLA_FLAGS": flag}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    sharded, single = (load_routers(tmp_path / n / "edit-jax") for n in runs)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
