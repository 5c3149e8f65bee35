"""Router training: config validation, SPEC 4's loss, frozen base, exact resume, sharded steps."""

import ast
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
from edit_jax.checkpoint import CheckpointError, load_routers, save
from edit_jax.config import ConfigError
from edit_jax.models.registry import build_model, init_variables
from edit_jax.train import step as step_module
from edit_jax.train.config import TrainConfig, load_train_config
from edit_jax.train.data import shared_inputs, synthetic_batch
from edit_jax.train.loop import RUN_ONLY_FIELDS, train, train_step_for
from edit_jax.train.step import make_loss_fn

REPO = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path, name="run", **overrides) -> TrainConfig:
    fields = dict(preset="flux-tiny", steps=4, batch_size=4, log_every=1, save_every=2, run_dir=str(tmp_path / name),
                  learning_rate=1e-2, warmup_steps=1, num_txt=4)
    return TrainConfig(**{**fields, **overrides})


def test_config_reads_a_file_and_applies_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 50\nrho_g: 0.5\nmesh: {data: 2}\n")
    config = load_train_config(tmp_path / "run.yaml", ["steps=7", "mesh.fsdp=4", "gate_budget=soft", "checkpoint=ckpt/flux"])
    assert (config.steps, config.rho_g, config.gate_budget, config.checkpoint) == (7, 0.5, "soft", "ckpt/flux")
    assert config.mesh == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("overrides, message", [
    (["stpes=3"], "unknown config field 'stpes'"),
    (["trainable=everything"], "trainable='everything'"),
    (["target=teacher", "trainable=routers+base"], "needs a frozen base"),
    (["batch_size=6", "grad_accum=4"], "not divisible by grad_accum"),
    (["skip_blocks=[1]"], "needs trainable='base'"),
    (["trainable=base", "skip_blocks=[-1]"], "block indices >= 0"),
    (["skip_blocks=3"], "skip_blocks=3 must be a list"),
    (["steps=ten"], "steps=ten: 'ten' is not an integer"),
    (["mesh.data=two"], "mesh.data=two: 'two' is not an integer"),
    (["mesh.data=0"], "sizes >= 1"),
    (["learning_rate=-1e-4"], "learning_rate=-0.0001 must be > 0"),
    (["guidance=nan"], "guidance=nan must be a finite number"),
    (["b2=1"], r"b2=1.0 must be in \[0, 1\)"),
    (["height=0"], "height=0 must be >= 1"),
    (["run_dir="], "run_dir is empty"),
    (["eval_data=held_out"], "eval_every=0"),
    (["steps=4", "profile_start=3", "profile_steps=2"], "trace past the last step"),
], ids=["unknown-field", "unknown-trainable", "teacher-with-base", "accumulation", "pruning-routers", "negative-block",
        "skip-blocks-not-a-list", "not-an-integer", "mesh-not-an-integer", "mesh-zero", "negative-learning-rate",
        "non-finite", "b2", "empty-grid", "empty-run-dir", "eval-data-never-read", "profile-past-the-end"])
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


@pytest.mark.parametrize("text, message", [
    ("steps: ten\n", "steps='ten' must be an integer"),
    ("mesh: 8\n", "mesh=8 must be a mapping"),
    ("learning_rate: [1]\n", "learning_rate=\\[1\\] must be a finite number"),
], ids=["text-for-integer", "number-for-mapping", "list-for-number"])
def test_a_config_file_with_a_value_of_the_wrong_type_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(tmp_path / "run.yaml")


def test_a_float_that_yaml_reads_as_text_is_read_as_the_number_it_spells(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 3e-5\n")  # YAML 1.1: no dot, so a string
    assert load_train_config(tmp_path / "run.yaml").learning_rate == 3e-5


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
    batch = {**synthetic_batch(model_config, config, 0), **shared_inputs(model_config, 4, 4, 4)}
    batch.pop("label")

    _, metrics = jax.jit(make_loss_fn(config, edit_jax.build_model(model_config)))(
        {"routers": variables["routers"]}, {"params": variables["params"]}, batch, jax.random.key(0))

    assert float(metrics["open_rate"]) == 1.0
    assert float(metrics["flow_loss"]) < 1e-12


def test_gradient_accumulation_averages_the_gradients_and_metrics_of_its_micro_batches():
    import optax

    from edit_jax.train.step import make_train_step

    config = TrainConfig(preset="flux-tiny", batch_size=6, grad_accum=3, num_txt=4)
    model_config = edit_jax.preset("flux-tiny")
    model, variables = edit_jax.build_model(model_config), init_variables(model_config)
    trainable, frozen = {"routers": variables["routers"]}, {"params": variables["params"]}
    batch = synthetic_batch(model_config, config, 0)
    batch.pop("label")
    shared = shared_inputs(model_config, 4, 4, 4)
    sgd = optax.sgd(1.0)  # the update is minus the gradient
    updated, _, metrics = jax.jit(make_train_step(config, model, sgd, shared))(trainable, sgd.init(trainable), frozen,
                                                                               batch, jnp.int32(0))

    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    grad_fn = jax.jit(jax.grad(make_loss_fn(config, model), has_aux=True))
    by_hand = [grad_fn(trainable, frozen, {**jax.tree.map(lambda x, i=i: x[i::3], batch), **shared},  # sample b: b % 3
                       jax.random.fold_in(key, i)) for i in range(3)]
    mean = lambda trees: jax.tree.map(lambda *x: sum(x) / 3, *trees)  # noqa: E731
    expected = jax.tree.map(jnp.subtract, trainable, mean([g for g, _ in by_hand]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updated, expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 {k: metrics[k] for k in by_hand[0][1]}, mean([m for _, m in by_hand]))


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


@pytest.mark.parametrize("budget", ["hard", "soft"])
def test_the_loss_falls_and_the_gate_budget_moves_the_routers_to_rho_g(tmp_path, budget):
    # fresh routers start with every block open at p = 0.7; the budget asks for rho_g
    rho = 0.5 if budget == "hard" else 0.2  # a soft budget skips blocks only when rho_g is well below tau
    config = tiny_run(tmp_path, steps=40, rho_g=rho, lambda_g=10.0, gate_budget=budget, batch_size=8, log_every=1)
    metrics = train(config, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    first, last = ({k: np.mean([r[k] for r in part]) for k in ("loss", "gate_loss")} for part in (rows[:5], rows[-5:]))
    assert last["loss"] < 0.8 * first["loss"]  # the frozen random base bounds the flow term
    assert last["gate_loss"] < 0.2 * first["gate_loss"]
    if budget == "hard":
        assert abs(float(metrics["open_rate"]) - rho) <= 0.25
    else:
        assert float(metrics["mean_p"]) < 0.45


def test_evaluation_scores_fixed_held_out_batches_every_eval_every_steps(tmp_path):
    train(tiny_run(tmp_path, steps=4, eval_every=2, eval_batches=2), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["held_out"] and np.isfinite(r["eval_loss"]) and len(r["eval_open_rate_per_block"]) == 2 for r in rows)


@pytest.fixture
def tiny_dataset(tmp_path):
    from test_dataset import flux_examples

    from edit_jax.train.dataset import write_dataset

    return write_dataset(tmp_path / "ds", "flux", flux_examples(16, seed=3))


def test_a_dataset_run_without_eval_data_says_its_evaluation_reads_training_examples(tmp_path, tiny_dataset, capsys):
    train(tiny_run(tmp_path, steps=2, eval_every=2, eval_batches=1, data=str(tiny_dataset)), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["held_out"] for r in rows] == [False]
    assert "a training loss, not a held-out one" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["synthetic", "dataset"])
def test_a_resumed_run_equals_an_uninterrupted_one_exactly(tmp_path, tiny_dataset, source):
    data = {"data": str(tiny_dataset)} if source == "dataset" else {}
    train(tiny_run(tmp_path, "whole", steps=6, **data), progress=False)
    train(tiny_run(tmp_path, "parts", steps=6, **data), progress=False, max_steps=3)  # stopped after step 3
    train(tiny_run(tmp_path, "parts", steps=6, **data), progress=False)  # resumes at 3

    whole, parts = (load_routers(tmp_path / n / "edit-jax") for n in ("whole", "parts"))
    jax.tree.map(np.testing.assert_array_equal, whole, parts)
    lines = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("whole", "parts")}
    timing = ("time", "step_time_s", "model_tflops_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(lines["whole"]) == strip(lines["parts"])


@pytest.fixture
def tiny_base(once_per_session):
    """A flux-tiny checkpoint without routers, saved once for the session: runs that train routers
    on it compile no init of the base (the costliest program of a tiny run's start)."""
    def make(folder):
        config = edit_jax.preset("flux-tiny")
        save(folder / "ckpt", config, init_variables(config, seed=7)["params"])

    return once_per_session("tiny-base", make)[0] / "ckpt"


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_during_training_saves_a_checkpoint_and_exits(tmp_path, signum, tiny_base):
    import signal
    import time

    signum = getattr(signal, signum)

    args = [sys.executable, "-m", "edit_jax.cli", "train", f"run_dir={tmp_path / 'run'}", f"checkpoint={tiny_base}",
            "steps=100000", "batch_size=2", "num_txt=4", "log_every=1", "save_every=100000", "--quiet"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not reach step 2: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()

    assert proc.returncode == 128 + signum, err[-3000:]
    assert "checkpoint saved" in err and "Traceback" not in err
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert saved and all(name.isdigit() for name in saved) and max(map(int, saved)) >= 2  # no orbax-checkpoint-tmp


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_to_one_process_of_two_stops_both_at_one_saved_step(tmp_path, signum, tiny_base):
    """A preemption notice (or Ctrl-C) that reaches one process of a multi-process run: both save
    the same step (JAX's preemption service agrees on it) and exit, instead of a collective mismatch."""
    import signal
    import time

    signum = getattr(signal, signum)

    procs = two_processes(tmp_path / "run", f"checkpoint={tiny_base}", "steps=100000", "save_every=100000", wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, "the run did not reach step 2"
            time.sleep(0.2)
        procs[1].send_signal(signum)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for proc in procs:
            proc.kill()

    codes = [128 + signal.SIGTERM, 128 + signum]  # the process given Ctrl-C says so; the other was told by JAX
    assert [p.returncode for p in procs] == codes, errs[0][-3000:] + errs[1][-3000:]
    assert "checkpoint saved" in errs[0]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2


def test_the_cli_trains_from_overrides_alone(tmp_path, capsys):
    from edit_jax.cli import main

    assert main(["train", f"run_dir={tmp_path / 'cli'}", "steps=2", "batch_size=2", "num_txt=4", "--quiet"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out)
    assert (tmp_path / "cli" / "config.json").is_file() and list((tmp_path / "cli" / "tb").iterdir())


def test_overrides_after_a_flag_are_read_as_overrides(tmp_path, capsys):
    from edit_jax.cli import main

    assert main(["train", "--quiet", "--max-steps", "1", f"run_dir={tmp_path / 'cli'}", "steps=2", "batch_size=2",
                 "num_txt=4"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_txt"] == 4


def test_a_stray_argument_after_a_flag_is_still_argparses_error(capsys):
    from edit_jax.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["train", "--quiet", "--no-such-flag"])
    assert exit.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_topology_without_compile_only_is_refused_before_any_run(tmp_path, capsys):
    from edit_jax.cli import main

    assert main(["train", f"run_dir={tmp_path / 'r'}", "--topology", "v5e:4x4"]) == 2
    assert "--topology v5e:4x4 only acts with --compile-only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name, libtpu", [("v5litepod-16", "v5e:4x4"), ("v5e-8", "v5e:2x4"), ("v6e-8", "v6e:2x4"),
                                          ("v5p-32", "v5p:2x2x4"), ("v4-8", "v4:2x2x1"), ("v5e:4x4", "v5e:4x4")])
def test_a_cloud_slice_name_reads_as_libtpus_topology(name, libtpu):
    from edit_jax.train.compile_only import libtpu_topology

    assert libtpu_topology(name) == (libtpu, None)


def test_v5_for_a_slice_is_named_as_the_95_gib_v5p_with_the_v5e_spelling_beside_it():
    from edit_jax.train.compile_only import describe_chip, libtpu_topology

    name, note = libtpu_topology("v5:4x4")
    assert name == "v5:4x4" and "v5p (95 GiB HBM per chip)" in note and "v5e:4x4" in note
    assert describe_chip("TPU v5") == "v5p (TPU v5), 95 GiB HBM per chip"
    assert describe_chip("TPU v5 lite") == "v5e (TPU v5 lite), 15.75 GiB HBM per chip"


def test_a_cloud_slice_of_no_real_size_is_one_error_listing_the_sizes():
    from edit_jax.train.compile_only import libtpu_topology

    with pytest.raises(ConfigError, match="not a v5e slice size .*v5litepod-16"):
        libtpu_topology("v5litepod-12")


CLI_RUN = ("steps=2", "batch_size=8", "num_txt=4", "learning_rate=1e-2", "warmup_steps=1", "lr_schedule=constant",
           "log_every=1")


def run_cli(run_dir, devices, *overrides, env_extra=None, wait=True):
    args = [sys.executable, "-m", "edit_jax.cli", "train", f"run_dir={run_dir}", *CLI_RUN, *overrides, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
           **(env_extra or {})}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def two_processes(run_dir, *overrides, env_extra=None, wait=True):
    """The CLI run as two real processes (jax.distributed on localhost) of 2 CPU devices each: their
    stderr once both have exited 0, or the processes themselves (wait=False)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [run_cli(run_dir, 2, "mesh.data=2", "mesh.fsdp=2", *overrides, wait=False, env_extra={
        "EDIT_JAX_COORDINATOR": f"localhost:{port}", "EDIT_JAX_NUM_PROCESSES": "2", "EDIT_JAX_PROCESS_ID": str(i),
        **(env_extra or {})}) for i in range(2)]
    if not wait:
        return procs
    errs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            errs.append(err)
    finally:
        for proc in procs:
            proc.kill()
    return errs


def assert_same_run(a, b):
    for x, y in zip(jax.tree.leaves(load_routers(a / "edit-jax")), jax.tree.leaves(load_routers(b / "edit-jax"))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_two_process_run_resumed_on_another_mesh_equals_one_device(two_process_router_run, tmp_path):
    """Three steps on one device from a checkpoint; the same as two real processes (the session's
    two-process run: jax.distributed on localhost, CPU collectives, 2 devices each as data 2 x
    fsdp 2) for two steps, then restored from their checkpoint by one process onto 8 simulated
    devices as fsdp 8 for the third."""
    import shutil

    ckpt, run, _ = two_process_router_run
    shutil.copytree(run, tmp_path / "sharded")  # resumed in a copy: the session's run stays as its other tests read it
    train(load_train_config(None, [f"run_dir={tmp_path / 'single'}", *CLI_RUN, f"checkpoint={ckpt}", "mesh.data=1",
                                   "mesh.fsdp=1", "steps=3"]), progress=False, describe_setup=False)
    run_cli(tmp_path / "sharded", 8, f"checkpoint={ckpt}", "mesh.data=1", "mesh.fsdp=8", "steps=3")  # resumes at 2
    assert_same_run(tmp_path / "single", tmp_path / "sharded")


def test_routers_have_their_own_param_dtype_beside_a_bfloat16_base():
    from edit_jax.models.registry import abstract_params

    config = edit_jax.preset("flux-tiny").with_runtime(param_dtype="bfloat16", router_dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(abstract_params(config))} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(abstract_params(config, "routers"))} == {jnp.dtype("float32")}


@pytest.mark.parametrize("folder", ["checkpoint", "other-files"])
def test_a_run_dir_that_is_not_a_runs_folder_is_refused_and_left_as_it_was(tmp_path, folder):
    run_dir = tmp_path / "target"
    if folder == "checkpoint":
        variables = init_variables(edit_jax.preset("flux-tiny"))
        save(run_dir, edit_jax.preset("flux-tiny"), variables["params"])
    else:
        run_dir.mkdir()
        (run_dir / "config.json").write_text('{"model_type": "something else"}')
        (run_dir / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    with pytest.raises(ConfigError, match="is not a training run's folder"):
        train(tiny_run(tmp_path, "target"), progress=False)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_run_dir_overlapping_its_starting_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="overlap"):
        train(tiny_run(tmp_path, "run", checkpoint=str(tmp_path / "run" / "edit-jax")), progress=False)


def test_a_run_that_does_not_fit_with_unchanged_settings_is_blamed_on_another_param_layout(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    train(tiny_run(tmp_path, steps=2), progress=False)

    def restore(*args, **kwargs):  # what orbax raises on a tree of another structure
        raise ValueError("tree structures differ")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    with pytest.raises(ConfigError, match="settings are the same: an edit-jax with another param layout wrote it"):
        train(tiny_run(tmp_path, steps=2), progress=False)


def test_a_run_whose_model_stored_its_channels_otherwise_is_not_resumed(tmp_path, monkeypatch):
    from edit_jax.train import loop

    train(tiny_run(tmp_path, steps=2), progress=False)
    before = loop.model_config_of
    monkeypatch.setattr(loop, "model_config_of", lambda c, p: before(c, p).replace(width_groups=1))

    with pytest.raises(ConfigError, match="stored its MLP channels with width_groups=8, and this config's model has 1"):
        train(tiny_run(tmp_path, steps=2), progress=False)


def test_a_resumed_run_names_its_changed_settings_and_refuses_a_config_its_checkpoint_does_not_fit(tmp_path, capsys):
    train(tiny_run(tmp_path, steps=2), progress=False)
    with pytest.raises(ConfigError, match="settings changed since that run: trainable 'routers' -> 'routers\\+base'"):
        train(tiny_run(tmp_path, steps=2, trainable="routers+base"), progress=False)

    capsys.readouterr()
    train(tiny_run(tmp_path, steps=3, rho_g=0.5), progress=False)
    resumed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resumed from step 2 (")]
    assert resumed and resumed[0].endswith("with changed settings: rho_g 0.6 -> 0.5, steps 2 -> 3")


def test_a_run_past_the_steps_asked_for_is_refused_and_a_complete_one_says_so(tmp_path, capsys):
    train(tiny_run(tmp_path, steps=2), progress=False)
    config_before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match="holds a run already at step 2, past steps=1: give steps >= 2"):
        train(tiny_run(tmp_path, steps=1), progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == config_before

    capsys.readouterr()
    train(tiny_run(tmp_path, steps=2), progress=False)
    assert "is complete (step 2 of 2): nothing to train" in capsys.readouterr().err


def test_a_run_writes_a_profiler_trace_of_the_steps_asked_for(tmp_path, capsys):
    train(tiny_run(tmp_path, steps=4, profile_start=1, profile_steps=2), progress=False)
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert f"profile of steps 1 to 2: {tmp_path / 'run' / 'profile'}" in capsys.readouterr().err


def test_a_field_newer_than_the_resumed_run_is_a_change_only_off_its_default(tmp_path):
    from edit_jax.train.run_dir import changed_settings

    stored = json.loads(json.dumps(tiny_run(tmp_path).to_dict()))
    del stored["profile_steps"]
    assert changed_settings(stored, tiny_run(tmp_path)) == {}
    assert changed_settings(stored, tiny_run(tmp_path, profile_steps=1)) == {"profile_steps": (None, 1)}


def _event_steps(folder):
    """(scalar steps, SessionLog START steps) of every TensorBoard event file in `folder`, in
    order (the TFRecord framing read by hand: TensorBoard itself is not a dependency)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars, starts = [], []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            if event.HasField("summary"):
                scalars.append(event.step)
            elif event.HasField("session_log") and event.session_log.status == event.session_log.START:
                starts.append(event.step)
    return scalars, starts


def test_a_resumed_run_logs_each_step_once_in_its_metrics_evaluations_and_tensorboard(tmp_path):
    import shutil

    train(tiny_run(tmp_path, steps=4, eval_every=1, eval_batches=1), progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # killed after step 4 was logged, before its save
    train(tiny_run(tmp_path, steps=4, eval_every=1, eval_batches=1), progress=False)  # resumes at step 2

    for log in ("metrics.jsonl", "eval.jsonl"):
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / log).read_text().splitlines()]
        assert steps == [1, 2, 3, 4], log
    scalars, starts = _event_steps(tmp_path / "run" / "tb")
    assert starts[-1] == 3  # TensorBoard drops the first run's events from step 3 on
    assert sorted(set(s for s in scalars[scalars.index(3):] if s >= 3)) == [3, 4]


def test_a_checkpoint_interrupted_mid_save_is_never_resumed_from(tmp_path):
    train(tiny_run(tmp_path, steps=4), progress=False)
    partial = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1795980000000000"
    (partial / "trainable").mkdir(parents=True)  # what a kill during the save of step 6 leaves

    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints", item_names=("trainable", "opt_state", "meta"))
    assert manager.latest_step() == 4


def test_a_non_finite_loss_stops_the_run_with_a_message(tmp_path):
    from test_dataset import flux_examples

    from edit_jax.train.dataset import write_dataset
    from edit_jax.train.loop import TrainingError

    examples = flux_examples(8)
    for example in examples:
        example["latents"][:] = np.nan
    data = write_dataset(tmp_path / "nan", "flux", examples)
    with pytest.raises(TrainingError, match="the loss is nan at step 1"):
        train(tiny_run(tmp_path, data=str(data)), progress=False)


def test_a_records_step_times_add_up_to_the_wall_time_since_the_record_before(tmp_path):
    """Steps are dispatched ahead of the device: a step's time is the wall time between two
    records over the steps between them, not the time of the one step whose metrics were read."""
    train(tiny_run(tmp_path, steps=12, log_every=4, save_every=100, preset="flux-small", num_txt=8, height=8, width=8),
          progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for before, record in zip(records, records[1:]):
        steps = record["step"] - before["step"]
        assert record["step_time_s"] * steps == pytest.approx(record["time"] - before["time"], rel=0.05, abs=5e-3)


def test_metrics_record_step_time_and_model_tflops(tmp_path):
    train(tiny_run(tmp_path, steps=2), progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step_time_s"] > 0 and record["model_tflops_per_s"] > 0
    assert len(record["open_rate_per_block"]) == 2 and len(record["mean_width_per_block"]) == 2


def test_sharded_training_has_the_rules_shardings_and_equals_unsharded_on_every_mesh_axis():
    done = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_train.py")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "checked" in done.stdout
    assert done.stdout.count("train step on data x fsdp x tensor equals unsharded") == 2


def test_the_pipeline_noise_sampler_shifts_as_the_model_pipeline_shifts_its_schedule():
    from edit_jax.sampling.schedules import SCHEDULERS, flow_match_schedule
    from edit_jax.train.step import pipeline_shift

    config = edit_jax.preset("flux-dev")
    uniform = np.linspace(1.0, 1 / 28, 28).astype(np.float32)  # the schedule's unshifted sigmas
    sigmas, _ = flow_match_schedule(SCHEDULERS["flux-dev"], 28, 4096)
    np.testing.assert_allclose(pipeline_shift(config, 4096, jnp.asarray(uniform)), sigmas[:-1], rtol=1e-5)


def test_training_from_a_checkpoint_starts_from_its_base_with_fresh_routers(tmp_path):
    config = edit_jax.preset("flux-tiny")
    base = init_variables(config, seed=7)["params"]
    save(tmp_path / "ckpt", config, base)
    train(tiny_run(tmp_path, checkpoint=str(tmp_path / "ckpt"), routers="fresh", steps=2), progress=False)

    trained = edit_jax.load(tmp_path / "run" / "edit-jax")[1]
    jax.tree.map(np.testing.assert_array_equal, trained, jax.tree.map(np.asarray, base))


def test_dense_training_moves_only_the_base_and_keeps_the_routers_as_they_were(tmp_path):
    config = tiny_run(tmp_path, trainable="base", steps=20, batch_size=8, learning_rate=3e-3)
    train(config, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    assert np.mean([r["loss"] for r in rows[-4:]]) < 0.8 * np.mean([r["loss"] for r in rows[:4]])
    assert all(r["gate_loss"] == 0.0 and r["open_rate"] == 1.0 for r in rows)
    initial = init_variables(edit_jax.preset("flux-tiny"), config.seed)
    jax.tree.map(np.testing.assert_array_equal, load_routers(tmp_path / "run" / "edit-jax"),
                 jax.tree.map(np.asarray, initial["routers"]))
    trained = edit_jax.load(tmp_path / "run" / "edit-jax")[1]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial["params"])))


def test_static_pruning_training_never_runs_nor_updates_a_skipped_block(tmp_path):
    config = tiny_run(tmp_path, trainable="base", skip_blocks=(1,), steps=3)  # flux-tiny: block 1 is its single block
    metrics = train(config, progress=False)

    assert float(metrics["open_rate"]) == 0.5
    trained = edit_jax.load(tmp_path / "run" / "edit-jax")[1]
    initial = init_variables(edit_jax.preset("flux-tiny"), config.seed)["params"]
    jax.tree.map(np.testing.assert_array_equal, trained["single_transformer_blocks"],
                 jax.tree.map(np.asarray, initial["single_transformer_blocks"]))
    assert not np.array_equal(trained["transformer_blocks"]["attn"]["to_q"]["kernel"],
                              initial["transformer_blocks"]["attn"]["to_q"]["kernel"])


def test_runs_that_differ_only_in_where_they_write_share_one_train_step_in_a_process(tmp_path):
    model_config = edit_jax.preset("flux-tiny")
    model = build_model(model_config)

    def step(config):
        return train_step_for(config, model, model_config, (2, 2), 4, (None, None, None, None))

    first = step(tiny_run(tmp_path, "a"))
    assert step(tiny_run(tmp_path, "b", log_every=5, save_every=7, keep=1)) is first
    assert step(tiny_run(tmp_path, "c", eval_every=2, eval_batches=1, profile_steps=1, prefetch=0)) is first
    assert step(tiny_run(tmp_path, "a", learning_rate=3e-3)) is not first
    assert step(tiny_run(tmp_path, "a", steps=5)) is not first  # a cosine schedule reads the steps


def test_the_train_step_reads_none_of_the_fields_its_cache_leaves_out():
    tree = ast.parse(Path(step_module.__file__).read_text())
    read = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config"}
    assert "steps" in read and not read & set(RUN_ONLY_FIELDS)


def test_skip_blocks_past_the_last_block_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="the model has blocks 0..1"):
        train(tiny_run(tmp_path, trainable="base", skip_blocks=(2,)), progress=False)


def test_training_in_a_thread_other_than_the_main_one_runs(tmp_path):
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(train(tiny_run(tmp_path, steps=1), progress=False)))
    thread.start()
    thread.join()
    assert "loss" in result


def test_a_run_folder_given_as_a_checkpoint_is_an_error_naming_the_trained_one(tmp_path):
    train(tiny_run(tmp_path, steps=1), progress=False)
    with pytest.raises(CheckpointError, match="training run's folder, whose trained checkpoint is .*run/edit-jax"):
        edit_jax.load(tmp_path / "run")


def test_a_dataset_run_saved_by_other_processes_is_resumed_only_by_as_many(tmp_path, tiny_dataset):
    train(tiny_run(tmp_path, steps=2, data=str(tiny_dataset)), progress=False, max_steps=1)
    saved = tmp_path / "run" / "checkpoints" / "1" / "data"
    (saved / "process_0-of-1.json").rename(saved / "process_0-of-2.json")  # as two processes save it
    (saved / "process_1-of-2.json").write_text((saved / "process_0-of-2.json").read_text())
    with pytest.raises(ConfigError, match="a dataset run saved by 2 processes, and this is 1: resume it with 2"):
        train(tiny_run(tmp_path, steps=2, data=str(tiny_dataset)), progress=False)


def test_inspect_of_a_run_folder_says_where_the_run_stands(tmp_path, capsys):
    from edit_jax.cli import main

    train(tiny_run(tmp_path, steps=2), progress=False, max_steps=1)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["saved_steps"], status["steps"], status["trained_checkpoint"]) == ([1], 2, None)
    assert status["last_metrics"]["step"] == 1 and {"loss", "step_time_s"} <= status["last_metrics"].keys()
    assert status["last_logged_at"].endswith(" UTC")
    train(tiny_run(tmp_path, steps=2), progress=False)
    assert main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"trained checkpoint: {tmp_path / 'run' / 'edit-jax'}" in out
    assert "last logged: step 2, loss" in out and "step_time_s" in out and " UTC)" in out


@pytest.mark.parametrize("platform, trainable, want", [
    ("gpu", "routers", ("bfloat16", "bfloat16")), ("tpu", "routers", ("bfloat16", "bfloat16")),
    ("gpu", "routers+base", ("float32", "bfloat16")), ("cpu", "routers", ("float32", "float32"))])
def test_auto_dtypes_are_bfloat16_on_an_accelerator_with_float32_for_a_base_that_trains(platform, trainable, want):
    assert TrainConfig(trainable=trainable).dtypes(platform) == want


def test_dtypes_given_are_kept_on_every_platform():
    assert TrainConfig(param_dtype="float32", dtype="float16").dtypes("gpu") == ("float32", "float16")


def base_files(path) -> dict:
    return {f.relative_to(path): f.stat().st_ino for f in (path / "params").rglob("*") if f.is_file()}


def test_the_trained_checkpoint_hard_links_a_frozen_base_stored_as_it_trained(tmp_path):
    config = edit_jax.preset("flux-tiny")
    save(tmp_path / "ckpt", config, init_variables(config, seed=7)["params"])
    train(tiny_run(tmp_path, checkpoint=str(tmp_path / "ckpt"), steps=2), progress=False)

    assert base_files(tmp_path / "run" / "edit-jax") == base_files(tmp_path / "ckpt")
    assert load_routers(tmp_path / "run" / "edit-jax") is not None


def test_a_base_written_over_during_the_run_is_not_linked_into_its_trained_checkpoint(tmp_path, monkeypatch, capsys):
    from edit_jax.train import loop

    config = edit_jax.preset("flux-tiny")
    base = init_variables(config, seed=7)["params"]
    save(tmp_path / "ckpt", config, base)
    export_final = loop.export_final

    def after_a_new_conversion(*args, **kwargs):
        save(tmp_path / "ckpt", config, init_variables(config, seed=8)["params"], overwrite=True)
        export_final(*args, **kwargs)

    monkeypatch.setattr(loop, "export_final", after_a_new_conversion)
    train(tiny_run(tmp_path, checkpoint=str(tmp_path / "ckpt"), steps=2), progress=False)

    assert "is no longer the checkpoint the run read it from" in capsys.readouterr().err

    jax.tree.map(np.testing.assert_array_equal, edit_jax.load(tmp_path / "run" / "edit-jax")[1],
                 jax.tree.map(np.asarray, base))


@pytest.fixture
def two_process_router_run(once_per_session, tiny_base):
    """Routers trained by two real processes from the session's tiny base, JAX's preemption service
    off, once for the whole session (whichever xdist worker asks first): (the base checkpoint, the
    run folder, each process's stderr)."""
    def run(folder):
        return two_processes(folder / "run", f"checkpoint={tiny_base}",
                             env_extra={"JAX_ENABLE_PREEMPTION_SERVICE": "false"})

    folder, errs = once_per_session("two-process-router-run", run)
    return tiny_base, folder / "run", errs


def test_a_two_process_run_links_its_frozen_base_into_its_trained_routers_checkpoint(two_process_router_run):
    ckpt, run, _ = two_process_router_run

    assert base_files(run / "edit-jax") == base_files(ckpt)
    assert load_routers(run / "edit-jax") is not None


def test_a_two_process_run_without_jax_preemption_service_trains_and_says_a_sigterm_saves_nothing(two_process_router_run):
    _, run, errs = two_process_router_run

    assert "preemption service is off" in errs[0] and (run / "edit-jax").is_dir()


def test_a_two_process_schedule_run_links_its_frozen_base_and_writes_the_replicated_table_once(tmp_path, tiny_base):
    from edit_jax.checkpoint import step_schedule

    two_processes(tmp_path / "run", f"checkpoint={tiny_base}", "trainable=schedule", "objective=rollout",
                  "closed=reuse", "rollout_steps=2", "rollout_schedule=4")

    assert base_files(tmp_path / "run" / "edit-jax") == base_files(tiny_base)
    num_blocks = edit_jax.preset("flux-tiny").num_blocks
    assert np.asarray(step_schedule(tmp_path / "run" / "edit-jax")["p"]).shape == (4, num_blocks)


def test_max_steps_stops_a_cli_run_with_a_checkpoint_that_the_same_command_continues(tmp_path, capsys):
    from edit_jax.cli import main

    args = ["train", f"run_dir={tmp_path / 'run'}", "steps=4", "save_every=10", "batch_size=2", "num_txt=4", "--quiet"]
    assert main(args + ["--max-steps", "2"]) == 0
    assert "stopped after step 2 of 4" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert not (tmp_path / "run" / "edit-jax").exists()

    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().err and (tmp_path / "run" / "edit-jax").is_dir()


def test_the_trained_checkpoint_runs_by_default_as_a_fresh_one_not_with_training_remat_and_attention(tmp_path):
    from edit_jax.checkpoint import load_config

    train(tiny_run(tmp_path, steps=1, remat="full", attention="xla", param_dtype="bfloat16"), progress=False)

    runtime = load_config(tmp_path / "run" / "edit-jax").runtime
    assert (runtime.remat, runtime.attention, runtime.param_dtype) == ("none", "auto", "bfloat16")


def test_the_tensorboard_writer_starts_without_importing_torch_and_leaves_it_importable(tmp_path):
    script = f"""
import sys
from edit_jax.train.loop import summary_writer
writer = summary_writer({str(tmp_path)!r}, None)
writer.add_scalar("loss", 1.0, 1)
writer.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_distributed_outside_a_cluster_jax_detects_is_one_error_saying_what_to_give(tmp_path):
    """A fresh process, as on a cluster: JAX joins one only before anything has used a device."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_MCA_orte_hnp_uri", "SLURM_JOB_ID", "KUBERNETES_SERVICE_HOST")}
    done = subprocess.run([sys.executable, "-m", "edit_jax.cli", "train", "steps=1", f"run_dir={tmp_path / 'run'}",
                           "--distributed", "--quiet"], capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)},
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--distributed: JAX found no cluster to join" in done.stderr
    assert "--coordinator, --num-processes and --process-id" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_coordinator_without_the_process_count_and_id_is_one_error_naming_all_three(tmp_path, capsys, monkeypatch):
    from edit_jax.cli import main

    for variable in ("EDIT_JAX_NUM_PROCESSES", "EDIT_JAX_PROCESS_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert main(["train", "steps=1", f"run_dir={tmp_path / 'run'}", "--coordinator", "localhost:1234", "--quiet"]) == 2
    assert "needs all three of the coordinator address, the number of processes and this process's id" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_diffusers_folder_given_as_the_checkpoint_says_to_convert_it(tmp_path):
    folder = tmp_path / "FLUX.1-dev" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    for given in (folder, folder.parent):  # the transformer folder, or the pipeline folder holding it
        with pytest.raises(CheckpointError, match=r"a diffusers flux model folder, not yet converted; make a checkpoint "
                                                  r"with `edit-jax convert flux .* ckpt/FLUX.1-dev`"):
            train(tiny_run(tmp_path, checkpoint=str(given)), progress=False)


def test_the_start_up_prints_changed_settings_and_the_sharding_by_rule_and_writes_every_placement(tmp_path, capsys):
    train(tiny_run(tmp_path, steps=1, mesh={"data": 1, "fsdp": 1, "tensor": 1}), progress=False)
    err = capsys.readouterr().err
    settings = err[err.index("settings"):err.index("dtypes")].splitlines()[1:]
    assert "  steps         = 1" in settings and all(" = " in line for line in settings)
    assert "kept whole on every device: 79 arrays" in err and "sharding.txt" in err
    assert len(err.splitlines()) < 30  # the whole start-up, not one line per array
    plan = (tmp_path / "run" / "sharding.txt").read_text().splitlines()
    assert len(plan) == 1 + 79 and plan[1].startswith("  context_embedder/bias: (32,) ('embed',) -> (None,)")

