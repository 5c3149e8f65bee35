"""One training step of E-DiT routers (and optionally the base), top to bottom (SPEC section 4).

    x_t = (1 - s) x0 + s noise                       s [B] in [0, 1], noise ~ N(0, 1)
    target = noise - x0 (data) or the dense model's velocity at (x_t, s) (teacher)
    L_flow  = mean((v_pred - target)^2)
    L_gate  = (mean over blocks and batch of gate - rho_g(s))^2, gate = p (soft) or the hard
              straight-through gate 1[p >= tau] + p - stop_gradient(p)
    L_width = (sum_i 1[p_i >= tau] r_i / max(sum_i 1[p_i >= tau], eps) - rho_w)^2, r_i = q_i . S
    L = L_flow + lambda_g L_gate + lambda_w L_width

With objective="rollout" the loss is read along the sampler's own steps instead: a window of
`rollout_steps` consecutive steps of the family's schedule (of `rollout_schedule` steps) starts at
x_(s_k) = (1 - s_k) x0 + s_k noise for a random k, and the routed model steps through it by Euler,
carrying its reuse cache (closed="reuse"). Each step's L_flow compares its velocity with the dense
model's at the same point (the dense velocity and the next point carry no gradient), its budget
terms read that step's gates, and the window's mean is the loss. Gradients stop between steps: a
step's routers are trained for the cache and the point earlier steps left them, not for moving
those; memory is one step's (each step's gradient is taken inside the window's scan).
With rollout_loss="final" the dense model also steps through the window from the same start, the
loss is the error of the window's mean velocity, mean(((x_end - x_end_dense) / (t_end - t_start))^2),
plus the steps' mean budget terms, and the gradient runs through every step (each rematerialised in
the backward pass): a step's routers are trained for what their reuse does to every later step.
With trainable="schedule" no router runs: step k's p is sigmoid(logits[k]) [L] of a learned table
over the schedule's steps and the blocks, the same for every sample (Learning-to-Cache, arXiv
2406.01733), trained by the same loss through the same straight-through gate.

The step's randomness is jax.random.fold_in(key(seed), step): a resumed run draws the same noise.
s is always the noise level; a family whose pipeline runs time the other way (Hunyuan3D-2: noise
at t = 0) reads t = 1 - s and predicts d x / d t = x0 - noise (`model_time`, `data_target`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from edit_jax.config import ConfigError
from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.models.registry import init_cache
from edit_jax.sampling.sampler import default_scheduler
from edit_jax.sampling.schedules import flow_match_schedule, time_shift
from edit_jax.train.config import TrainConfig

EPS = 1e-6


def noise_levels(config: TrainConfig, key: jax.Array, batch: int, model_config=None, num_img: int = 0) -> jax.Array:
    """s [B] in [0, 1]: uniform; logit-normal; a uniform s shifted towards noise by a fixed
    `shift` (s' = shift s / (1 + (shift - 1) s)); or "pipeline": shifted as the model's own
    pipeline shifts its sampling schedule for an image of num_img tokens (FLUX.1-dev and
    Qwen-Image: mu linear in the token count, s' = e^mu / (e^mu + 1/s - 1)).

    Args:
      config: the run's TrainConfig. key: a jax.random key. batch: B. model_config: the model
        config (its pipeline's shift). num_img: image tokens per sample.
    """
    if config.noise_sampler == "logit_normal":
        return jax.nn.sigmoid(config.logit_mean + config.logit_std * jax.random.normal(key, (batch,)))
    s = jax.random.uniform(key, (batch,))
    if config.noise_sampler == "shift":
        s = config.shift * s / (1 + (config.shift - 1) * s)
    elif config.noise_sampler == "pipeline":
        s = pipeline_shift(model_config, num_img, s)
    return s


def pipeline_shift(model_config, num_img: int, s: jax.Array) -> jax.Array:
    """The time shift the model family's pipeline applies to its sigmas (edit_jax.sampling.schedules)."""
    return time_shift(default_scheduler(model_config), num_img, jnp.maximum(s, 1e-6))


def gate_budget(config: TrainConfig, s: jax.Array) -> jax.Array:
    """rho_g(s) [B]: constant, or linear from rho_high (s = 0, clean) to rho_low (s = 1, noise)."""
    if config.rho_schedule == "constant":
        return jnp.full_like(s, config.rho_g)
    return config.rho_high + (config.rho_low - config.rho_high) * s


def edit_loss(config: TrainConfig, v_pred, target, aux: dict, s, width_buckets) -> tuple[jax.Array, dict]:
    """SPEC 4's loss from the model's train-mode aux (p [B, L], q [B, L, K]); returns (loss,
    metrics: each term, the open rate and mean width per block [L]).

    Args:
      config: the run's TrainConfig. v_pred, target: [B, N, C] velocities. aux: the model's
        train-mode record. s: [B] noise levels. width_buckets: the buckets' shares of the MLP.
    """
    flow = jnp.mean(jnp.square(v_pred.astype(jnp.float32) - target.astype(jnp.float32)))
    budget, metrics = budget_loss(config, aux, s, width_buckets)
    loss = flow + budget
    return loss, {"loss": loss, "flow_loss": flow, **metrics}


def budget_loss(config: TrainConfig, aux: dict, s, width_buckets) -> tuple[jax.Array, dict]:
    """lambda_g L_gate + lambda_w L_width of one step (SPEC 4) and its metrics (each term, the open
    rate and mean width per block [L]).

    Args:
      config: the run's TrainConfig. aux: the model's train-mode record (p [B, L], q [B, L, K]).
        s: [B] noise levels. width_buckets: the buckets' shares of the MLP.
    """
    p, q = aux["p"], aux["q"]
    hard = (p >= config.tau).astype(jnp.float32)
    gate = hard + p - jax.lax.stop_gradient(p) if config.gate_budget == "hard" else p
    gate_gap = jnp.mean(jnp.mean(gate, axis=1) - gate_budget(config, s))  # the batch mean, as SPEC 4
    gate_loss = jnp.square(gate_gap)
    r = q @ jnp.asarray(width_buckets, jnp.float32)  # [B, L] expected width fraction
    width_loss = jnp.square(jnp.sum(hard * r) / jnp.maximum(jnp.sum(hard), EPS) - config.rho_w)
    bucket_width = jnp.asarray(width_buckets, jnp.float32)[jnp.argmax(q, axis=-1)]
    metrics = {
        "gate_loss": gate_loss, "width_loss": width_loss,
        "open_rate": jnp.mean(hard), "open_rate_per_block": jnp.mean(hard, axis=0),
        "mean_p": jnp.mean(p),
        "mean_width_per_block": jnp.sum(hard * bucket_width, axis=0) / jnp.maximum(jnp.sum(hard, axis=0), 1.0),
    }
    return config.lambda_g * gate_loss + config.lambda_w * width_loss, metrics


def noise_at_zero(model_config) -> bool:
    """Whether the family's pipeline runs time from noise at 0 to data at 1 (Hunyuan3D-2)."""
    return default_scheduler(model_config).noise_at_zero


def model_time(model_config, s: jax.Array) -> jax.Array:
    """The timestep [B] the model reads at noise levels s [B]: s, or 1 - s (`noise_at_zero`)."""
    return 1 - s if noise_at_zero(model_config) else s


def data_target(model_config, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching velocity of x_t = (1 - s) x0 + s noise in the model's own time:
    noise - x0, or x0 - noise where its time runs the other way."""
    return x0 - noise if noise_at_zero(model_config) else noise - x0


def model_conditions(model_config, batch: dict) -> tuple[dict, dict]:
    """(array inputs, static inputs) of the model besides hidden_states and timestep, from a
    batch {"latents" [B, N, C], "encoder_hidden_states" [B, T, D], "pooled_projections" [B, P]
    (FLUX) or "encoder_hidden_states_mask" [B, T] (Qwen-Image), "img_ids"/"img_shapes", ...}."""
    arrays = {k: v for k, v in batch.items() if k not in ("latents", "label", "img_shapes")}
    static = {"img_shapes": batch["img_shapes"]} if "img_shapes" in batch else {}
    return arrays, static


def noisy_batch(config: TrainConfig, model_config, batch: dict, key: jax.Array):
    """(x0, noise, s, x_t, array conditions, static conditions) of a batch: the clean latents,
    the noise and levels s drawn from `key`, and x_t = (1 - s) x0 + s noise.

    Args:
      config: the run's TrainConfig. model_config: the model config. batch: per-sample arrays.
      key: a jax.random key.
    """
    x0 = batch["latents"]
    arrays, static = model_conditions(model_config, batch)
    noise_key, s_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    s = noise_levels(config, s_key, x0.shape[0], model_config, x0.shape[1])
    x_t = ((1 - s)[:, None, None] * x0 + s[:, None, None] * noise).astype(x0.dtype)
    return x0, noise, s, x_t, arrays, static


def make_loss_fn(config: TrainConfig, model) -> Callable:
    """loss_fn(trainable, frozen, batch, key) -> (loss, metrics): trainable {"routers"[, "params"]},
    frozen {"params"} when the base is frozen (no gradient ever reaches it)."""
    model_config = model.config
    elastic = ElasticConfig(mode="train", tau=config.tau)
    if config.trainable == "base":
        return _base_loss_fn(config, model)
    if config.objective == "rollout":
        return _rollout_loss_fn(config, model)

    def loss_fn(trainable, frozen, batch, key):
        params = trainable["params"] if "params" in trainable else jax.lax.stop_gradient(frozen["params"])
        x0, noise, s, x_t, arrays, static = noisy_batch(config, model_config, batch, key)
        t = model_time(model_config, s)
        if config.target == "data":
            target = data_target(model_config, x0, noise)
        else:  # the same base, run dense, at the same noisy input
            target = jax.lax.stop_gradient(model.apply({"params": params}, hidden_states=x_t, timestep=t, **arrays, **static))
        v_pred, aux = model.apply({"params": params, "routers": trainable["routers"]}, hidden_states=x_t, timestep=t,
                                  **arrays, **static, elastic=elastic)
        return edit_loss(config, v_pred, target, aux, s, model_config.width_buckets)

    return loss_fn


SCHEDULE_INIT_P = 0.7  # a fresh schedule opens every block at the p fresh routers start from


def init_schedule(config: TrainConfig, model_config) -> jax.Array:
    """A fresh learned step schedule (trainable="schedule"): logits [rollout_schedule, L], every
    block of every step at p = SCHEDULE_INIT_P; or, with schedule_init_interval k, TaylorSeer's
    compute map at interval k: every block at p = SCHEDULE_INIT_P at the steps it computes, at
    1 - SCHEDULE_INIT_P (closed) at the others."""
    logit = math.log(SCHEDULE_INIT_P / (1 - SCHEDULE_INIT_P))
    shape = (config.rollout_schedule, model_config.num_blocks)
    if not config.schedule_init_interval:
        return jnp.full(shape, logit, jnp.float32)
    taylor_seer = TaylorSeer(cache_interval=config.schedule_init_interval, disable_cache_before_step=1)
    computes = taylor_seer.computes_at(jnp.arange(shape[0]))
    return jnp.broadcast_to(jnp.where(computes, logit, -logit)[:, None], shape).astype(jnp.float32)


def schedule_decisions(model_config, logits: jax.Array, step: jax.Array) -> dict:
    """A learned step schedule's decisions at `step` (for elastic mode "train" or "forced"): {"p"
    [L] = sigmoid(logits[step]), "bucket" [L] the full width}; the schedule decides no widths."""
    full = len(model_config.width_buckets) - 1
    return {"p": jax.nn.sigmoid(logits[step]), "bucket": jnp.full(logits.shape[1:], full, jnp.int32)}


def reuse_method(config: TrainConfig) -> LearnedReuse | None:
    """The block cache a run's routers are trained with (closed="reuse"), or None."""
    return LearnedReuse(config.reuse_max, config.reuse_order) if config.closed == "reuse" else None


def _rollout_loss_fn(config: TrainConfig, model) -> Callable:
    """The rollout objective's value (see the module docstring); trainable {"routers"} or {"schedule"},
    frozen {"params"}."""
    rollout = rollout_value_and_grad(config, model, with_grad=False)
    return lambda trainable, frozen, batch, key: rollout(trainable, frozen, batch, key)[0]


def rollout_value_and_grad(config: TrainConfig, model, with_grad: bool = True) -> Callable:
    """f(trainable, frozen, batch, key) -> ((loss, metrics), gradient with respect to trainable) of
    the rollout objective, as `jax.value_and_grad(loss_fn, has_aux=True)` gives for the others.
    rollout_loss="velocity": gradients stop between steps, so each step's gradient is taken inside
    the window's scan and summed: memory is one step's, whatever the window's length (differentiating
    the scan would keep every step's carry, the whole reuse cache, for the backward pass).
    rollout_loss="final": the gradient runs through the whole window, each step rematerialised in the
    backward pass (memory: one carry per step). with_grad=False: the value, and None for the gradient."""
    if config.rollout_loss == "final":
        final = _final_rollout_value(config, model)
        grad = jax.value_and_grad(final, has_aux=True)

        def value_and_grad(trainable, frozen, batch, key):
            if with_grad:
                return grad(trainable, frozen, batch, key)
            return final(trainable, frozen, batch, key), None

        return value_and_grad

    model_config = model.config
    routed = _routed_step(config, model)
    loss_config = _rollout_loss_config(config)
    learned = _learned(config)

    def value_and_grad(trainable, frozen, batch, key):
        params = jax.lax.stop_gradient(frozen["params"])
        x, cache, start, times, levels, inputs_at = _rollout_window(config, model_config, batch, key)
        rows = x.shape[0]

        def one(carry, i):
            x, cache, grads = carry
            s = jnp.full((rows,), levels[start + i])
            target = jax.lax.stop_gradient(model.apply({"params": params}, **inputs_at(x, start + i)))

            def step_loss(weights):
                v_pred, aux = routed(weights, params, inputs_at(x, start + i), cache, start + i, i)
                loss, metrics = edit_loss(loss_config, v_pred, target, aux, s, model_config.width_buckets)
                metrics["reuse_rate"] = jnp.mean(aux["cache_hit"].astype(jnp.float32))
                return loss, (metrics, v_pred, aux.get("cache"))

            if with_grad:
                (loss, (metrics, v_pred, cache)), step_grads = jax.value_and_grad(step_loss, has_aux=True)(
                    trainable[learned])
                grads = jax.tree.map(jnp.add, grads, {learned: step_grads})
            else:
                loss, (metrics, v_pred, cache) = step_loss(trainable[learned])
            x_next = x + (times[start + i + 1] - times[start + i]) * v_pred.astype(x.dtype)
            return jax.lax.stop_gradient((x_next, cache)) + (grads,), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, trainable) if with_grad else None
        (_, _, grads), (losses, metrics) = jax.lax.scan(one, (x, cache, zeros), jnp.arange(config.rollout_steps))
        value = (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))
        return value, None if grads is None else jax.tree.map(lambda g: g / config.rollout_steps, grads)

    return value_and_grad


def _final_rollout_value(config: TrainConfig, model) -> Callable:
    """f(trainable, frozen, batch, key) -> (loss, metrics) of rollout_loss="final": the routed model
    and the dense model each step through the same window from the same start; the loss is
    mean(((x_end - x_end_dense) / (t_end - t_start))^2), the error of the window's mean velocity,
    plus the mean of the steps' budget terms. flow_loss in the metrics is that first term."""
    model_config = model.config
    routed = _routed_step(config, model)
    loss_config = _rollout_loss_config(config)

    def value(trainable, frozen, batch, key):
        params = jax.lax.stop_gradient(frozen["params"])
        weights = trainable[_learned(config)]
        x, cache, start, times, levels, inputs_at = _rollout_window(config, model_config, batch, key)
        rows = x.shape[0]

        @jax.checkpoint
        def one(carry, i):
            x, x_dense, cache = carry
            dt = times[start + i + 1] - times[start + i]
            v_dense = jax.lax.stop_gradient(model.apply({"params": params}, **inputs_at(x_dense, start + i)))
            v_pred, aux = routed(weights, params, inputs_at(x, start + i), cache, start + i, i)
            budget, metrics = budget_loss(loss_config, aux, jnp.full((rows,), levels[start + i]),
                                          model_config.width_buckets)
            metrics["reuse_rate"] = jnp.mean(aux["cache_hit"].astype(jnp.float32))
            carry = (x + dt * v_pred.astype(x.dtype), x_dense + dt * v_dense.astype(x.dtype), aux.get("cache"))
            return carry, (budget, metrics)

        (x_end, dense_end, _), (budgets, metrics) = jax.lax.scan(one, (x, x, cache), jnp.arange(config.rollout_steps))
        span = times[start + config.rollout_steps] - times[start]
        final = jnp.mean(jnp.square((x_end.astype(jnp.float32) - dense_end.astype(jnp.float32)) / span))
        loss = final + jnp.mean(budgets)
        return loss, {"loss": loss, "flow_loss": final, **jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)}

    return value


def _learned(config: TrainConfig) -> str:
    """The trainable collection a rollout trains: "schedule" or "routers"."""
    return "schedule" if config.trainable == "schedule" else "routers"


def _rollout_loss_config(config: TrainConfig) -> TrainConfig:
    """The config the rollout's loss terms read: a schedule keeps every block at full width, so its
    width term is a constant, left out."""
    return dataclasses.replace(config, lambda_w=0.0) if config.trainable == "schedule" else config


def _routed_step(config: TrainConfig, model) -> Callable:
    """routed(weights, params, inputs, cache, index, step) -> (v_pred, aux): the model at schedule
    step `index` (window step `step`) in train mode, run by the routers or by the learned schedule's
    row `index`, with the reuse cache."""
    elastic = ElasticConfig(mode="train", tau=config.tau, block_cache=reuse_method(config))

    def routed(weights, params, inputs, cache, index, step):
        if config.trainable == "schedule":  # this step's row of the schedule, the same for every sample
            variables, decisions = {"params": params}, schedule_decisions(model.config, weights, index)
        else:
            variables, decisions = {"params": params, "routers": weights}, None
        return model.apply(variables, **inputs, elastic=elastic, decisions=decisions, cache=cache, step=step)

    return routed


def _rollout_window(config: TrainConfig, model_config, batch: dict, key: jax.Array):
    """(x [B, N, C], cache, start, times [S + 1], levels [S + 1], inputs_at) of one rollout window:
    a random start k of the family's schedule of S = rollout_schedule steps, x the batch's latents
    noised to level s_k, an empty reuse cache (None without closed="reuse"), the schedule's model
    times and noise levels, and inputs_at(x, index) the model's inputs at x and schedule step index."""
    x0 = batch["latents"]
    arrays, static = model_conditions(model_config, batch)
    rows, num_img = x0.shape[:2]
    times = jnp.asarray(flow_match_schedule(default_scheduler(model_config), config.rollout_schedule, num_img)[0])
    levels = 1 - times if noise_at_zero(model_config) else times  # noise levels along the family's schedule
    noise_key, start_key = jax.random.split(key)
    start = jax.random.randint(start_key, (), 0, config.rollout_schedule - config.rollout_steps + 1)
    s0 = levels[start]
    x = ((1 - s0) * x0 + s0 * jax.random.normal(noise_key, x0.shape, jnp.float32)).astype(x0.dtype)
    method = reuse_method(config)
    num_txt = arrays["encoder_hidden_states"].shape[1]
    cache = None if method is None else init_cache(model_config, rows, num_img, num_txt, method)

    def inputs_at(x, index):
        return dict(hidden_states=x, timestep=jnp.full((rows,), times[index]), **arrays, **static)

    return x, cache, start, times, levels, inputs_at


def static_decisions(model_config, skip_blocks) -> dict:
    """Forced decisions [L] of a statically pruned model: `skip_blocks` never run, the rest at full width."""
    import numpy as np

    total = model_config.num_blocks
    if any(not 0 <= i < total for i in skip_blocks):
        raise ConfigError(f"skip_blocks={list(skip_blocks)}: the model has blocks 0..{total - 1}")
    run = np.ones((total,), bool)
    run[list(skip_blocks)] = False
    return {"run": jnp.asarray(run), "bucket": jnp.full((total,), len(model_config.width_buckets) - 1, jnp.int32)}


def _base_loss_fn(config: TrainConfig, model) -> Callable:
    """The flow loss of the base alone (trainable {"params"}), run dense or, with skip_blocks,
    without those blocks (the static pruning baseline). Metrics as edit_loss's, gate and width
    terms zero, open_rate the fraction of blocks that run."""
    model_config = model.config
    forced = static_decisions(model_config, config.skip_blocks) if config.skip_blocks else None
    open_rate = 1.0 - len(set(config.skip_blocks)) / model_config.num_blocks

    def loss_fn(trainable, frozen, batch, key):
        x0, noise, s, x_t, arrays, static = noisy_batch(config, model_config, batch, key)
        inputs = dict(hidden_states=x_t, timestep=model_time(model_config, s), **arrays, **static)
        if forced is None:
            v_pred = model.apply({"params": trainable["params"]}, **inputs)
        else:
            v_pred, _ = model.apply({"params": trainable["params"]}, **inputs, elastic=ElasticConfig(mode="forced"),
                                    decisions=forced)
        flow = jnp.mean(jnp.square(v_pred.astype(jnp.float32) - data_target(model_config, x0, noise).astype(jnp.float32)))
        zero = jnp.zeros((), jnp.float32)
        return flow, {"loss": flow, "flow_loss": flow, "gate_loss": zero, "width_loss": zero,
                      "open_rate": jnp.asarray(open_rate, jnp.float32)}

    return loss_fn


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup then a constant or cosine learning rate, after global norm clipping."""
    if config.lr_schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                      max(config.steps, config.warmup_steps + 1))
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
             optax.constant_schedule(config.learning_rate)], [config.warmup_steps])
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip > 0 else adamw


def make_train_step(config: TrainConfig, model, optimizer: optax.GradientTransformation, shared: dict,
                    micro_batch_sharding=None) -> Callable:
    """train_step(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics).

    batch: per-sample arrays [B, ...]; shared: the inputs every sample shares (FLUX img_ids and
    txt_ids, Qwen-Image's static img_shapes), closed over. The global batch is split into
    `grad_accum` micro-batches (sample b goes to micro-batch b % grad_accum, so each keeps the
    batch's sharding); their gradients and metrics are averaged.

    Args:
      config: the run's TrainConfig. model: the transformer. optimizer: optax's.
      shared: above. micro_batch_sharding: each micro-batch's sharding, or None.
    """
    if config.objective == "rollout":
        grad_fn = rollout_value_and_grad(config, model)
    else:
        grad_fn = jax.value_and_grad(make_loss_fn(config, model), has_aux=True)
    accum = config.grad_accum
    static = dict(shared)

    def train_step(trainable, opt_state, frozen, batch, step):
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

        def one(grads_sum, inputs):
            index, mb = inputs
            if micro_batch_sharding is not None:
                mb = jax.lax.with_sharding_constraint(mb, jax.tree.map(lambda _: micro_batch_sharding, mb))
            (_, metrics), grads = grad_fn(trainable, frozen, {**mb, **static}, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, grads_sum, grads), metrics

        # metrics come out stacked [accum, ...] (no zeros to build, so the gradient is traced once)
        grads, metrics = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, trainable), (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g: g / accum, grads)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return trainable, opt_state, metrics

    return train_step

