"""The training config: one frozen dataclass, read from YAML or JSON with `key=value` overrides,
validated before any compute, printed at start and saved beside the checkpoints.

    edit-jax train run.yaml steps=2000 rho_g=0.5 mesh.fsdp=8

Names follow the paper (SPEC section 4): the loss is
    L = L_flow + lambda_g * L_gate + lambda_w * L_width
with the gate budget rho_g (constant, or linear in the noise level s from rho_high at s = 0 to
rho_low at s = 1) read from the soft p or the hard straight-through gate, and the width budget rho_w.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from edit_jax.config import ATTENTION_IMPLEMENTATIONS, DTYPES, PRESETS, REMAT_POLICIES, ConfigError
from edit_jax.sharding import MESH_AXES, mesh_sizes, rules_with

TRAINABLE = ("routers", "routers+base", "base", "schedule")
TARGETS = ("data", "teacher")
GATE_BUDGETS = ("soft", "hard")
RHO_SCHEDULES = ("constant", "linear")
NOISE_SAMPLERS = ("uniform", "logit_normal", "shift", "pipeline")
LR_SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("flow", "rollout")
ROLLOUT_LOSSES = ("velocity", "final")
CLOSED = ("skip", "reuse")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (see the module docstring for the loss)."""

    # what to start from
    checkpoint: str | None = None  # converted edit-jax checkpoint; None: random weights of `preset`
    preset: str = "flux-tiny"  # only without a checkpoint (smoke runs, tests, benchmarks)
    routers: str = "checkpoint"  # "checkpoint" (its routers, fresh where it has none) or "fresh"
    trainable: str = "routers"  # "routers" (base frozen, no optimizer state), "routers+base", or "base":
    # the base alone with the flow loss, routers untouched (dense training, or static pruning below); or
    # "schedule": no router, one learned p per step of the rollout schedule and block, the same for every
    # sample (Learning-to-Cache's per-step router; base frozen; objective=rollout)
    skip_blocks: tuple = ()  # with trainable=base: blocks (scan order) never run, a statically pruned model
    # the loss (SPEC section 4)
    target: str = "data"  # "data": v = noise - x0; "teacher": the dense model's velocity
    lambda_g: float = 1.0
    lambda_w: float = 1.0
    gate_budget: str = "hard"  # the gate budget reads the "soft" p or the "hard" straight-through gate
    rho_schedule: str = "constant"
    rho_g: float = 0.6  # constant gate budget
    rho_high: float = 0.7  # linear: rho_g(s) = rho_high + (rho_low - rho_high) * s
    rho_low: float = 0.5
    rho_w: float = 0.75
    tau: float = 0.5
    # what a closed block does: "skip" (E-DiT: the identity) or "reuse" (it adds its residual from its
    # last computed step, `edit_jax.elastic.block_cache.LearnedReuse`; trained on rollouts)
    closed: str = "skip"
    reuse_max: int = 4  # closed=reuse: reuses in a row before a block computes whatever its router says
    reuse_order: int = 0  # closed=reuse: 0 the stored residual, 1 extrapolated along its change per step
    # "flow": SPEC 4's one step at a random noise level; "rollout": windows of the sampler's steps rolled
    # out with the routers (and the reuse cache in the carry), each step's velocity against the dense
    # model's at the same point, no gradient between steps (train/step.py)
    objective: str = "flow"
    rollout_steps: int = 4  # steps per rollout window
    rollout_schedule: int = 28  # the sampling schedule's steps the window is cut from (the family's scheduler)
    # what the rollout is judged by: "velocity", each step's velocity against the dense model's at the same
    # point, no gradient between steps; "final", the window's end point against the dense model's end point
    # from the same start (its mean velocity's error), the gradient through every step of the window
    rollout_loss: str = "velocity"
    # trainable=schedule: 0 starts with every block open at every step; k >= 1 starts from TaylorSeer's
    # compute map (every block computes at the steps TaylorSeer(cache_interval=k, disable_cache_before_step=1)
    # computes, and is closed, p 0.3, at the others)
    schedule_init_interval: int = 0
    # noise levels s in [0, 1]
    noise_sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # "shift": s' = shift s / (1 + (shift - 1) s) of a uniform s; "pipeline": the
    # resolution-dependent shift of the model's own pipeline (its scheduler config)
    # optimizer (optax AdamW)
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per step
    # the run
    batch_size: int = 8  # global
    steps: int = 1000
    log_every: int = 10
    eval_every: int = 0  # 0: no evaluation
    eval_batches: int = 2  # fixed batches per evaluation (fixed noise too)
    eval_data: str | None = None  # a held-out dataset; None: synthetic batches past the last step, or the
    # training dataset's own examples (a training loss: eval.jsonl says held_out: false)
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    profile_start: int = 1  # the first step of the profiler trace (0-based; step 0 is the first of the run)
    profile_steps: int = 0  # steps traced by jax.profiler into RUN_DIR/profile (process 0); 0: no trace
    run_dir: str = "runs/edit"
    seed: int = 0
    # data: a dataset folder (train/dataset.py: ArrayRecord + manifest), or "synthetic"
    # (class-conditional toy latents for smoke runs and benchmarks, of the size below)
    data: str = "synthetic"
    prefetch: int = 4  # batches each process reads ahead of the step, on as many threads (0: none)
    guidance: float = 3.5  # FLUX.1-dev's embedded guidance during training
    height: int = 4  # packed token grid of the synthetic source
    width: int = 4
    num_txt: int = 8
    num_classes: int = 10
    # how it runs
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    # changes to the logical-axis rules (edit_jax/sharding.py), e.g. {"embed": null, "mlp": "tensor"}
    axis_rules: dict = dataclasses.field(default_factory=dict)
    remat: str = "none"
    attention: str = "xla"  # "xla", "cudnn" (GPU), "splash" (TPU flash kernel), "tokamax" or "auto" (cudnn on an
    # NVIDIA GPU in 16 bits, else xla); xla by default: the kernels' backward passes are not yet run on a GPU here
    param_dtype: str = "auto"  # base params; auto: bfloat16 on a GPU or TPU while the base is frozen, else float32
    router_dtype: str = "float32"  # routers and their optimizer state
    dtype: str = "auto"  # compute; auto: bfloat16 on a GPU or TPU, float32 on CPU

    def __post_init__(self):
        self._check_types()
        choices = {"routers": ("checkpoint", "fresh"), "trainable": TRAINABLE, "target": TARGETS,
                   "gate_budget": GATE_BUDGETS, "rho_schedule": RHO_SCHEDULES, "noise_sampler": NOISE_SAMPLERS,
                   "lr_schedule": LR_SCHEDULES, "remat": REMAT_POLICIES, "attention": ATTENTION_IMPLEMENTATIONS,
                   "param_dtype": ("auto", *DTYPES), "router_dtype": DTYPES, "dtype": ("auto", *DTYPES),
                   "objective": OBJECTIVES, "closed": CLOSED, "rollout_loss": ROLLOUT_LOSSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.checkpoint is None and self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if self.target == "teacher" and self.trainable != "routers":
            raise ConfigError("target='teacher' needs a frozen base (trainable='routers'): the teacher is the "
                              "same base run dense, so training the base would move the target")
        if self.skip_blocks and self.trainable != "base":
            raise ConfigError(f"skip_blocks={list(self.skip_blocks)} prunes blocks statically: it needs trainable='base'")
        if any(not isinstance(i, int) or i < 0 for i in self.skip_blocks):
            raise ConfigError(f"skip_blocks={list(self.skip_blocks)} must be block indices >= 0 (scan order)")
        if self.closed == "reuse" and self.objective != "rollout":
            raise ConfigError("closed='reuse' reuses residuals of earlier steps, which one flow step at a random noise "
                              "level has none of: train it with objective='rollout'")
        if self.objective == "rollout" and self.trainable not in ("routers", "schedule"):
            raise ConfigError("objective='rollout' learns from the dense model's velocity along the rollout: it needs a "
                              "frozen base (trainable='routers' or 'schedule')")
        if self.rollout_loss != "velocity" and self.objective != "rollout":
            raise ConfigError(f"rollout_loss={self.rollout_loss!r} judges a rollout's window: "
                              "it needs objective='rollout'")
        if self.trainable == "schedule" and self.objective != "rollout":
            raise ConfigError("trainable='schedule' learns a p for each step of the sampling schedule: train it with "
                              "objective='rollout' (one flow step at a random noise level is no step of the schedule)")
        if self.schedule_init_interval and self.trainable != "schedule" or self.schedule_init_interval < 0:
            raise ConfigError(f"schedule_init_interval={self.schedule_init_interval} starts a learned step schedule from "
                              "TaylorSeer's compute map: it needs trainable='schedule' and a value >= 0")
        if not 1 <= self.rollout_steps <= self.rollout_schedule or self.reuse_max < 0 or self.reuse_order not in (0, 1):
            raise ConfigError(f"rollout_steps={self.rollout_steps} must be in [1, rollout_schedule={self.rollout_schedule}], "
                              f"reuse_max={self.reuse_max} >= 0 and reuse_order={self.reuse_order} 0 or 1")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 and eval_batches={self.eval_batches} >= 1")
        if self.eval_data is not None and not self.eval_every:
            raise ConfigError(f"eval_data={self.eval_data!r} is given but eval_every=0: set eval_every=N to evaluate on it")
        if not self.run_dir.strip():
            raise ConfigError("run_dir is empty: name the folder the run writes its checkpoints and logs to")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep", "height", "width",
                     "num_txt", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.profile_steps and self.profile_start + self.profile_steps > self.steps:
            raise ConfigError(f"profile_start={self.profile_start} and profile_steps={self.profile_steps} trace past "
                              f"the last step (steps={self.steps})")
        for name in ("warmup_steps", "seed", "weight_decay", "grad_clip", "lambda_g", "lambda_w", "profile_start",
                     "profile_steps", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("learning_rate", "logit_std", "shift"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        for name in ("rho_g", "rho_high", "rho_low", "rho_w", "tau"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1]")
        try:
            rules_with(self.axis_rules)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        unknown = sorted(set(self.mesh) - set(MESH_AXES))
        sizes = list(self.mesh.values())
        if (unknown or sizes.count(-1) > 1
                or any(not _is_int(v) or (v < 1 and v != -1) for v in sizes)):
            raise ConfigError(f"mesh {self.mesh}: axes are {MESH_AXES}, sizes >= 1 and at most one of them -1 (the rest)")

    def _check_types(self):
        """Each field holds a value of its annotated type (a YAML file can hold anything)."""
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), str(field.type)
            if kind.endswith(" | None"):
                if value is None:
                    continue
                kind = kind.removesuffix(" | None")
            ok = {"int": _is_int(value),
                  "float": (_is_int(value) or isinstance(value, float)) and math.isfinite(value),
                  "str": isinstance(value, str), "tuple": isinstance(value, (tuple, list)),
                  "dict": isinstance(value, dict)}[kind]
            if not ok:
                what = {"int": "an integer", "float": "a finite number", "str": "a string", "tuple": "a list",
                        "dict": "a mapping"}[kind]
                raise ConfigError(f"{field.name}={value!r} must be {what}")

    def mesh_shape(self, num_devices: int) -> dict[str, int]:
        """The mesh sizes over `num_devices`, -1 filled in; a ConfigError when they do not divide."""
        try:
            sizes = mesh_sizes(self.mesh, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if (self.batch_size // self.grad_accum) % (sizes["data"] * sizes["fsdp"]):
            raise ConfigError(f"the micro-batch of {self.batch_size // self.grad_accum} is not divisible by the "
                              f"data-parallel size data x fsdp = {sizes['data'] * sizes['fsdp']}")
        return sizes

    def dtypes(self, platform: str) -> tuple[str, str]:
        """(param_dtype, dtype) of a run on `platform` ("cpu", "gpu", "tpu"), "auto" resolved: bfloat16
        on an accelerator (a frozen base stays bfloat16, as converted; a base that trains keeps float32
        master weights), float32 on CPU (the dtype of the parity tests)."""
        accelerator = platform != "cpu"
        param_dtype = self.param_dtype
        if param_dtype == "auto":
            param_dtype = "bfloat16" if accelerator and self.trainable in ("routers", "schedule") else "float32"
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if accelerator else "float32")
        return param_dtype, dtype

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_config(config: TrainConfig) -> str:
    """The settings as `key = value` lines, those off their defaults (the rest: RUN_DIR/config.json)."""
    default = TrainConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != default[k]}
    width = max(map(len, changed), default=0)
    return "\n".join(["settings (the others at their defaults; all of them in RUN_DIR/config.json):",
                      *(f"  {k:<{width}} = {v}" for k, v in changed.items())])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_value(key: str, text: str, current: Any) -> Any:
    """A command-line value as the type of the field's current value (JSON for the rest)."""
    if text.lower() in ("none", "null"):
        return None
    if current is None:  # an optional path such as checkpoint
        return text
    kinds = {int: "an integer", float: "a number", str: "a string"}
    try:
        return type(current)(text) if type(current) in kinds else json.loads(text)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}={text}: {text!r} is not {kinds.get(type(current), 'valid JSON')}") from e


def _numbers_read_as_text(values: dict) -> dict:
    """Float fields given as text become numbers: YAML 1.1 reads `1e-4` (no dot) as a string."""
    floats = {f.name for f in dataclasses.fields(TrainConfig) if str(f.type) == "float"}
    out = dict(values)
    for name in floats & set(values):
        if isinstance(values[name], str):
            with contextlib.suppress(ValueError):
                out[name] = float(values[name])
    return out


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML or JSON file of fields (or none), then applies `key=value` overrides
    (`mesh.fsdp=8` sets one mesh axis). Unknown fields are an error that names them."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no such config file: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # yaml and json raise their own error types
            raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        if key.startswith("mesh."):
            mesh = values.get("mesh", defaults.mesh)
            values["mesh"] = {**(mesh if isinstance(mesh, dict) else {}), key[5:]: _parse_value(key, text, 1)}
            continue
        if key not in fields:
            raise ConfigError(f"unknown config field {key!r}; known: {', '.join(sorted(fields))}")
        values[key] = _parse_value(key, text, values.get(key, getattr(defaults, key)))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; known: {', '.join(sorted(fields))}")
    values = _numbers_read_as_text(values)
    if "skip_blocks" in values and isinstance(values["skip_blocks"], (list, type(None))):
        values["skip_blocks"] = tuple(values["skip_blocks"] or ())
    if isinstance(values.get("mesh"), dict):
        values["mesh"] = {**defaults.mesh, **values["mesh"]}
    return TrainConfig(**values)
