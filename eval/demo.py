"""`edit-jax demo`: does E-DiT keep quality while cutting compute, on real images, against the
baselines at equal FLOPs? Every stage uses the project's own model, trainer and sampler.

  1. data     real digits (eval/real_data.py) split into train / validation / test; the train
              part written as a training dataset (ArrayRecord)
  2. judge    a classifier fitted on the train part (eval/judge.py), fixed before any generation
  3. dense    a small FLUX-architecture DiT trained dense (`trainable=base`), its MLP channels
              ordered by importance
  4. routers  per gate budget rho_g: E-DiT routers on the frozen base (`routers`), and routers
              with the base fine-tuned (`routers+base`); learned reuse: routers on the frozen base
              whose closed blocks reuse their last residual, trained on rollouts (`closed=reuse`),
              and their average map as one per-step reuse schedule for every sample
  5. static   blocks pruned by validation loss, as many as matches each E-DiT run's FLOPs,
              fine-tuned for the same number of steps (`skip_blocks`)
  5b. caches  the training-free caches users pick, on the dense model at each E-DiT run's FLOPs:
              the periodic block cache alone, diffusers' first-block cache (per sample) and
              MagCache (ratios calibrated on the same samples' dense run)
  6. sample   every method from the same noise for every test label; judged by class accuracy,
              Frechet distance to the real test images (the judge's features), PSNR / SSIM to
              dense; FLOPs per sample (routers counted) and warm wall-clock

OUT/results.json and OUT/results.md hold the table; OUT/quality_vs_flops.png, OUT/fd_vs_flops.png,
OUT/reuse_vs_caches_fd.png and _psnr.png (learned reuse against the caches alone), OUT/router_map.png
and OUT/samples/*.png the pictures. Trained checkpoints stay in OUT/runs and a
rerun with the same settings reuses them, and an interrupted run resumes where its training stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import edit_jax
from edit_jax.elastic.channel_order import order_mlp_channels
from edit_jax.checkpoint import is_checkpoint, load_routers, resolve, save, step_schedule
from edit_jax.config import FluxConfig, config_to_dict
from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import FirstBlockCache, MagCache, TaylorSeer, describe
from edit_jax.sampling.calibration import calibrate_mag_ratios
from edit_jax.elastic.flops import base_flops, layer_flops
from edit_jax.sampling.latents import unpack_latents
from edit_jax.models.registry import build_model, split_static
from edit_jax.sampling.sampler import SamplerConfig
from edit_jax.sampling.step_schedule import ScheduleDecisions, learned_schedule
from edit_jax.eval import baselines, real_data
from edit_jax.eval.judge import Judge
from edit_jax.eval.metrics import json_number, psnr, ssim
from edit_jax.eval.pictures import block_groups, plot_quality_vs_flops, plot_router_map, plot_sample_grid
from edit_jax.eval.sampling_eval import run_method
from edit_jax.train.config import GATE_BUDGETS, RHO_SCHEDULES, ROLLOUT_LOSSES, TARGETS, TrainConfig
from edit_jax.train.data import shared_inputs
from edit_jax.train.dataset import pack
from edit_jax.train.loop import train


class DemoError(ValueError):
    """Demo settings that cannot be used (a bad --set)."""


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's result depends on."""

    dataset: str = "digits"
    patch: int = 1  # pixels folded into channels per side (real_data.to_latents)
    validation_fraction: float = 0.1  # of the train part: chooses the statically pruned blocks
    test_fraction: float = 0.2
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    router_hidden: int = 32
    batch_size: int = 32
    dense_steps: int = 700
    dense_learning_rate: float = 1e-3
    router_steps: int = 150  # routers, routers + base, and the static pruning fine-tune alike
    router_learning_rate: float = 1e-3
    schedule_learning_rate: float = 0.05  # the learned step schedule's logits (one number per step and block)
    finetune_learning_rate: float = 3e-4
    rho_g: tuple = (0.5,)
    cache_budgets: tuple = ()  # FLOPs fractions of dense at which the training-free caches also run alone
    rho_w: float = 0.75
    gate_budget: str = "hard"  # the trainer's: the budget reads the hard straight-through gate or the soft p
    rho_schedule: str = "constant"  # "linear": rho_g(s) from rho_g + rho_spread (clean) to rho_g - rho_spread (noise)
    rho_spread: float = 0.2
    router_target: str = "data"  # routers on the frozen base: "data" (v = noise - x0) or "teacher" (dense velocity)
    sample_steps: int = 12
    eval_samples: int = 200  # test images judged (the first of the test split); 0: all
    timing_repeats: int = 2
    timing_rows: int = 0  # samples timed per run: 1 (one sample alone, one more compile per method) or 0 (the whole batch)
    threshold_runs: int = 4  # sampling runs that search the first-block cache's threshold for a FLOPs target
    reuse_max: int = 2  # learned reuse: reuses in a row before a block computes anyway
    reuse_order: int = 0  # learned reuse: 0 the stored residual, 1 extrapolated along its change per step
    rollout_steps: int = 3  # learned reuse: steps per training window (cut from the sample_steps schedule)
    rollout_loss: str = "velocity"  # learned reuse: each step's velocity, or the window's end point ("final")
    schedule_init_interval: int = 0  # the learned schedule starts with every block open (0) or from TaylorSeer's map at k
    seed: int = 0

    def __post_init__(self):
        """Checked before anything runs: a bad --set fails now, not after minutes of training."""
        choices = {"dataset": real_data.DATASETS, "gate_budget": GATE_BUDGETS, "rho_schedule": RHO_SCHEDULES,
                   "router_target": TARGETS, "timing_rows": (0, 1), "reuse_order": (0, 1),
                   "rollout_loss": ROLLOUT_LOSSES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise DemoError(f"{name}={getattr(self, name)!r} is not one of {tuple(allowed)}")
        limits = {1: ("patch", "num_attention_heads", "attention_head_dim", "router_hidden", "batch_size", "dense_steps",
                      "router_steps", "sample_steps", "timing_repeats", "rollout_steps"),
                  0: ("num_layers", "num_single_layers", "eval_samples", "seed", "threshold_runs", "reuse_max",
                      "schedule_init_interval")}
        for low, names in limits.items():
            for name in names:
                if getattr(self, name) < low:
                    raise DemoError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.num_layers + self.num_single_layers < 1:
            raise DemoError("the demo's model needs at least one block (num_layers + num_single_layers >= 1)")
        for name in ("dense_learning_rate", "router_learning_rate", "finetune_learning_rate", "schedule_learning_rate"):
            if not getattr(self, name) > 0:
                raise DemoError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("validation_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise DemoError(f"{name}={getattr(self, name)} must be in (0, 1)")
        for name, value in ([("rho_w", self.rho_w), ("rho_spread", self.rho_spread)] + [("rho_g", r) for r in self.rho_g]
                            + [("cache_budgets", b) for b in self.cache_budgets]):
            if not 0 <= value <= 1:
                raise DemoError(f"{name}={value} must be in [0, 1]")

    def model_config(self, channels: int) -> FluxConfig:
        quarter = 2 * round(3 * self.attention_head_dim / 16)
        return FluxConfig(num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                          attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
                          joint_attention_dim=16, pooled_projection_dim=16, in_channels=4 * channels,
                          axes_dims_rope=(self.attention_head_dim - 2 * quarter, quarter, quarter),
                          router_hidden=self.router_hidden, guidance_embeds=False)


SETTINGS = {
    # 8x8 digits, 6 blocks: the README's first command, a few minutes on 2 CPU cores
    "default": DemoSettings(),
    # 28x28 MNIST (4x4 pixels a channel group, 2x2 groups a token: 16 tokens), 10 blocks, a budget sweep: `--full`
    "full": DemoSettings(dataset="mnist", patch=4, num_layers=2, num_single_layers=8, dense_steps=4000,
                         router_steps=600, rho_g=(0.7, 0.5, 0.35), sample_steps=20, eval_samples=0, timing_rows=1,
                         timing_repeats=3, cache_budgets=(0.3, 0.2)),
    # seconds: the test suite's end-to-end run
    "tiny": DemoSettings(num_layers=1, num_single_layers=2, num_attention_heads=2, router_hidden=8, batch_size=16,
                         dense_steps=6, router_steps=3, sample_steps=3, eval_samples=20, timing_repeats=1,
                         threshold_runs=2, rollout_steps=2, cache_budgets=(0.5,)),
}


_START = time.perf_counter()


def digest(value) -> str:
    """6 hex digits naming what a stage's output depends on: settings that differ never share a folder."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:6]


def with_overrides(settings: DemoSettings, overrides: list[str]) -> DemoSettings:
    """settings with `key=value` changes (values as JSON, else strings), e.g. rho_g=[0.6,0.4]."""
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise DemoError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        current = getattr(settings, key)
        if isinstance(current, tuple):
            items = value if isinstance(value, list) else [value]
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                raise DemoError(f"--set {item!r}: {key} takes a tuple of numbers, e.g. {key}=[0.6,0.4]")
            changes[key] = tuple(float(v) for v in items)
            continue
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(current):
            raise DemoError(f"--set {item!r}: {key} takes a {type(current).__name__}")
        changes[key] = value
    return dataclasses.replace(settings, **changes)


EXPECTED = {"default": "3.5 to 4.5 minutes", "full": "about 30 minutes", "tiny": "about a minute"}  # on 2 CPU cores


def log(message: str) -> None:
    print(f"demo [{time.perf_counter() - _START:6.1f} s]: {message}", file=sys.stderr, flush=True)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pruned_loss(model, static: tuple, params: dict, arrays: dict, target: jax.Array, run: jax.Array) -> jax.Array:
    """The flow loss (mean squared error to `target`) with only the blocks where run [L] is True,
    at full width: one compiled program for every run pattern, every demo in a process."""
    full = len(model.config.width_buckets) - 1
    v, _ = model.apply({"params": params}, **arrays, **dict(static), elastic=ElasticConfig(mode="forced"),
                       decisions={"run": run, "bucket": jnp.full(run.shape, full, jnp.int32)})
    return jnp.mean(jnp.square(v - target))


class Demo:
    def __init__(self, settings: DemoSettings, out: Path, progress: bool = True):
        self.s, self.out, self.progress = settings, resolve(out), progress
        self.samples, self.bar = [], None  # the judged methods' images; run_demo's progress bar

    @classmethod
    def prepared(cls, out: Path, overrides: list[str], settings: str = "default") -> Demo:
        """The demo `edit-jax demo --settings SETTINGS --set OVERRIDES` ran in OUT, with its data,
        judge and dense model ready (reused), for a script that samples and judges more methods
        (`judge_run`) beside that run's table."""
        demo = cls(with_overrides(SETTINGS[settings], overrides), out, progress=False)
        demo.prepare_data()
        demo.fit_judge()
        demo.train_dense()
        return demo

    def judge_run(self, name: str, noise, cond: dict, sampler: SamplerConfig, **method) -> dict:
        """Samples the noise with a method, timed on 2 rows once, and judges it (dense first: the
        others' PSNR and SSIM are read against its images); returns the method's row.

        Args:
          name: the method's row name ("dense" for the reference). noise: [B, N, C] packed noise of
            the test labels (`conditions`). cond: their conditions. sampler: the sampler's config.
          **method: `run_method`'s routers, elastic, decisions.
        """
        latents, stats, _ = run_method(self.model, self.base, noise, cond, sampler, repeats=1, timing_rows=2, **method)
        if name == "dense":
            self.dense_images = self.images(latents)
        return self.judge_method(name, latents, stats)

    # ---- 1. data ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        s = self.s
        images, labels = real_data.load_images(s.dataset)
        train, self.test = real_data.split(images, labels, s.test_fraction, s.seed)
        self.train, self.validation = real_data.split(*train, s.validation_fraction, s.seed + 1)
        if s.eval_samples:
            self.test = (self.test[0][: s.eval_samples], self.test[1][: s.eval_samples])
        self.image_size = images.shape[1:]
        channels, lh, lw = real_data.latent_shape(self.image_size, s.patch)
        self.grid = (lh // 2, lw // 2)
        self.config = s.model_config(channels)
        self.model = build_model(self.config)
        path = self.out / "data" / f"train-{digest([s.dataset, s.patch, s.validation_fraction, s.test_fraction, s.seed])}"
        self.train_data = path
        if not (path / "manifest.json").is_file():
            real_data.write_training_set(path, *self.train, s.patch, 16, 16)
        log(f"{s.dataset}: {len(self.train[1])} train, {len(self.validation[1])} validation, {len(self.test[1])} test "
            f"images of {self.image_size[0]}x{self.image_size[1]} -> {self.grid[0] * self.grid[1]} tokens of "
            f"{self.config.in_channels} channels")

    # ---- 2. judge ----------------------------------------------------------------------------
    def fit_judge(self) -> dict:
        self.judge = Judge(seed=self.s.seed).fit(*self.train)
        reference = self.train[0][: len(self.test[0])]
        self.judge_summary = {
            "classifier": "scikit-learn MLPClassifier, 128 hidden units, on pixels",
            "test_accuracy": self.judge.accuracy(*self.test),
            "frechet_floor_real_vs_real": self.judge.frechet_distance(reference, self.test[0]),
        }
        log(f"judge: test accuracy {self.judge_summary['test_accuracy']:.3f}, Frechet distance real train vs real "
            f"test (the floor) {self.judge_summary['frechet_floor_real_vs_real']:.2f}")
        return self.judge_summary

    # ---- 3-5. training, each run reused when its config is unchanged -------------------------
    def train_run(self, name: str, **fields) -> Path:
        s = self.s
        config = TrainConfig(data=str(self.train_data), batch_size=s.batch_size, seed=s.seed, log_every=25,
                             warmup_steps=20, noise_sampler="pipeline", mesh={"data": 1, "fsdp": -1, "tensor": 1},
                             param_dtype="float32", dtype="float32", **fields)  # the figures of RESULTS.md, anywhere
        name = f"{name}-{digest({k: v for k, v in config.to_dict().items() if k != 'run_dir'})}"
        config = dataclasses.replace(config, save_every=config.steps, keep=1, run_dir=str(self.out / "runs" / name))
        final = Path(config.run_dir) / "edit-jax"
        if is_checkpoint(final):
            log(f"{name}: reusing {final}")
            return final
        log(f"{name}: training {config.steps} steps ({config.trainable})")
        train(config, progress=self.progress, describe_setup=False)
        return final

    def train_dense(self) -> Path:
        init = self.out / "runs" / f"init-{digest([config_to_dict(self.config), self.s.seed])}"
        if not is_checkpoint(init):
            save(init, self.config, edit_jax.init_params(self.config, seed=self.s.seed), overwrite=True)
        dense = self.train_run("dense", checkpoint=str(init), trainable="base", steps=self.s.dense_steps,
                               learning_rate=self.s.dense_learning_rate)
        ordered = dense.parent.with_name(dense.parent.name.replace("dense", "dense-ordered"))
        if not is_checkpoint(ordered):
            params = edit_jax.load(dense)[1]
            params, _ = order_mlp_channels(self.config, params, [self.model_inputs(self.train, 64, i, noisy=False) for i in range(4)])
            save(ordered, self.config, params, overwrite=True)
        self.base = edit_jax.load(ordered)[1]
        self.ordered = ordered
        return ordered

    def model_inputs(self, split, count: int, seed: int, noisy: bool = True) -> dict:
        """Model inputs of `count` images of a split at random noise levels (calibration, validation).

        Args:
          split: (images, labels). count: images. seed: of the choice and noise. noisy: noise the
            latents to random levels (else clean).
        """
        rng = np.random.default_rng(self.s.seed + 100 + seed)
        pick = rng.choice(len(split[1]), size=min(count, len(split[1])), replace=False)

        x0 = pack(real_data.to_latents(split[0][pick], self.s.patch))
        s = rng.uniform(0.02, 0.98, size=len(pick)).astype(np.float32)
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        x_t = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        cond = real_data.label_conditions(split[1][pick], 16, 16)
        inputs = {"hidden_states": jnp.asarray(x_t), "timestep": jnp.asarray(s),
                  "encoder_hidden_states": jnp.asarray(cond["prompt_embeds"]),
                  "pooled_projections": jnp.asarray(cond["pooled_prompt_embeds"]),
                  **shared_inputs(self.config, *self.grid, 1)}
        inputs["target"] = jnp.asarray(noise - x0)
        return inputs if noisy else {k: v for k, v in inputs.items() if k != "target"}

    def prune_order(self) -> list[int]:
        """Static pruning's block order, greedy by the flow loss on validation images."""
        inputs = self.model_inputs(self.validation, 256, 1)
        target = inputs.pop("target")
        arrays, static = split_static(inputs)
        loss = lambda run: float(_pruned_loss(self.model, tuple(static.items()), self.base, arrays, target,  # noqa: E731
                                              jnp.asarray(run)))
        return baselines.greedy_prune_order(loss, self.config.num_blocks)

    # ---- 6. sampling and judging ---------------------------------------------------------------
    def conditions(self) -> tuple[jax.Array, dict]:
        labels = self.test[1]
        cond = real_data.label_conditions(labels, 16, 16)
        noise = jax.random.normal(jax.random.key(self.s.seed + 7),
                                  (len(labels), self.grid[0] * self.grid[1], self.config.in_channels))
        return noise, {"encoder_hidden_states": jnp.asarray(cond["prompt_embeds"]),
                       "pooled_projections": jnp.asarray(cond["pooled_prompt_embeds"]),
                       **shared_inputs(self.config, *self.grid, 1)}

    def images(self, packed: np.ndarray) -> np.ndarray:
        rows, cols = self.grid
        latents = np.asarray(unpack_latents(jnp.asarray(packed), 16 * rows, 16 * cols))
        return real_data.to_images(latents, self.s.patch, self.image_size)

    def first_block_cache_at(self, target: float, noise, cond: dict, sampler: SamplerConfig) -> FirstBlockCache:
        """The per-sample first-block cache whose FLOPs on these samples come nearest `target`
        (`threshold_runs` untimed sampling runs, `baselines.next_threshold`).

        Args:
          target: the FLOPs fraction of dense to match. noise, cond, sampler: the samples' (as
            `edit_jax.sampling.sampler.sample`'s).
        """
        tried, threshold = [], 0.1
        for _ in range(max(self.s.threshold_runs, 1)):
            method = FirstBlockCache(threshold, per_sample=True)
            _, stats, _ = run_method(self.model, self.base, noise, cond, sampler, None,
                                     ElasticConfig(mode="dense", step_cache=method), timing_rows=0)
            tried.append((threshold, stats["flops_vs_dense"]))
            threshold = baselines.next_threshold(tried, target)
        return FirstBlockCache(baselines.closest([(f, t) for t, f in tried], target), per_sample=True)

    def step_caches_at(self, target: float, noise, cond: dict, sampler: SamplerConfig, mag_ratios, timing: dict,
                       **extra) -> list[dict]:
        """The rows of MagCache, the first-block cache (per sample) and TaylorSeer (first order) on
        the dense model, each set to the FLOPs nearest `target`.

        Args:
          target: the FLOPs fraction of dense to match. noise, cond, sampler: the samples' (as
            `edit_jax.sampling.sampler.sample`'s). mag_ratios: MagCache's calibrated ratios.
          timing: run_method's timing arguments. **extra: fields of every row (rho_g or flops_target).
        """
        s, config = self.s, self.config
        table = layer_flops(config, noise.shape[1], 1)
        fixed = float(base_flops(config, noise.shape[1], 1))
        retention = MagCache(tuple(mag_ratios), num_inference_steps=s.sample_steps).retention_steps
        setting = baselines.closest(baselines.mag_cache_candidates(mag_ratios, table, fixed, retention), target)
        taylor = baselines.closest(baselines.taylor_seer_candidates(s.sample_steps, table, fixed), target)
        methods = [(MAG_CACHE, MagCache(tuple(mag_ratios), num_inference_steps=s.sample_steps, **setting)),
                   (FIRST_BLOCK_CACHE, self.first_block_cache_at(target, noise, cond, sampler)),
                   (TAYLOR_SEER, TaylorSeer(**taylor, max_order=1, factors_dtype="float32"))]
        rows = []
        for name, method in methods:
            latents, stats, _ = run_method(self.model, self.base, noise, cond, sampler, None,
                                           ElasticConfig(mode="dense", step_cache=method), **timing)
            rows.append(self.judge_method(name, latents, stats, **extra, step_cache=describe(method)))
        return rows

    def judge_method(self, name: str, latents: np.ndarray, stats: dict, **extra) -> dict:
        images = self.images(latents)
        row = {"method": name, **extra, **stats, "ms_per_sample": 1000 * stats["wall_clock_s"] / stats["timing_rows"],
               "class_accuracy": self.judge.accuracy(images, self.test[1]),
               "frechet_distance": self.judge.frechet_distance(images, self.test[0])}
        if name != "dense":
            row["psnr_vs_dense_db"] = json_number(psnr(self.dense_images, images))
            row["ssim_vs_dense"] = ssim(self.dense_images, images)
        where = f" rho_g={extra['rho_g']}" if "rho_g" in extra else ""
        self.samples.append((f"{name}{where} at {stats['flops_vs_dense']:.2f} of dense FLOPs", images))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(name)
        return row


def run_demo(settings: DemoSettings, out: Path, progress: bool = True) -> dict:
    """Runs (or resumes) the whole demo; returns the summary also written to OUT/results.json."""
    start = time.perf_counter()
    demo = Demo(settings, out, progress)
    demo.out.mkdir(parents=True, exist_ok=True)
    demo.prepare_data()
    judge = demo.fit_judge()
    demo.train_dense()
    config, model, s = demo.config, demo.model, settings

    edit_runs = {}
    rollout = dict(objective="rollout", closed="reuse", reuse_max=s.reuse_max, reuse_order=s.reuse_order,
                   rollout_steps=min(s.rollout_steps, s.sample_steps), rollout_schedule=s.sample_steps,
                   rollout_loss=s.rollout_loss)
    for rho in s.rho_g:
        common = dict(checkpoint=str(demo.ordered), routers="fresh", rho_g=rho, rho_w=s.rho_w,
                      gate_budget=s.gate_budget, steps=s.router_steps, rho_schedule=s.rho_schedule,
                      rho_high=min(rho + s.rho_spread, 1.0), rho_low=max(rho - s.rho_spread, 0.0))
        edit_runs[rho] = {
            "routers": demo.train_run(f"edit-rho{rho}", trainable="routers", learning_rate=s.router_learning_rate,
                                      target=s.router_target, **common),
            "routers+base": demo.train_run(f"edit-ft-rho{rho}", trainable="routers+base",
                                           learning_rate=s.finetune_learning_rate, **common),
            "reuse": demo.train_run(f"reuse-rho{rho}", trainable="routers", learning_rate=s.router_learning_rate,
                                    **rollout, **common),
            "schedule": demo.train_run(f"schedule-rho{rho}", trainable="schedule", learning_rate=s.schedule_learning_rate,
                                       schedule_init_interval=s.schedule_init_interval, **rollout, **common),
        }
    log("static pruning: ordering blocks by validation loss")
    order = demo.prune_order()

    noise, cond = demo.conditions()
    sampler = SamplerConfig(num_steps=s.sample_steps)
    num_img, fixed = noise.shape[1], float(base_flops(config, noise.shape[1], 1))
    table = layer_flops(config, num_img, 1)
    timing = dict(timing_rows=s.timing_rows or len(demo.test[1]), repeats=s.timing_repeats)
    infer = ElasticConfig(mode="infer", decision="sample")
    cached = dataclasses.replace(infer, cache=True, cache_start=s.sample_steps // 3, delta_margin=0.05, max_reuse=2)
    demo.samples, rows = [], []

    from tqdm.auto import tqdm

    demo.bar = tqdm(total=1 + 13 * len(s.rho_g) + 4 * len(s.cache_budgets), desc="sample and judge", unit="method", disable=not progress)
    log("sampling: dense")
    latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, **timing)
    demo.dense_images = demo.images(latents)
    rows.append(demo.judge_method("dense", latents, stats))
    log("calibrating MagCache on the dense run")
    mag_ratios = calibrate_mag_ratios(model, demo.base, noise, cond, sampler)
    router_map = None
    for rho, runs in edit_runs.items():
        ft_params = edit_jax.load(runs["routers+base"])[1]
        ft_routers = load_routers(runs["routers+base"])
        log(f"sampling at rho_g={rho}: E-DiT (routers), E-DiT (routers+base) with and without the cache, learned reuse")
        latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, load_routers(runs["routers"]), infer, **timing)
        rows.append(demo.judge_method("E-DiT (routers)", latents, stats, rho_g=rho))
        latents, edit_stats, records = run_method(model, ft_params, noise, cond, sampler, ft_routers, infer, **timing)
        rows.append(demo.judge_method("E-DiT (routers+base)", latents, edit_stats, rho_g=rho))
        latents, cached_stats, cache_records = run_method(model, ft_params, noise, cond, sampler, ft_routers, cached,
                                                          **timing)
        rows.append(demo.judge_method("E-DiT (routers+base) + cache", latents, cached_stats, rho_g=rho))
        reuse = dataclasses.replace(infer, block_cache=LearnedReuse(s.reuse_max, s.reuse_order))
        latents, reuse_stats, reuse_records = run_method(model, demo.base, noise, cond, sampler,
                                                         load_routers(runs["reuse"]), reuse, **timing)
        rows.append(demo.judge_method(LEARNED_REUSE, latents, reuse_stats, rho_g=rho))
        # the same routers' average map as one schedule for every sample: what per-sample decisions are worth
        computed = np.asarray(reuse_records["executed"], np.float64)  # [S, B, L]
        full = np.full(computed.shape[::2], len(config.width_buckets) - 1)
        schedule = baselines.step_schedule(computed.mean(axis=1), full, table, fixed, reuse_stats["flops_vs_dense"])
        reused = ElasticConfig(mode="forced", block_cache=LearnedReuse(s.reuse_max, s.reuse_order))
        latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, None, reused,
                                       decisions=ScheduleDecisions(jnp.asarray(schedule), jnp.asarray(full, jnp.int32)),
                                       **timing)
        rows.append(demo.judge_method(REUSE_SCHEDULE, latents, stats, rho_g=rho))
        learned, decisions = learned_schedule(step_schedule(runs["schedule"]), s.sample_steps, len(config.width_buckets))
        latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, None, learned, decisions=decisions, **timing)
        rows.append(demo.judge_method(LEARNED_SCHEDULE, latents, stats, rho_g=rho))
        if router_map is None:
            router_map = (rho, jax.tree.map(np.asarray, cache_records))
        target = edit_stats["flops_vs_dense"]

        executed = np.asarray(records["executed"], np.float64)  # [S, B, L]
        buckets = np.asarray(records["bucket"])
        common_bucket = np.apply_along_axis(lambda b: np.bincount(b, minlength=4).argmax(), 1,
                                            buckets.transpose(0, 2, 1).reshape(-1, buckets.shape[1]))
        common_bucket = common_bucket.reshape(executed.shape[0], executed.shape[2])
        schedule = baselines.step_schedule(executed.mean(axis=1), common_bucket, table, fixed, target)
        run_table, bucket_table = jnp.asarray(schedule), jnp.asarray(common_bucket, jnp.int32)
        log(f"sampling at rho_g={rho}: per-step schedule, static pruning, cache alone (matched to {target:.2f} of dense)")
        latents, stats, _ = run_method(model, ft_params, noise, cond, sampler, None, ElasticConfig(mode="forced"),
                                       decisions=ScheduleDecisions(run_table, bucket_table), **timing)
        rows.append(demo.judge_method("per-step schedule", latents, stats, rho_g=rho))

        skipped = sorted(baselines.static_for_target(order, table, fixed, target))
        forced = {"run": jnp.asarray(~np.isin(np.arange(len(table)), skipped)),
                  "bucket": jnp.full((len(table),), len(config.width_buckets) - 1, jnp.int32)}
        latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, None, ElasticConfig(mode="forced"),
                                       decisions=forced, **timing)
        rows.append(demo.judge_method("static pruning", latents, stats, rho_g=rho, skipped_blocks=skipped))
        static_params = demo.base  # nothing pruned: the dense model itself
        if skipped:
            static_run = demo.train_run(f"static-{'-'.join(map(str, skipped))}", trainable="base",
                                        checkpoint=str(demo.ordered), skip_blocks=tuple(skipped),
                                        steps=s.router_steps, learning_rate=s.finetune_learning_rate)
            static_params = edit_jax.load(static_run)[1]
        latents, stats, _ = run_method(model, static_params, noise, cond, sampler, None,
                                       ElasticConfig(mode="forced"), decisions=forced, **timing)
        rows.append(demo.judge_method("static pruning + fine-tune", latents, stats, rho_g=rho, skipped_blocks=skipped))

        # the cache alone, matched to E-DiT with and without the cache
        borderline = {"p": jnp.full((len(table),), 0.5 + 1e-3), "bucket": forced["bucket"]}
        candidates = baselines.cache_candidates(s.sample_steps, table, fixed)
        for matched, name in ((target, CACHE_AT_EDIT), (cached_stats["flops_vs_dense"], CACHE_AT_EDIT_CACHE)):
            setting = baselines.closest(candidates, matched)
            alone = ElasticConfig(mode="forced", cache=True, delta_margin=0.01, **setting)
            latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, None, alone, decisions=borderline,
                                           **timing)
            rows.append(demo.judge_method(name, latents, stats, rho_g=rho, cache=setting))

        target = reuse_stats["flops_vs_dense"]
        log(f"sampling at rho_g={rho}: MagCache, the first-block cache and TaylorSeer (matched to {target:.2f} of dense)")
        rows += demo.step_caches_at(target, noise, cond, sampler, mag_ratios, timing, rho_g=rho)

    for target in s.cache_budgets:  # the caches alone further down than any router budget reached
        log(f"sampling the training-free caches at {target:.2f} of dense's FLOPs")
        candidates = baselines.cache_candidates(s.sample_steps, table, fixed)
        setting = baselines.closest(candidates, target)
        alone = ElasticConfig(mode="forced", cache=True, delta_margin=0.01, **setting)
        borderline = {"p": jnp.full((len(table),), 0.5 + 1e-3),
                      "bucket": jnp.full((len(table),), len(config.width_buckets) - 1, jnp.int32)}
        latents, stats, _ = run_method(model, demo.base, noise, cond, sampler, None, alone, decisions=borderline,
                                       **timing)
        rows.append(demo.judge_method(CACHE_ALONE, latents, stats, flops_target=target, cache=setting))
        rows += demo.step_caches_at(target, noise, cond, sampler, mag_ratios, timing, flops_target=target)

    demo.bar.close()
    summary = write_results(demo, rows, judge, order, router_map, time.perf_counter() - start)
    return summary


# the cache alone twice, its period matched to each E-DiT row's FLOPs: two methods, not one trend
CACHE_AT_EDIT, CACHE_AT_EDIT_CACHE = "cache alone, at E-DiT's FLOPs", "cache alone, at E-DiT + cache's FLOPs"
# the caches users pick: at each budget matched to the learned-reuse routers' FLOPs (the comparison issue
# 34 asks for), and alone at each of `cache_budgets`; one curve each
MAG_CACHE, FIRST_BLOCK_CACHE, TAYLOR_SEER = "MagCache", "first-block cache (per sample)", "TaylorSeer (first order)"
CACHE_ALONE = "cache alone (periodic)"
LEARNED_REUSE, REUSE_SCHEDULE = "learned reuse (routers)", "per-step reuse schedule"
LEARNED_SCHEDULE = "learned per-step reuse schedule (Learning-to-Cache)"

COLUMNS = [("method", "method", "{}"), ("rho_g", "rho_g", "{}"), ("flops_target", "FLOPs target", "{}"), ("blocks_executed", "blocks run", "{:.2f}"),
           ("flops_vs_dense", "FLOPs vs dense", "{:.3f}"), ("ms_per_sample", "wall-clock (ms per sample)", "{:.2f}"),
           ("class_accuracy", "class accuracy", "{:.3f}"), ("frechet_distance", "Frechet distance", "{:.2f}"),
           ("psnr_vs_dense_db", "PSNR vs dense (dB)", "{:.1f}"), ("ssim_vs_dense", "SSIM vs dense", "{:.3f}")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key, "")
            cells.append(fmt.format(value) if isinstance(value, (int, float)) and value != "" else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(demo: Demo, rows: list[dict], judge: dict, order: list[int], router_map, seconds: float) -> dict:
    """results.json, results.md and the quality pictures in the demo's folder; returns the summary.

    Args:
      demo: the run. rows: one per method and budget. judge: the judge's own scores. order:
        the static-pruning order. router_map: the picture's path. seconds: the run's wall-clock.
    """
    out, s = demo.out, demo.s
    dense = rows[0]
    curves_acc, curves_fd, curves_psnr = {}, {}, {}
    for row in rows[1:]:
        curves_acc.setdefault(row["method"], []).append((row["flops_vs_dense"], row["class_accuracy"]))
        curves_fd.setdefault(row["method"], []).append((row["flops_vs_dense"], row["frechet_distance"]))
        curves_psnr.setdefault(row["method"], []).append((row["flops_vs_dense"], min(float(row["psnr_vs_dense_db"]), 60.0)))
    what = f"{s.dataset}, {len(demo.test[1])} test labels, {s.sample_steps} steps"
    reuse = [m for m in (LEARNED_REUSE, REUSE_SCHEDULE, LEARNED_SCHEDULE, TAYLOR_SEER, MAG_CACHE, FIRST_BLOCK_CACHE,
                         CACHE_ALONE) if m in curves_fd]  # issue 34's question: learned reuse against the caches
    pictures = [
        plot_quality_vs_flops(out / "quality_vs_flops.png", curves_acc, ylabel="class accuracy (judge)",
                              dense=dense["class_accuracy"], title=f"Class accuracy vs compute ({what})"),
        plot_quality_vs_flops(out / "fd_vs_flops.png", curves_fd, ylabel="Frechet distance to real test images",
                              dense=dense["frechet_distance"], lower_is_better=True,
                              title=f"Frechet distance vs compute ({what}; real-vs-real floor "
                                    f"{judge['frechet_floor_real_vs_real']:.2f})"),
        plot_quality_vs_flops(out / "reuse_vs_caches_fd.png", {m: curves_fd[m] for m in reuse},
                              ylabel="Frechet distance to real test images", dense=dense["frechet_distance"],
                              lower_is_better=True, title=f"Learned reuse against the caches ({what})"),
        plot_quality_vs_flops(out / "reuse_vs_caches_psnr.png", {m: curves_psnr[m] for m in reuse},
                              ylabel="PSNR to dense's own samples (dB, capped at 60)",
                              title=f"Learned reuse against the caches: distance to dense ({what})"),
    ]
    rho, records = router_map
    pictures.append(plot_router_map(out / "router_map.png", records["executed"][:, 0], records["bucket"][:, 0],
                                    records["cache_hit"][:, 0], block_groups=block_groups(demo.config),
                                    title=f"E-DiT (routers+base) + cache, rho_g={rho}: test sample 0 "
                                          f"(label {demo.test[1][0]})"))
    (out / "samples").mkdir(exist_ok=True)
    show = np.concatenate([np.flatnonzero(demo.test[1] == c)[:2] for c in range(real_data.NUM_CLASSES)])
    for index, (name, images) in enumerate(demo.samples):
        slug = "".join(ch if ch.isalnum() or ch in "=." else "-" for ch in name).strip("-")
        pictures.append(plot_sample_grid(out / "samples" / f"{index:02d}-{slug}.png", images[show], demo.test[1][show],
                                         title=f"{name}: samples conditioned on the label above each"))
    summary = {"settings": dataclasses.asdict(s), "judge": judge, "static_prune_order": order,
               "model": {"blocks": len(order) + 1, "tokens": demo.grid[0] * demo.grid[1],
                         "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(demo.base)))},
               "methods": rows, "seconds": round(seconds, 1), "backend": jax.default_backend(),
               "pictures": [str(p) for p in pictures]}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_plain) + "\n")
    timed = "one sample alone" if s.timing_rows == 1 else "in the batch of all test labels (a block runs when any " \
        "sample needs it)"
    (out / "results.md").write_text(
        f"# E-DiT demo: {what}\n\nJudge: test accuracy {judge['test_accuracy']:.3f}, Frechet floor (real vs real) "
        f"{judge['frechet_floor_real_vs_real']:.2f}. FLOPs per sample, routers counted; wall-clock warm, median of "
        f"{s.timing_repeats}, timed {timed}. {seconds / 60:.1f} minutes in all.\n\n{markdown_table(rows)}\n")
    return summary


def _plain(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
