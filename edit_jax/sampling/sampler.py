"""Flow-matching sampling: a pure velocity function for any sampler, and the Euler sampler of the
FLUX and Qwen-Image pipelines as one jitted `lax.scan` over steps, with true classifier-free
guidance and the E-DiT block cache carried as explicit state.

    f = make_velocity_fn(model, params, routers, ElasticConfig(mode="infer", cache=True))
    state = init_state(model.config, elastic, batch, num_img, num_txt)
    velocity, state = f(x, t, cond, state)          # t [B] = sigma in [0, 1]

    g = velocity_fn(model, elastic)                  # the same with params and routers as arguments
    velocity, state = g(params, routers, x, t, cond, state)

cond holds the conditioning inputs by the model's own names: FLUX `encoder_hidden_states`,
`pooled_projections`, `img_ids`, `txt_ids` (and `guidance` for dev); Qwen-Image
`encoder_hidden_states`, `encoder_hidden_states_mask` and `img_shapes`, a `Static` value (part of
the pytree's structure, not a leaf), so jit, vmap and grad pass cond through whole.

Editing models (Qwen-Image-Edit, FLUX.1 Kontext) read reference images as more tokens after the
latents: cond["reference_latents"] [B, M, C] (packed, as the pipeline's VAE encodes them) is
appended to x in every call and the velocity of x's own N tokens returned, as their pipelines do;
the positions (`img_shapes` with one entry per image, or `img_ids` of N + M rows) cover both.

The state carries the step counter and, with the cache on, the stored block residuals: a caller
must thread the returned state into the next call. A solver that cannot carry state (diffrax's
vector fields are pure) would hand the same state to every call, and the cache would never fill:
use the cache only where the state is threaded (as `sample` does), and pass `step` to say which
solver step a call belongs to (Heun calls the model twice per step; `cache_start` counts steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.sampling.latents import packed_grid
from edit_jax.models.registry import block_modulations, family_of, init_cache, init_step_cache, router_modulations
from edit_jax.sampling.schedules import SCHEDULERS, SchedulerConfig, flow_match_schedule

CFG_MODES = ("batched", "sequential")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """num_steps Euler steps. guidance_scale: FLUX.1-dev's embedded guidance (models without a
    guidance embedding ignore it). true_cfg_scale > 1: true classifier-free guidance with negative
    conditioning, run "batched" (conditional and unconditional rows in one batch, each row with
    its own router decisions and cache bank) or "sequential" (two calls per step, as the released
    E-DiT code). cfg_norm_rescale: rescale the guided velocity to the conditional one's norm
    (QwenImagePipeline does; None: the family's pipeline default). scheduler: None for the
    family's published scheduler config."""

    num_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    cfg_mode: str = "batched"
    cfg_norm_rescale: bool | None = None
    scheduler: SchedulerConfig | None = None

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode {self.cfg_mode!r} is not one of {CFG_MODES}")
        for name in ("guidance_scale", "true_cfg_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")


def default_scheduler(config) -> SchedulerConfig:
    """The scheduler of the family's published pipeline (FLUX.1-dev and schnell differ)."""
    name = family_of(config).scheduler(config)
    if name not in SCHEDULERS:
        raise ValueError(f"no sampler for {config.family} models yet: its pipeline's schedule ({name!r}) is not built")
    return SCHEDULERS[name]


def make_conditions(config, prompt_embeds, height: int, width: int, pooled_projections=None, mask=None) -> dict:
    """The cond dict for an image of height x width pixels from prompt embeddings [B, T, D]:
    FLUX adds the pooled embedding [B, P] and RoPE ids; Qwen-Image the text mask [B, T] (all
    valid when None) and img_shapes.

    Args:
      config: the model config. prompt_embeds: [B, T, D_text]. height, width: the image's pixels.
      pooled_projections: [B, P] (FLUX). mask: [B, T] (Qwen-Image; None: all valid).
    """
    family = family_of(config)
    embeds = jnp.asarray(prompt_embeds, jnp.float32)
    given = {"pooled_projections": pooled_projections, "encoder_hidden_states_mask": mask}
    cond = {"encoder_hidden_states": embeds}
    for key, (shape, dtype) in family.prompt_extras(config, *embeds.shape[:2]).items():
        value = given.get(key)
        if value is None and not np.issubdtype(dtype, np.integer):  # a mask defaults to all valid
            raise ValueError(f"{family.name} needs {key} beside the prompt embeddings")
        cond[key] = jnp.ones(shape, dtype) if value is None else jnp.asarray(value, dtype)
    for key, value in family.positions(config, *packed_grid(height, width), embeds.shape[1]).items():
        cond[key] = value if isinstance(value, (jax.Array, np.ndarray)) else Static(value)
    return cond


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """A value that is part of a pytree's structure, not a leaf (Qwen-Image's img_shapes in cond):
    jit keys its cache on it instead of tracing it."""

    value: Any


def static_value(x):
    return x.value if isinstance(x, Static) else x


def _hashable(value):
    """Lists (diffusers' img_shapes) as tuples, all the way down, so jit can key on them."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_hashable(v) for v in value)
    return int(value) if isinstance(value, np.integer) else value


def _split_static(cond: dict) -> tuple[dict, dict]:
    """(array conditions, static settings as plain hashable values) of a cond dict."""
    static = {k: _hashable(static_value(v)) for k, v in cond.items() if k == "img_shapes"}
    return {k: v for k, v in cond.items() if k not in static}, static


def init_state(config, elastic: ElasticConfig | None, batch: int, num_img: int, num_txt: int) -> dict:
    """The E-DiT sampling state: the step counter and the empty states of the block cache and the
    step cache where they run.

    Args:
      config: the model config. elastic: the call's ElasticConfig (None: dense, no cache).
      batch: rows per call (2B with batched true CFG). num_img, num_txt: image tokens (the
        latents' and any reference images') and text tokens per row.
    """
    state = {"step": jnp.zeros((), jnp.int32)}
    if elastic is not None and elastic.cache_method is not None:
        state["cache"] = init_cache(config, batch, num_img, num_txt, elastic.cache_method)
    if elastic is not None and elastic.step_cache is not None:
        state["step_cache"] = init_step_cache(config, batch, num_img, num_txt, elastic.step_cache)
    return state


def velocity_fn(model, elastic: ElasticConfig | None = None, return_aux: bool = False, decisions=None) -> Callable:
    """The model as a pure function of everything that changes:
    f(params, routers, x, t, cond, state, step=None, router_modulations=None, block_modulations=None)
    -> (velocity, state)
    (with return_aux: (velocity, state, aux)); x [B, N, C] packed latents, t [B] sigmas in [0, 1]; routers may be
    None in dense and forced modes (forced decisions run no router). Differentiate or vmap with respect to params or routers directly.

    step: the solver step this call belongs to (the cache's `cache_start` counts these); None
    takes the count of calls so far (state["step"]). decisions (mode "forced"): {"run" or "p",
    "bucket"} arrays of [L] or [B, L], or a function of the step returning them.
    router_modulations, block_modulations: the routers' and the blocks' modulations for this t
    and cond, computed ahead (`edit_jax.models.router_modulations` and `block_modulations`;
    `sample` does so for all its steps at once).

    Args:
      model: the transformer (`edit_jax.build_model`). elastic: how the routers act (None or
        mode "dense": the base model). return_aux: also return the step's routing record.
      decisions: forced decisions for mode "forced", or a function of the step giving them.
    """
    elastic_on = elastic is not None and not elastic.runs_base_model

    def f(params, routers, x, t, cond, state, step=None, router_modulations=None, block_modulations=None):
        arrays, static = _split_static(cond)
        reference = arrays.pop("reference_latents", None)
        tokens = x if reference is None else jnp.concatenate([x, reference.astype(x.dtype)], axis=1)
        own = (lambda v: v) if reference is None else (lambda v: v[:, : x.shape[1]])  # x's tokens' velocity
        if not elastic_on:
            if router_modulations is not None:
                raise ValueError("router_modulations were given, but this velocity function runs no router (dense)")
            v = model.apply({"params": params}, hidden_states=tokens, timestep=t, **arrays, **static,
                            block_modulations=block_modulations)
            return (own(v), state, {}) if return_aux else (own(v), state)
        if routers is None and elastic.mode not in ("forced", "dense"):
            raise ValueError(f"elastic mode {elastic.mode!r} needs routers")
        step = state["step"] if step is None else jnp.asarray(step, jnp.int32)
        forced = decisions(step) if callable(decisions) else decisions
        variables = {"params": params} if routers is None else {"params": params, "routers": routers}
        v, aux = model.apply(
            variables, hidden_states=tokens, timestep=t, **arrays, **static,
            elastic=elastic, decisions=forced, cache=state.get("cache"), step=step, router_modulations=router_modulations,
            block_modulations=block_modulations, step_cache=state.get("step_cache"),
        )
        new_state = {"step": step + 1}
        for key in ("cache", "step_cache"):
            if key in state:
                new_state[key] = aux.pop(key)
        return (own(v), new_state, aux) if return_aux else (own(v), new_state)

    return f


def make_velocity_fn(model, params: dict, routers: dict | None = None, elastic: ElasticConfig | None = None,
                     return_aux: bool = False, decisions=None) -> Callable:
    """`velocity_fn` with params and routers closed over: f(x, t, cond, state, step=None,
    router_modulations=None, block_modulations=None) -> (velocity, state) (with return_aux:
    (velocity, state, aux)).

    Args:
      model: the transformer. params: its base params. routers: the E-DiT routers (needed in
        modes "infer" and "train"; refused in dense mode, where they would not run).
      elastic, return_aux, decisions: as `velocity_fn`'s.
    """
    if elastic is not None and elastic.mode not in ("dense", "forced") and routers is None:
        raise ValueError(f"elastic mode {elastic.mode!r} needs routers")
    if routers is not None and (elastic is None or elastic.mode == "dense"):
        raise ValueError("routers were given but the elastic mode is dense, so they would not run: pass "
                         "elastic=ElasticConfig(mode='infer') to run E-DiT, or no routers")
    g = velocity_fn(model, elastic, return_aux, decisions)
    return lambda x, t, cond, state, step=None, router_modulations=None, block_modulations=None: g(
        params, routers, x, t, cond, state, step, router_modulations, block_modulations)


def _concat_conditions(cond: dict, negative: dict) -> dict:
    """One batch of [conditional; unconditional] rows. Qwen-Image text of unequal lengths is
    padded at the end with masked tokens (valid tokens keep their RoPE positions)."""
    out = {}
    t_c, t_n = cond["encoder_hidden_states"].shape[1], negative["encoder_hidden_states"].shape[1]
    for key, value in cond.items():
        other = negative[key]
        if key in ("img_ids", "txt_ids", "img_shapes"):
            if key == "txt_ids" and t_c != t_n:
                raise ValueError("batched CFG needs prompt and negative prompt of equal length for FLUX; use cfg_mode='sequential'")
            out[key] = value
            continue
        if key in ("encoder_hidden_states", "encoder_hidden_states_mask") and t_c != t_n:
            length = max(t_c, t_n)
            pad = lambda a: jnp.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
            value, other = pad(value), pad(other)
        out[key] = jnp.concatenate([value, other], axis=0)
    return out


def check_sampling_inputs(config, noise, cond: dict, negative: dict | None, sampler: SamplerConfig) -> None:
    """Raises ValueError naming the first input that does not fit the model or the sampler.

    Args:
      config: the model config. noise: [B, N, C] packed latents. cond, negative: the prompt's
        and the negative prompt's conditions (negative None without true CFG). sampler: the run's.
    """
    if noise.ndim != 3 or noise.shape[-1] != config.in_channels:
        raise ValueError(f"latents have shape {tuple(noise.shape)}, expected packed [B, N, {config.in_channels}]")
    batch, num_img = noise.shape[:2]
    held = "latents hold"
    if "reference_latents" in cond:
        reference = cond["reference_latents"]
        if reference.ndim != 3 or reference.shape[0] != batch or reference.shape[-1] != config.in_channels:
            raise ValueError(f"reference_latents have shape {tuple(reference.shape)}, expected packed "
                             f"[{batch}, M, {config.in_channels}] (as many rows as the latents)")
        num_img, held = num_img + reference.shape[1], "latents and reference_latents hold"
    problem = family_of(config).check_positions(config, cond, num_img, batch)
    if problem is not None:
        raise ValueError(f"{held} {num_img} tokens but {problem} (wrong resolution?)")
    for name, c in (("prompt", cond), ("negative prompt", negative)):
        if c is not None:
            _check_condition(config, name, c, batch)
    if sampler.true_cfg_scale > 1 and negative is None:
        raise ValueError(f"true_cfg_scale {sampler.true_cfg_scale} > 1 needs negative prompt embeddings")


def _check_condition(config, name: str, cond: dict, batch: int) -> None:
    """One prompt's embeddings against the model's widths and the latents' batch of `batch` rows."""
    embeds = cond["encoder_hidden_states"]
    if embeds.ndim != 3:
        raise ValueError(f"{name} embeddings have shape {tuple(embeds.shape)}, expected [B, T, {config.joint_attention_dim}]")
    if embeds.shape[-1] != config.joint_attention_dim:
        raise ValueError(f"{name} embeddings have width {embeds.shape[-1]}, the model expects {config.joint_attention_dim}")
    if embeds.shape[0] != batch:
        raise ValueError(f"{name} embeddings hold {embeds.shape[0]} prompts but the latents {batch} samples")
    for key, (expected, _) in family_of(config).prompt_extras(config, batch, embeds.shape[1]).items():
        if tuple(cond[key].shape) != tuple(expected):
            raise ValueError(f"{name} {key} has shape {tuple(cond[key].shape)}, expected {list(expected)} "
                             f"(beside embeddings of shape {tuple(embeds.shape)})")


def sample(
    model,
    params: dict,
    noise: jax.Array,
    cond: dict,
    sampler: SamplerConfig = SamplerConfig(),
    routers: dict | None = None,
    elastic: ElasticConfig | None = None,
    negative_cond: dict | None = None,
    decisions=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[jax.Array, dict]:
    """Euler flow-matching sampling from packed noise [B, N, C]: returns (latents [B, N, C],
    per-step records [num_steps, ...]: p, executed, cache_hit, bucket [rows, L], flops).
    cond["reference_latents"]: the reference images of an editing model (see the module
    docstring); a negative prompt without its own edits the same ones.

    With true CFG batched, records cover 2B rows ([conditional; unconditional]); sequential
    records stack the two calls' rows the same way. decisions: forced decisions for mode
    "forced" (see `make_velocity_fn`). `progress(step)` is called from the device after every
    step (e.g. a tqdm update); in step order on one device, without that guarantee when the params
    are sharded over several or a mesh is set. What reads only the time embedding is computed for
    all steps ahead of the loop, so that its kernels are read once per run: the blocks' AdaLN modulations
    (`edit_jax.models.block_modulations`) and, where routers run, theirs (`router_modulations`).
    They are held for the whole run: at full size in bfloat16 about 2 MB per step and row for
    FLUX.1-dev (59 MB for 28 steps), 4.4 MB for Qwen-Image (124 MB), routers' not counted.

    Args:
      model: the transformer (`edit_jax.build_model` or `edit_jax.load`). params: its base params.
      noise: [B, N, C] packed initial latents (`edit_jax.sampling.latents.initial_noise`).
      cond: the prompt's conditions by the model's argument names (`make_conditions`).
      sampler: steps, guidance, true CFG and scheduler. routers, elastic: E-DiT's (None: dense).
      negative_cond: the negative prompt's conditions, for true CFG (true_cfg_scale > 1).
      decisions: forced decisions (mode "forced"). progress: progress(step) after every step.
    """
    config = model.config
    if "reference_latents" in cond and negative_cond is not None:  # the negative prompt edits the same images
        negative_cond = {"reference_latents": cond["reference_latents"], **negative_cond}
    check_sampling_inputs(config, noise, cond, negative_cond, sampler)
    planned = getattr(getattr(elastic, "step_cache", None), "num_inference_steps", sampler.num_steps)
    if planned != sampler.num_steps:  # a method calibrated per step (MagCache) plans for its run's length
        raise ValueError(f"step cache {elastic.step_cache.name!r} is set up for {planned} steps but the sampler runs "
                         f"{sampler.num_steps}: give it num_inference_steps={sampler.num_steps}")
    batch, num_img = noise.shape[:2]
    num_tokens = num_img + (cond["reference_latents"].shape[1] if "reference_latents" in cond else 0)
    sigmas, timesteps = flow_match_schedule(sampler.scheduler or default_scheduler(config), sampler.num_steps, num_img)
    t_model = jnp.asarray(timesteps / np.float32(1000.0))
    cfg = sampler.true_cfg_scale > 1
    family = family_of(config)
    rescale = sampler.cfg_norm_rescale if sampler.cfg_norm_rescale is not None else family.cfg_norm_rescale

    def with_guidance(c):
        return {**c, **{k: jnp.asarray(v) for k, v in family.guidance(config, sampler.guidance_scale, batch).items()}}

    cond = with_guidance(cond)
    if cfg:
        negative_cond = with_guidance(negative_cond)
    batched_cfg = cfg and sampler.cfg_mode == "batched"
    conditions = [_concat_conditions(cond, negative_cond)] if batched_cfg else [cond] + ([negative_cond] if cfg else [])
    rows = 2 * batch if batched_cfg else batch
    states = tuple(init_state(config, elastic, rows, num_tokens, c["encoder_hidden_states"].shape[1]) for c in conditions)
    arrays = [_split_static(c)[0] for c in conditions]
    statics = [_split_static(c)[1] for c in conditions]

    ordered = len(_devices(params)) <= 1 and jax.sharding.get_abstract_mesh().empty
    # a plain function of the step is part of the program; a callable pytree (ScheduleDecisions) is an argument
    static_decisions = callable(decisions) and jax.tree.leaves(decisions) == [decisions]
    run = _runner(model, sampler, elastic, tuple(tuple(st.items()) for st in statics), batch, rescale, batched_cfg,
                  cfg, decisions if static_decisions else None, progress, ordered)
    forced = None if static_decisions else decisions
    return run(params, routers, noise, arrays, states, jnp.asarray(sigmas), t_model, forced)


def first_rows(records: dict, count: int, rows: int) -> dict:
    """The records of the first `count` prompts of a batch of `rows` (with true CFG, of both
    halves: conditional rows, then unconditional ones); per-step totals [steps] as they are."""
    def take(x):
        x = np.asarray(x)
        if x.ndim < 2:
            return x
        return np.concatenate([x[:, h * rows : h * rows + count] for h in range(x.shape[1] // rows)], axis=1)

    return {key: take(x) for key, x in records.items()}


def concat_records(parts: list[tuple[dict, int]]) -> dict:
    """The records of batches sampled one after another, given as (records, rows), as one run's:
    per-row arrays [steps, rows, ...] joined (with true CFG all conditional rows, then all
    unconditional ones, as `sample` lays them out), per-step totals [steps] added."""
    def join(key):
        arrays = [(np.asarray(records[key]), rows) for records, rows in parts]
        if arrays[0][0].ndim < 2:
            return sum(a for a, _ in arrays)
        halves = arrays[0][0].shape[1] // arrays[0][1]
        return np.concatenate([a[:, h * n : (h + 1) * n] for h in range(halves) for a, n in arrays], axis=1)

    return {key: join(key) for key in parts[0][0]} if parts and parts[0][0] else {}


def _devices(tree) -> set:
    """The devices a pytree's concrete arrays live on."""
    return {d for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            for d in x.sharding.device_set}


@functools.lru_cache(maxsize=32)
def _runner(model, sampler, elastic, statics, batch, rescale, batched_cfg, cfg, decisions_fn, progress, ordered):
    """The jitted sampling loop for one static setup (compiled once, reused across calls)."""

    def guided(v_cond, v_uncond):
        v = v_uncond + sampler.true_cfg_scale * (v_cond - v_uncond)
        if rescale:
            v = v * (jnp.linalg.norm(v_cond, axis=-1, keepdims=True) / jnp.linalg.norm(v, axis=-1, keepdims=True))
        return v

    routed = elastic is not None and elastic.mode in ("infer", "train")

    @jax.jit
    def run(params, routers, noise, arrays, states, sigmas, t_model, forced):
        decisions = decisions_fn if decisions_fn is not None else forced
        f = make_velocity_fn(model, params, routers, elastic, return_aux=True, decisions=decisions)
        conds = [{**a, **dict(s)} for a, s in zip(arrays, statics)]

        def every_step(c):  # per stack [num_steps, L_i, rows, kD]: one matmul over all steps
            rows = c["encoder_hidden_states"].shape[0]

            def at(t):
                timestep = jnp.full((rows,), t)
                return {"router_modulations": router_modulations(model.config, params, routers, timestep, c) if routed else None,
                        "block_modulations": block_modulations(model.config, params, timestep, c)}

            return jax.vmap(at)(t_model)

        mods = tuple(every_step(c) for c in conds)

        def step(carry, xs):
            (x, states), (i, mods_i) = carry, xs
            t = jnp.full((batch,), t_model[i])
            if not cfg:
                v, s, aux = f(x, t, conds[0], states[0], **mods_i[0])
                states = (s,)
            elif batched_cfg:
                v2, s, aux = f(jnp.concatenate([x, x]), jnp.concatenate([t, t]), conds[0], states[0], **mods_i[0])
                v = guided(v2[:batch], v2[batch:])
                states = (s,)
            else:
                v_c, s_c, aux_c = f(x, t, conds[0], states[0], **mods_i[0])
                v_u, s_u, aux_u = f(x, t, conds[1], states[1], **mods_i[1])
                v, states = guided(v_c, v_u), (s_c, s_u)
                # per-row records stack [conditional; unconditional]; scalar counts (FLOPs) add up
                aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b]) if jnp.ndim(a) else a + b, aux_c, aux_u)
            x = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(x.dtype)
            if progress is not None:
                jax.debug.callback(progress, i, ordered=ordered)  # JAX orders callbacks on one device only
            record = {k: v for k, v in aux.items() if k not in ("q", "branch", "flops")}
            if "flops" in aux:
                record["flops_total"] = aux["flops"]["total"]
                record["flops_per_sample"] = aux["flops"]["per_sample"]
            return (x, states), record

        (latents, _), records = jax.lax.scan(step, (noise, states), (jnp.arange(sampler.num_steps), mods))
        return latents, records

    return run
