"""`edit-jax train`: E-DiT router training on a device mesh, read top to bottom.

    edit-jax train run.yaml steps=2000 mesh.fsdp=8

Writes RUN_DIR/config.json, RUN_DIR/metrics.jsonl (and eval.jsonl), TensorBoard events in RUN_DIR/tb, orbax
checkpoints in RUN_DIR/checkpoints (trainable params, optimizer state, step, the data iterator;
the last `keep`), and at the end RUN_DIR/edit-jax, an edit-jax checkpoint with the trained routers
that `edit-jax sample` reads. A rerun with the same RUN_DIR resumes from the latest complete
checkpoint and continues exactly (same batches, same noise), on any mesh, its logs cut back to the
restored step; a SIGTERM (preemption) or SIGINT (Ctrl-C), to any of a run's processes, saves
before exiting with 128 + the signal (train/distributed.py: Preemption). In a
multi-process run only process 0 writes logs and metadata; every process takes part in the
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import edit_jax
from edit_jax.checkpoint import agreed, load_params, load_routers, save, stored_identity
from edit_jax.config import ConfigError, RuntimeConfig, preset
from edit_jax.elastic.flops import dense_flops
from edit_jax.models.registry import abstract_params, build_model, init_variables
from edit_jax.placement import describe, param_shardings, summarize
from edit_jax.sharding import batch_sharding, make_mesh, replicated, use_rules
from edit_jax.train.config import TrainConfig, describe_config
from edit_jax.train.data import DataSource, shared_inputs
from edit_jax.train.distributed import Preemption
from edit_jax.train.run_dir import (LOGS, SHARDING_FILE, changed_settings, check_run_dir, describe_changes,
                                    drop_records_after, run_config)
from edit_jax.train.step import init_schedule, make_loss_fn, make_optimizer, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message says where and what."""


def opt_state_shardings(abstract_opt_state, trainable_shardings, mesh):
    """The optimizer state's shardings: every sub-tree shaped like the trainable params (Adam's
    moments) takes their shardings; the rest (step counts) is replicated."""
    structure = jax.tree.structure(trainable_shardings)
    return jax.tree.map(
        lambda x: trainable_shardings if jax.tree.structure(x) == structure else replicated(mesh),
        abstract_opt_state, is_leaf=lambda x: jax.tree.structure(x) == structure,
    )


def jitted_train_step(config: TrainConfig, model, optimizer, shared: dict, trainable_shardings, opt_shardings,
                      frozen_shardings, data_sharding):
    """The train step under jit with every input and output sharding given and the state donated.

    Args:
      config: the run's TrainConfig. model: the transformer. optimizer: optax's.
      shared: the inputs every sample shares. trainable_shardings, opt_shardings,
        frozen_shardings: the state's. data_sharding: the batch's.
    """
    return jax.jit(make_train_step(config, model, optimizer, shared, data_sharding),
                   in_shardings=(trainable_shardings, opt_shardings, frozen_shardings, data_sharding, None),
                   out_shardings=(trainable_shardings, opt_shardings, None), donate_argnums=(0, 1))


# TrainConfig fields the train step never reads: where the run reads and writes, how often it logs,
# saves, evaluates and traces, and where its starting weights come from (the model config stands for them).
RUN_ONLY_FIELDS = ("run_dir", "log_every", "save_every", "keep", "eval_every", "eval_batches", "eval_data",
                   "profile_start", "profile_steps", "checkpoint", "preset", "routers", "data", "prefetch")


def summary_writer(folder: Path, purge_step: int | None):
    """tensorboardX's SummaryWriter for `folder`. tensorboardX imports torch where it is installed
    (1.3 s on 2 cores, a tenth of a tiny run's whole process) only to accept torch tensors, which
    the trainer never logs: torch is hidden from that import (an entry of None in sys.modules makes
    `import torch` fail), unless it is loaded already."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(str(folder), purge_step=purge_step)


def train_step_for(config: TrainConfig, model, model_config, grid: tuple[int, int], num_txt: int, shardings: tuple):
    """The jitted train step of a run's config, model and batch shape, with shardings = (trainable,
    opt_state, frozen, batch): one per process for every run that differs only in `RUN_ONLY_FIELDS`
    (the step is built with those at their defaults), so a second such run in the process (a
    resume, an evaluated or profiled run, the demo's rerun) neither traces nor compiles it again.

    Args:
      config: the run's TrainConfig. model: the transformer; model_config: its config.
      grid: (rows, cols) of packed image tokens. num_txt: text tokens. shardings: above.
    """
    same_step = dataclasses.replace(config, **{name: TrainConfig.__dataclass_fields__[name].default
                                               for name in RUN_ONLY_FIELDS})
    leaves, treedef = jax.tree.flatten(shardings, is_leaf=lambda x: x is None)
    key = (json.dumps(same_step.to_dict(), sort_keys=True, default=str), model, model_config, grid, num_txt, treedef,
           tuple(leaves))
    step = _TRAIN_STEPS.pop(key, None)
    if step is None:
        if len(_TRAIN_STEPS) >= 16:
            _TRAIN_STEPS.pop(next(iter(_TRAIN_STEPS)))
        shared = shared_inputs(model_config, *grid, num_txt)
        step = jitted_train_step(same_step, model, make_optimizer(same_step), shared, *shardings)
    _TRAIN_STEPS[key] = step  # the most recently used last
    return step


_TRAIN_STEPS: dict = {}  # train_step_for's, the 16 most recently used


def train_step_flops(model_config, batch: dict, grid, config: TrainConfig) -> float:
    """Model FLOPs of one train step (edit_jax.elastic.flops): forward and backward (3x the dense forward,
    recomputation under remat not counted), plus the teacher's forward.

    Args:
      model_config: the model config. batch: B. grid: (rows, cols) of packed tokens.
      config: the run's TrainConfig.
    """
    per_sample = dense_flops(model_config, grid[0] * grid[1], batch["encoder_hidden_states"].shape[1])
    return (3 + (config.target == "teacher")) * per_sample * batch["latents"].shape[0]


EVAL_STEPS = 10**9  # the synthetic source's batches from here on are never trained on


def make_evaluator(config: TrainConfig, model, model_config, data: DataSource, data_sharding):
    """evaluate(trainable, frozen) -> the mean metrics ("eval_" + name) over `eval_batches` fixed
    batches with fixed noise: from `eval_data` (held out), the synthetic source far past the last
    step (held out), or, without eval_data, the training dataset itself in another order (a
    fixed-noise training loss, which the run says, see `held_out_eval`).

    Args:
      config: the run's TrainConfig. model: the transformer. model_config: its config.
      data: the training data source. data_sharding: the batch's sharding.
    """
    if config.data == "synthetic" and config.eval_data is None:
        batches = [data.next(EVAL_STEPS + i) for i in range(config.eval_batches)]
    else:
        held_out = dataclasses.replace(config, data=config.eval_data or config.data, seed=config.seed + 1)
        source = DataSource(held_out, model_config, data_sharding)
        batches = [source.next(i) for i in range(config.eval_batches)]
    loss_fn, programs = make_loss_fn(config, model), {}

    def evaluate(trainable, frozen):
        totals = None
        for i, (batch, grid) in enumerate(batches):
            key = (grid, batch["encoder_hidden_states"].shape[1])
            if key not in programs:
                shared = shared_inputs(model_config, *grid, key[1])
                programs[key] = jax.jit(lambda t, f, b, k, shared=shared: loss_fn(t, f, {**b, **shared}, k)[1])
            metrics = programs[key](trainable, frozen, batch, jax.random.fold_in(jax.random.key(config.seed + 1), i))
            totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        return {f"eval_{k}": np.asarray(v) / len(batches) for k, v in jax.device_get(totals).items()}

    return evaluate


def held_out_eval(config: TrainConfig) -> bool:
    """Whether the evaluation reads examples the run never trains on."""
    return config.eval_data is not None or config.data == "synthetic"


def check_data_processes(saved: Path, run_dir: Path) -> None:
    """A dataset run resumes with as many processes as saved its data iterators (grain's state is
    one file per process, and each process reads its own slice of the data)."""
    names = (re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name) for f in saved.glob("process_*-of-*.json"))
    counts = {int(m[1]) for m in names if m}
    if counts and counts != {jax.process_count()}:
        raise ConfigError(f"{run_dir} holds a dataset run saved by {max(counts)} processes, and this is "
                          f"{jax.process_count()}: resume it with {max(counts)} processes (each reads its own slice of "
                          "the dataset, and the data order is saved per process), or choose another run_dir")


def split_trainable(config: TrainConfig, variables: dict) -> tuple[dict, dict]:
    """(trainable, frozen) collections of {"params", "routers"} (and "schedule", a fresh learned step
    schedule, with trainable="schedule"): the base is frozen (and gets no optimizer state) when only
    the routers or the schedule train."""
    if config.trainable == "schedule":
        return {"schedule": variables["schedule"]}, {"params": variables["params"]}
    if config.trainable == "routers":
        return {"routers": variables["routers"]}, {"params": variables["params"]}
    if config.trainable == "base":
        return {"params": variables["params"]}, {"routers": variables["routers"]}
    return dict(variables), {}


def model_config_of(config: TrainConfig, platform: str):
    """The model a run trains, with the run's settings (dtypes resolved for `platform`)."""
    if config.checkpoint is not None:
        model_config = edit_jax.checkpoint.load_config(config.checkpoint)
    else:
        model_config = preset(config.preset)
    param_dtype, dtype = config.dtypes(platform)
    return model_config.with_runtime(param_dtype=param_dtype, router_dtype=config.router_dtype,
                                     dtype=dtype, remat=config.remat, attention=config.attention)


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of `tree`'s arrays (restore targets)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train(config: TrainConfig, progress: bool = True, max_steps: int | None = None, describe_setup: bool = True) -> dict:
    """Runs (or resumes) the training run; returns the last logged metrics. max_steps: stop after
    this many steps of this call (a job with a wall-clock limit), saving a checkpoint there. describe_setup:
    print the settings, the dtypes and the sharding plan by rule first (every array's placement goes
    into RUN_DIR/sharding.txt).

    Args:
      config: the run's TrainConfig. progress: show a progress bar. max_steps, describe_setup:
        above.
    """
    with use_rules(config.axis_rules):
        return _train(config, progress, max_steps, describe_setup)


def _train(config: TrainConfig, progress: bool, max_steps: int | None, describe_setup: bool = True) -> dict:
    run_dir = check_run_dir(config)
    is_main = jax.process_index() == 0

    # ---- Mesh, model, data: everything checked before any compute ----------------------------
    mesh = make_mesh(config.mesh_shape(jax.device_count()))
    model_config = model_config_of(config, mesh.devices.flat[0].platform)
    model = build_model(model_config)
    data_sharding = batch_sharding(mesh)
    data = DataSource(config, model_config, data_sharding)
    shardings = {"params": param_shardings(model_config, mesh),
                 "routers": param_shardings(model_config, mesh, collection="routers")}
    if is_main and describe_setup:
        print(describe_config(config), file=sys.stderr)
        runtime = model_config.runtime
        print(f"dtypes: base params {runtime.param_dtype}, routers {runtime.router_dtype}, compute {runtime.dtype}",
              file=sys.stderr)
        print(f"{jax.process_count()} process(es); {summarize(model_config, mesh)}\n  every array's placement: "
              f"{run_dir / SHARDING_FILE}", file=sys.stderr)

    # ---- Params: created or restored straight into their shardings ---------------------------
    base_identity = None
    if config.checkpoint is None:
        variables = init_variables(model_config, config.seed, shardings)  # random base, fresh routers
    else:
        base_identity = stored_identity(config.checkpoint)  # before the read: a base written over later has another
        stored = load_routers(config.checkpoint, shardings["routers"]) if config.routers == "checkpoint" else None
        variables = {"params": load_params(config.checkpoint, abstract_params(model_config), shardings["params"]),
                     "routers": init_variables(model_config, config.seed, shardings, ("routers",))["routers"]
                     if stored is None else jax.tree.map(lambda x: x.astype(config.router_dtype), stored)}
    if config.trainable == "schedule":  # small: every device holds all of it
        shardings["schedule"] = replicated(mesh)
        variables["schedule"] = jax.jit(lambda: init_schedule(config, model_config), out_shardings=shardings["schedule"])()
    trainable, frozen = split_trainable(config, variables)
    trainable_shardings = {k: shardings[k] for k in trainable}
    frozen_shardings = {k: shardings[k] for k in frozen}

    # ---- Optimizer: state only for what trains, sharded like it ------------------------------
    optimizer = make_optimizer(config)
    opt_shardings = opt_state_shardings(jax.eval_shape(optimizer.init, trainable), trainable_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)

    # ---- Checkpoints: resume from the latest complete one, onto this run's shardings ---------
    items = ("trainable", "opt_state", "meta") + (("data",) if data.iterator is not None else ())
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True, cleanup_tmp_directories=True),
        item_names=items,
    )
    start = 0
    if manager.latest_step() is not None:
        import grain

        start = manager.latest_step()
        if start > config.steps:
            raise ConfigError(f"{run_dir} holds a run already at step {start}, past steps={config.steps}: give "
                              f"steps >= {start} to continue it, or choose another run_dir")
        args = {"trainable": ocp.args.StandardRestore(abstract_like(trainable)),
                "opt_state": ocp.args.StandardRestore(abstract_like(opt_state)), "meta": ocp.args.JsonRestore()}
        if data.iterator is not None:
            check_data_processes(run_dir / "checkpoints" / str(start) / "data", run_dir)
            args["data"] = grain.checkpoint.CheckpointRestore(data.iterator)
        changes = changed_settings(run_config(run_dir), config)
        try:
            restored = manager.restore(start, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:  # orbax's tree and shape mismatches
            why = (f"; settings changed since that run: {describe_changes(changes)}. Rerun with that run's settings "
                   "to resume it" if changes else
                   ", though its settings are the same: an edit-jax with another param layout wrote it (FLUX's "
                   "single-block proj_out was one kernel before checkpoint format 2). Resume it with that edit-jax")
            raise ConfigError(f"{run_dir} holds a run whose checkpoint (step {start}) does not fit this config{why}, "
                              "or choose another run_dir") from e
        stored_groups = restored["meta"].get("width_groups", 1)  # runs before it was recorded: channels in order
        if stored_groups != model_config.width_groups:
            raise ConfigError(f"{run_dir} holds a run whose model stored its MLP channels with width_groups="
                              f"{stored_groups}, and this config's model has {model_config.width_groups} (an edit-jax "
                              "before checkpoint format 3 started it from a preset): resume it with that edit-jax, or "
                              "choose another run_dir")
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        if is_main:
            print(f"resumed from step {start} ({run_dir / 'checkpoints'})"
                  + (f" with changed settings: {describe_changes(changes)}" if changes else ""), file=sys.stderr)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (run_dir / SHARDING_FILE).write_text(describe(model_config, mesh) + "\n")
        for log in LOGS:  # the steps after the restored one run again, and are logged again
            drop_records_after(run_dir / log, start)

    def save_checkpoint(step):
        args = {"trainable": ocp.args.StandardSave(trainable), "opt_state": ocp.args.StandardSave(opt_state),
                "meta": ocp.args.JsonSave({"step": step, "data": config.data, "config": config.to_dict(),
                                           "width_groups": model_config.width_groups})}
        if data.iterator is not None:
            import grain

            args["data"] = grain.checkpoint.CheckpointSave(data.iterator)
        manager.save(step, args=ocp.args.Composite(**args), force=True)

    # ---- Update step: one compiled program per batch shape, the state donated ----------------
    compiled = {}

    def step_for(batch, grid):
        key = (grid, batch["encoder_hidden_states"].shape[1])
        if key not in compiled:
            fn = train_step_for(config, model, model_config, grid, key[1],
                                (trainable_shardings, opt_shardings, frozen_shardings, data_sharding))
            with jax.set_mesh(mesh):  # the models constrain their activations to this mesh's axes
                compiled[key] = fn.lower(trainable, opt_state, frozen, abstract_like(batch), jnp.int32(0)).compile()
            memory = compiled[key].memory_analysis()
            if is_main and describe_setup and memory is not None:
                print(f"train step for {grid[0]}x{grid[1]} image + {key[1]} text tokens, per device: arguments "
                      f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} "
                      f"MiB, outputs {memory.output_size_in_bytes / 2**20:.1f} MiB", file=sys.stderr)
        return compiled[key]

    end = config.steps if max_steps is None else min(config.steps, start + max_steps)
    evaluate = make_evaluator(config, model, model_config, data, data_sharding) if config.eval_every else None
    if evaluate is not None and is_main and not held_out_eval(config):
        print(f"eval: no eval_data, so every {config.eval_every} steps the run scores its own training examples "
              "(fixed batches and noise): a training loss, not a held-out one; eval.jsonl says held_out: false. "
              "Give eval_data=DATASET (edit-jax prepare-data) for held-out scores", file=sys.stderr)
    if start == config.steps and is_main:
        print(f"the run in {run_dir} is complete (step {start} of {config.steps}): nothing to train; give a larger "
              f"steps= to continue it", file=sys.stderr)
    pending = data.next(start) if start < end else None
    if pending is not None:
        step_for(*pending)  # compiled ahead of the loop

    # ---- Loop ---------------------------------------------------------------------------------
    writer = None
    if is_main:
        writer = summary_writer(run_dir / "tb", purge_step=start + 1 if start else None)
    metrics = {}
    tracing = ProfileWindow(config, run_dir, enabled=is_main)
    # Steps are dispatched ahead of the device, so a step's time is only known where the host waits
    # for the device: the wall time since the last such point, over the steps run since.
    synced_at, synced_step = time.perf_counter(), start
    with Preemption() as preemption:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(range(start, end), initial=start, total=config.steps, desc="train", unit="step",
                       disable=not (progress and is_main))
            for step in bar:
                tracing.before(step)
                batch, grid = pending if pending is not None else data.next(step)
                pending = None
                trainable, opt_state, metrics = step_for(batch, grid)(trainable, opt_state, frozen, batch,
                                                                      jnp.int32(step))
                done = step + 1
                tracing.after(done, trainable)
                if done % config.log_every == 0 or done == end:
                    metrics = jax.device_get(metrics)
                    loss = float(metrics["loss"])
                    if not math.isfinite(loss):
                        raise TrainingError(f"the loss is {loss} at step {done}: stopping (lower learning_rate, or "
                                            "check the data); the last good checkpoint is kept")
                    now = time.perf_counter()
                    seconds = (now - synced_at) / (done - synced_step)
                    synced_at, synced_step = now, done
                    record = {"step": done, "time": time.time(), "step_time_s": seconds,
                              "model_tflops_per_s": train_step_flops(model_config, batch, grid, config) / seconds / 1e12,
                              **{k: np.asarray(v).tolist() for k, v in metrics.items()}}
                    if writer is not None:
                        with open(run_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(record) + "\n")
                        for k, v in record.items():
                            if np.ndim(v) == 0 and k not in ("step", "time"):
                                writer.add_scalar(k, v, done)
                    bar.set_postfix(loss=f"{loss:.4f}", open=f"{float(metrics['open_rate']):.2f}")
                if evaluate is not None and (done % config.eval_every == 0 or done == config.steps):
                    scores = evaluate(trainable, frozen)
                    if writer is not None:
                        with open(run_dir / "eval.jsonl", "a") as f:
                            f.write(json.dumps({"step": done, "held_out": held_out_eval(config),
                                                **{k: v.tolist() for k, v in scores.items()}}) + "\n")
                        for k, v in scores.items():
                            if np.ndim(v) == 0:
                                writer.add_scalar(k, v, done)
                    synced_at, synced_step = time.perf_counter(), done  # an evaluation's time is not step time
                preempted = preemption.reached(done)
                if done % config.save_every == 0 or done == end or preempted:
                    save_checkpoint(done)
                    synced_at, synced_step = time.perf_counter(), done  # nor is a save's
                if preempted:
                    manager.wait_until_finished()
                    if is_main:
                        print(f"stopped by {preemption.describe()} after step {done}; checkpoint saved in "
                              f"{run_dir / 'checkpoints'}: rerun the same command to continue", file=sys.stderr)
                    raise SystemExit(128 + preemption.signal)
            manager.wait_until_finished()
        finally:
            tracing.stop()
            if writer is not None:
                writer.close()
    if end < config.steps and is_main:
        print(f"stopped after step {end} of {config.steps} (max_steps {max_steps}), its checkpoint saved in "
              f"{run_dir / 'checkpoints'}: rerun to continue", file=sys.stderr)
    if end == config.steps:
        export_final(run_dir / "edit-jax", model_config, trainable, frozen, config.checkpoint,
                     base_identity, trained_router_mode(config), trained_step_schedule(config, trainable))
    return jax.device_get(metrics)


class ProfileWindow:
    """The steps [profile_start, profile_start + profile_steps) traced by jax.profiler into
    RUN_DIR/profile (TensorBoard's profile plugin or Perfetto read it); on process 0 only."""

    def __init__(self, config: TrainConfig, run_dir: Path, enabled: bool):
        self.first, self.end = config.profile_start, config.profile_start + config.profile_steps
        self.enabled, self.path, self.active = enabled and config.profile_steps > 0, run_dir / "profile", False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(str(self.path))
            self.active = True

    def after(self, done: int, state) -> None:
        if self.active and done == self.end:
            jax.block_until_ready(state)  # the traced steps' work, not only their dispatch
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            print(f"profile of steps {self.first} to {self.end - 1}: {self.path}", file=sys.stderr)


def trained_router_mode(config) -> dict | None:
    """What a run's routers are trained for, for the checkpoint (`edit_jax.checkpoint.router_mode`);
    None where no router trains."""
    if config.trainable in ("base", "schedule"):
        return None
    if config.closed == "reuse":
        return {"closed": "reuse", "max_reuse": config.reuse_max, "order": config.reuse_order}
    return {"closed": "skip"}


def trained_step_schedule(config: TrainConfig, trainable: dict) -> dict | None:
    """A schedule run's learned step schedule for the checkpoint (`edit_jax.checkpoint.step_schedule`):
    p [S][L] = sigmoid of its logits, the threshold tau and what a closed block does; None for other runs."""
    if config.trainable != "schedule":
        return None
    logits = trainable["schedule"].addressable_data(0)  # replicated: every process holds all of it
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return {"p": p.round(6).tolist(), "tau": config.tau, "closed": config.closed, "max_reuse": config.reuse_max,
            "order": config.reuse_order}


def export_final(path, model_config, trainable: dict, frozen: dict, base: str | None = None,
                 base_identity: tuple | None = None, router_mode: dict | None = None,
                 step_schedule: dict | None = None) -> None:
    """The trained model as an edit-jax checkpoint (base params and routers); in a multi-process
    run every process writes its own shards. base: the checkpoint the run read its base from, and
    `stored_identity` of it then. A frozen base whose checkpoint is still the one read and stores
    it as the export would is hard-linked from there (no second copy of FLUX.1-dev's 24 GB per
    run), not written again.

    Args:
      path: the checkpoint to write. model_config: the model config. trainable, frozen: the
        run's params and routers, split as trained. base, base_identity: above. router_mode: what
        the routers were trained for (`trained_router_mode`), kept in its config.json.
        step_schedule: a learned step schedule (`trained_step_schedule`), kept there too.
    """
    params = trainable.get("params", frozen.get("params"))
    routers = trainable.get("routers", frozen.get("routers"))
    fresh = RuntimeConfig()  # how a loader runs it by default: training's remat and attention are training's own
    model_config = model_config.with_runtime(attention=fresh.attention, remat=fresh.remat)
    same_base = base is not None and "params" in frozen and agreed(stored_identity(base) == base_identity)
    if base is not None and "params" in frozen and not same_base and jax.process_index() == 0:
        print(f"{path}: its frozen base is written, not hard-linked: {base} is no longer the checkpoint the run "
              "read it from", file=sys.stderr)
    save(path, model_config, params, routers, overwrite=True, params_from=base if same_base else None,
         router_mode=router_mode, step_schedule=step_schedule)
