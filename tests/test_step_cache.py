"""Per-step caches around the block stacks: whole sampling runs with the first-block cache,
MagCache and TaylorSeer equal diffusers' pipelines with `transformer.enable_cache(...)` (the same compute/reuse
decision at every step, latents to 1e-4) on tiny FLUX and Qwen-Image models; per-sample
decisions; the state under jit and vmap; cache-dit's first-F / last-B layers; FLOPs records."""

import ast
import contextlib
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import make_diffusers_flux, make_diffusers_qwen, relative_error

import edit_jax
from edit_jax.checkpoints_convert import convert_checkpoint
from edit_jax.elastic import ElasticConfig, FirstBlockCache, MagCache, TaylorSeer
from edit_jax.elastic.step_cache import nearest_interp
from edit_jax.models.registry import init_routers
from edit_jax.sampling.latents import flux_img_ids, flux_txt_ids, qwen_img_shapes
from edit_jax.sampling.sampler import SamplerConfig, init_state, make_velocity_fn, sample
from edit_jax.sampling.schedules import SCHEDULERS

HEIGHT, WIDTH = 64, 48  # pixels: 4 x 3 packed tokens
STEPS = 10


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX.1-dev (2 double + 3 single blocks), in diffusers and converted, with one prompt and noise."""
    tmp = tmp_path_factory.mktemp("flux")
    torch_model = make_diffusers_flux(guidance_embeds=True, in_channels=16, num_layers=2, num_single_layers=3)
    torch_model.save_pretrained(tmp / "transformer")
    model, params = edit_jax.load(convert_checkpoint("flux", tmp / "transformer", tmp / "ckpt", dtype="float32",
                                                     progress=False))
    rng = np.random.default_rng(0)
    prompt, pooled = rng.standard_normal((2, 6, 32)).astype(np.float32), rng.standard_normal((2, 32)).astype(np.float32)
    noise = rng.standard_normal((2, 12, 16)).astype(np.float32)
    return torch_model, model, params, prompt, pooled, noise


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen-Image (3 blocks), in diffusers and converted, with a prompt, a negative prompt and noise."""
    tmp = tmp_path_factory.mktemp("qwen")
    torch_model = make_diffusers_qwen(num_layers=3)
    torch_model.save_pretrained(tmp / "transformer")
    model, params = edit_jax.load(convert_checkpoint("qwen-image", tmp / "transformer", tmp / "ckpt", dtype="float32",
                                                     progress=False))
    rng = np.random.default_rng(1)
    prompt, negative = rng.standard_normal((1, 7, 16)).astype(np.float32), rng.standard_normal((1, 4, 16)).astype(np.float32)
    noise = rng.standard_normal((1, 12, 16)).astype(np.float32)
    return torch_model, model, params, prompt, negative, noise


@pytest.fixture
def diffusers_decisions(monkeypatch):
    """The compute/reuse decision of every transformer call diffusers' cache hooks make, in call order."""
    from diffusers.hooks import first_block_cache, mag_cache, taylorseer_cache

    decisions = []
    should_compute = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def fbc(self, residual):
        decisions.append(should_compute(self, residual))
        return decisions[-1]

    head_forward = mag_cache.MagCacheHeadHook.new_forward

    def mag(self, module, *args, **kwargs):
        out = head_forward(self, module, *args, **kwargs)
        decisions.append(self.state_manager.get_state().should_compute)
        return out

    measure = taylorseer_cache.TaylorSeerCacheHook._measure_should_compute

    def taylor(self):
        should_compute, state = measure(self)
        if self is first_hook(self):
            decisions.append(should_compute)
        return should_compute, state

    hooks = []

    def first_hook(hook):  # every hooked block decides alike: record the first one's
        if not hooks:
            hooks.append(hook)
        return hooks[0]

    monkeypatch.setattr(first_block_cache.FBCHeadBlockHook, "_should_compute_remaining_blocks", fbc)
    monkeypatch.setattr(mag_cache.MagCacheHeadHook, "new_forward", mag)
    monkeypatch.setattr(taylorseer_cache.TaylorSeerCacheHook, "_measure_should_compute", taylor)
    return decisions


def run_diffusers(pipeline, torch_model, cache_config, **kwargs):
    """(latents, what the pipeline printed) of one run with `cache_config` on the transformer."""
    torch_model.enable_cache(cache_config)
    printed = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(printed):
            latents = pipeline(num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, output_type="latent",
                               return_dict=False, **kwargs)[0].numpy()
    finally:
        torch_model.disable_cache()
    return latents, printed.getvalue()


def flux_reference(flux, cache_config, rows=slice(0, 1)):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch_model, _, _, prompt, pooled, noise = flux
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["flux-dev"])),
                        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=torch_model)
    return run_diffusers(pipe, torch_model, cache_config, prompt_embeds=torch.from_numpy(prompt[rows]),
                         pooled_prompt_embeds=torch.from_numpy(pooled[rows]), latents=torch.from_numpy(noise[rows]),
                         guidance_scale=3.5)


def flux_ours(flux, step_cache, rows=slice(0, 1), **elastic):
    _, model, params, prompt, pooled, noise = flux
    cond = {"encoder_hidden_states": jnp.asarray(prompt[rows]), "pooled_projections": jnp.asarray(pooled[rows]),
            "img_ids": jnp.asarray(flux_img_ids(HEIGHT, WIDTH)), "txt_ids": jnp.asarray(flux_txt_ids(6))}
    config = ElasticConfig(**{"mode": "dense", **elastic, "step_cache": step_cache})
    routers = init_routers(model.config) if config.mode == "infer" else None
    return sample(model, params, jnp.asarray(noise[rows]), cond, SamplerConfig(num_steps=STEPS), routers=routers,
                  elastic=config)


def qwen_reference(qwen, cache_config):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch_model, _, _, prompt, negative, noise = qwen
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["qwen-image"])),
                             vae=None, text_encoder=None, tokenizer=None, transformer=torch_model)
    return run_diffusers(pipe, torch_model, cache_config, prompt_embeds=torch.from_numpy(prompt),
                         prompt_embeds_mask=torch.ones(prompt.shape[:2], dtype=torch.int64),
                         negative_prompt_embeds=torch.from_numpy(negative),
                         negative_prompt_embeds_mask=torch.ones(negative.shape[:2], dtype=torch.int64),
                         true_cfg_scale=4.0, latents=torch.from_numpy(noise))


def qwen_ours(qwen, step_cache):
    """Sequential true CFG: the conditional and unconditional calls keep their own states, as the
    pipeline's cache contexts do; records stack [conditional; unconditional] rows."""
    _, model, params, prompt, negative, noise = qwen
    shapes = qwen_img_shapes(HEIGHT, WIDTH)
    cond, neg = ({"encoder_hidden_states": jnp.asarray(p), "encoder_hidden_states_mask": jnp.ones(p.shape[:2], jnp.int32),
                  "img_shapes": shapes} for p in (prompt, negative))
    sampler = SamplerConfig(num_steps=STEPS, true_cfg_scale=4.0, cfg_mode="sequential")
    return sample(model, params, jnp.asarray(noise), cond, sampler, elastic=ElasticConfig(mode="dense", step_cache=step_cache),
                  negative_cond=neg)


def computed(records) -> list:
    """Per step, per row whether the stacks computed."""
    return np.asarray(records["step_computed"]).tolist()


@pytest.mark.parametrize("threshold", [0.6, 0.9])
def test_flux_first_block_cache_matches_diffusers(flux, diffusers_decisions, threshold):
    from diffusers.hooks import FirstBlockCacheConfig

    ref, _ = flux_reference(flux, FirstBlockCacheConfig(threshold=threshold))
    latents, records = flux_ours(flux, FirstBlockCache(threshold))

    assert computed(records) == [[d] for d in diffusers_decisions]
    assert not all(diffusers_decisions)  # the setting reuses at some steps
    assert relative_error(latents, ref) <= 1e-4


@pytest.mark.parametrize("threshold", [1.0, 1.3])
def test_qwen_first_block_cache_with_true_cfg_matches_diffusers(qwen, diffusers_decisions, threshold):
    from diffusers.hooks import FirstBlockCacheConfig

    ref, _ = qwen_reference(qwen, FirstBlockCacheConfig(threshold=threshold))
    latents, records = qwen_ours(qwen, FirstBlockCache(threshold))

    assert computed(records) == np.reshape(diffusers_decisions, (STEPS, 2)).tolist()  # cond, uncond calls per step
    assert not all(diffusers_decisions)
    assert relative_error(latents, ref) <= 1e-4


def diffusers_mag_ratios(reference, config) -> list:
    """The ratios diffusers' MagCache calibration prints at the end of a run: per cache context
    (with true CFG the conditional call's first), one list."""
    from diffusers.hooks import MagCacheConfig

    _, printed = reference(config, MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    return [ast.literal_eval(line) for line in printed.splitlines() if line.startswith("[") and not line.startswith("[M")]


def test_flux_mag_cache_calibration_records_diffusers_ratios(flux):
    (ratios,) = diffusers_mag_ratios(flux_reference, flux)
    _, records = flux_ours(flux, MagCache(calibrate=True, num_inference_steps=STEPS))

    np.testing.assert_allclose(np.asarray(records["mag_ratio"])[:, 0], ratios, rtol=1e-5)


@pytest.mark.parametrize("threshold, max_skip_steps", [(0.3, 2), (1.0, 5)])
def test_flux_mag_cache_matches_diffusers(flux, diffusers_decisions, threshold, max_skip_steps):
    from diffusers.hooks import MagCacheConfig

    (ratios,) = diffusers_mag_ratios(flux_reference, flux)
    diffusers_decisions.clear()
    settings = dict(num_inference_steps=STEPS, threshold=threshold, max_skip_steps=max_skip_steps)
    ref, _ = flux_reference(flux, MagCacheConfig(mag_ratios=ratios, **settings))
    latents, records = flux_ours(flux, MagCache(tuple(ratios), **settings))

    assert computed(records) == [[d] for d in diffusers_decisions]
    assert not all(diffusers_decisions)
    assert relative_error(latents, ref) <= 1e-4


@pytest.mark.parametrize("threshold, retention_ratio", [(0.5, 0.2), (2.0, 0.4)])
def test_qwen_mag_cache_with_true_cfg_matches_diffusers(qwen, diffusers_decisions, threshold, retention_ratio):
    from diffusers.hooks import MagCacheConfig

    ratios, uncond_ratios = diffusers_mag_ratios(qwen_reference, qwen)
    diffusers_decisions.clear()
    settings = dict(num_inference_steps=STEPS, threshold=threshold, retention_ratio=retention_ratio)
    ref, _ = qwen_reference(qwen, MagCacheConfig(mag_ratios=ratios, **settings))
    _, calibration = qwen_ours(qwen, MagCache(calibrate=True, num_inference_steps=STEPS))
    latents, records = qwen_ours(qwen, MagCache(tuple(ratios), **settings))

    np.testing.assert_allclose(np.asarray(calibration["mag_ratio"]), np.transpose([ratios, uncond_ratios]), rtol=1e-5)
    assert computed(records) == np.reshape(diffusers_decisions, (STEPS, 2)).tolist()
    assert not all(diffusers_decisions)
    assert relative_error(latents, ref) <= 1e-4


EVERY_BLOCK = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]


def diffusers_taylor_seer(**settings):
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(**settings, taylor_factors_dtype=torch.float32, cache_identifiers=EVERY_BLOCK)


@pytest.mark.parametrize("settings", [dict(cache_interval=3, disable_cache_before_step=2, max_order=1),
                                      dict(cache_interval=4, disable_cache_before_step=3, max_order=2,
                                           disable_cache_after_step=8)])
def test_flux_taylor_seer_matches_diffusers(flux, diffusers_decisions, settings):
    ref, _ = flux_reference(flux, diffusers_taylor_seer(**settings))
    latents, records = flux_ours(flux, TaylorSeer(**settings, factors_dtype="float32"))

    assert computed(records) == [[d] for d in diffusers_decisions]
    assert not all(diffusers_decisions)
    assert relative_error(latents, ref) <= 1e-4


@pytest.mark.parametrize("settings", [dict(cache_interval=2, disable_cache_before_step=1, max_order=1),
                                      dict(cache_interval=3, disable_cache_before_step=2, max_order=0)])
def test_qwen_taylor_seer_with_true_cfg_matches_diffusers(qwen, diffusers_decisions, settings):
    ref, _ = qwen_reference(qwen, diffusers_taylor_seer(**settings))
    latents, records = qwen_ours(qwen, TaylorSeer(**settings, factors_dtype="float32"))

    assert computed(records) == np.reshape(diffusers_decisions, (STEPS, 2)).tolist()
    assert not all(diffusers_decisions)
    assert relative_error(latents, ref) <= 1e-4


def test_one_decision_for_the_batch_matches_diffusers_on_two_prompts(flux, diffusers_decisions):
    from diffusers.hooks import FirstBlockCacheConfig

    ref, _ = flux_reference(flux, FirstBlockCacheConfig(threshold=0.6), rows=slice(0, 2))
    latents, records = flux_ours(flux, FirstBlockCache(0.6), rows=slice(0, 2))

    assert computed(records) == [[d, d] for d in diffusers_decisions]
    assert relative_error(latents, ref) <= 1e-4


def test_per_sample_decisions_give_each_row_its_run_alone(flux):
    method = FirstBlockCache(0.6, per_sample=True)
    latents, records = flux_ours(flux, method, rows=slice(0, 2))
    alone = [flux_ours(flux, FirstBlockCache(0.6), rows=slice(i, i + 1)) for i in range(2)]

    for i, (row_latents, row_records) in enumerate(alone):
        assert np.asarray(records["step_computed"])[:, i].tolist() == np.asarray(row_records["step_computed"])[:, 0].tolist()
        assert relative_error(latents[i], row_latents[0]) <= 1e-5
    assert computed(records) != [[a, a] for a, _ in computed(records)]  # the rows decide differently somewhere


def test_the_step_cache_state_threads_through_jit_and_vmap(flux):
    _, model, params, prompt, pooled, noise = flux
    elastic = ElasticConfig(mode="dense", step_cache=FirstBlockCache(0.6))
    f = jax.jit(make_velocity_fn(model, params, elastic=elastic))
    conds = [{"encoder_hidden_states": jnp.asarray(prompt[i : i + 1]), "pooled_projections": jnp.asarray(pooled[i : i + 1]),
              "guidance": jnp.full((1,), 3.5), "img_ids": jnp.asarray(flux_img_ids(HEIGHT, WIDTH)),
              "txt_ids": jnp.asarray(flux_txt_ids(6))} for i in range(2)]
    xs = [jnp.asarray(noise[i : i + 1]) for i in range(2)]
    states = [init_state(model.config, elastic, 1, 12, 6) for _ in range(2)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    batched_cond = jax.tree.map(lambda *a: jnp.stack(a), *conds)
    g = jax.jit(jax.vmap(make_velocity_fn(model, params, elastic=elastic), in_axes=(0, None, 0, 0)))
    for t in (0.9, 0.8, 0.7):
        timestep = jnp.full((1,), t)
        outs = [f(x, timestep, c, s) for x, c, s in zip(xs, conds, states)]
        v, stacked = g(jnp.stack(xs), timestep, batched_cond, stacked)
        for i, (v_i, s_i) in enumerate(outs):
            np.testing.assert_allclose(v[i], v_i, rtol=1e-5, atol=1e-6)
            assert bool(stacked["step_cache"].stored[i, 0]) == bool(s_i["step_cache"].stored[0])
        states = [s for _, s in outs]
    assert int(stacked["step"][0]) == 3


def executed_blocks(records, step: int) -> list:
    return np.asarray(records["executed"])[step, 0].astype(int).tolist()


def test_first_f_and_last_b_blocks_always_run_the_middle_is_reused_and_the_flops_count_what_ran(flux):
    dense, dense_records = flux_ours(flux, None)
    same, same_records = flux_ours(flux, FirstBlockCache(0.0, head_layers=2, tail_layers=1))
    _, records = flux_ours(flux, FirstBlockCache(10.0, head_layers=2, tail_layers=1))

    assert relative_error(same, dense) <= 1e-5  # threshold 0: every step computes
    assert computed(records) == [[True]] + [[False]] * (STEPS - 1)
    assert executed_blocks(records, 0) == [1, 1, 1, 1, 1]
    assert executed_blocks(records, 1) == [1, 1, 0, 0, 1]  # 2 double blocks, then 3 single
    flops, full = np.asarray(records["flops_total"]), np.asarray(same_records["flops_total"])
    assert flops[0] == full[0] and np.all(flops[1:] < 0.75 * full[1:]) and np.all(flops[1:] > 0)  # 3 of 5 blocks run


def test_the_step_cache_combines_with_e_dit_routers_and_the_block_cache(flux):
    latents, records = flux_ours(flux, FirstBlockCache(0.6), mode="infer", cache=True, cache_start=2)

    assert np.isfinite(latents).all()
    assert np.asarray(records["p"]).shape == (STEPS, 1, 5)
    reused = ~np.asarray(records["step_computed"])[:, 0]
    assert reused.any()
    assert not np.asarray(records["cache_hit"])[reused][:, 1:].any()  # a reused step's middle neither computes nor reuses
    assert not np.asarray(records["executed"])[reused][:, 1:].any()


def test_bad_step_cache_settings_are_clear_errors(flux):
    with pytest.raises(ValueError, match="MagCache needs mag_ratios"):
        MagCache()
    with pytest.raises(ValueError, match="runs at inference"):
        ElasticConfig(mode="train", step_cache=FirstBlockCache())
    with pytest.raises(ValueError, match="head_layers >= 1"):
        FirstBlockCache(head_layers=0)
    with pytest.raises(ValueError, match="set up for 28 steps but the sampler runs 10"):
        flux_ours(flux, MagCache((1.0, 1.1)))
    with pytest.raises(ValueError, match="head_layers 3 \\+ tail_layers 3 exceed the model's 5 blocks"):
        flux_ours(flux, FirstBlockCache(head_layers=3, tail_layers=3))
    with pytest.raises(ValueError, match="cache_interval 0 >= 1"):
        TaylorSeer(cache_interval=0)
    with pytest.raises(ValueError, match="factors_dtype must be 'float32' or 'bfloat16'"):
        TaylorSeer(factors_dtype="float16")


def test_mag_ratios_resample_to_the_steps_as_diffusers_does():
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
    from diffusers.hooks.mag_cache import nearest_interp as diffusers_interp

    for length in (1, 10, 28, 50):
        np.testing.assert_array_equal(nearest_interp(FLUX_MAG_RATIOS.numpy(), length),
                                      diffusers_interp(FLUX_MAG_RATIOS, length).numpy())


def cli_args(command, ckpt, emb, out, *extra):
    return [command, str(ckpt), "--embeddings", str(emb), "--out", str(out), "--height", "32", "--width", "32",
            "--steps", "6", *extra]


def test_calibrate_magcache_then_sample_with_it_from_the_command_line(flux_small_ckpt, tmp_path, capsys):
    from edit_jax.cli import main
    from edit_jax.sampling.calibration import read_mag_ratios

    ckpt, emb = flux_small_ckpt
    assert main(cli_args("calibrate-magcache", ckpt, emb, ckpt / "mag_ratios.json")) == 0
    ratios = read_mag_ratios(ckpt / "mag_ratios.json")
    assert len(ratios) == 6 and ratios[0] == 1.0
    capsys.readouterr()

    assert main(cli_args("sample", ckpt, emb, tmp_path / "mag", "--step-cache", "mag-cache",
                         "--step-cache-threshold", "10", "--retention-ratio", "0.3")) == 0
    summary = json.loads((tmp_path / "mag" / "summary.json").read_text())
    assert summary["step_cache"]["name"] == "mag_cache" and summary["step_cache"]["mag_ratios"] == list(ratios)
    assert summary["step_reuse_rate"] == pytest.approx(3 / 6)  # 2 steps retained, 3 skipped at most, then one computes
    assert np.load(tmp_path / "mag" / "records.npz")["step_computed"][:, 0].tolist() == [1, 1, 0, 0, 0, 1]


def test_sample_with_the_first_block_cache_records_its_decisions(flux_small_ckpt, tmp_path):
    from edit_jax.cli import main

    ckpt, emb = flux_small_ckpt
    assert main(cli_args("sample", ckpt, emb, tmp_path / "fbc", "--step-cache", "first-block",
                         "--step-cache-threshold", "10", "--tail-layers", "1")) == 0
    records = np.load(tmp_path / "fbc" / "records.npz")
    summary = json.loads((tmp_path / "fbc" / "summary.json").read_text())
    assert records["step_computed"][:, 0].tolist() == [1, 0, 0, 0, 0, 0]
    assert summary["step_reuse_rate"] == pytest.approx(5 / 6) and summary["elastic"] == "dense"
    assert summary["step_cache"] == {"name": "first_block", "threshold": 10.0, "head_layers": 1, "tail_layers": 1,
                                     "per_sample": False}
    assert (tmp_path / "fbc" / "router_map.png").is_file()


def test_sample_with_taylor_seer_computes_on_its_schedule_and_predicts_between(flux_small_ckpt, tmp_path):
    from edit_jax.cli import main

    ckpt, emb = flux_small_ckpt
    assert main(cli_args("sample", ckpt, emb, tmp_path / "taylor", "--step-cache", "taylor-seer", "--cache-interval", "2",
                         "--disable-cache-before-step", "2", "--max-order", "2")) == 0
    records = np.load(tmp_path / "taylor" / "records.npz")
    summary = json.loads((tmp_path / "taylor" / "summary.json").read_text())
    assert records["step_computed"][:, 0].tolist() == [1, 1, 0, 1, 0, 1]
    assert np.isfinite(np.load(tmp_path / "taylor" / "latents.npy")).all()  # bfloat16 factors, diffusers' default
    assert summary["step_cache"] == {"name": "taylor_seer", "cache_interval": 2, "disable_cache_before_step": 2,
                                     "disable_cache_after_step": None, "max_order": 2, "factors_dtype": "bfloat16"}


def test_mag_cache_without_calibrated_ratios_is_a_clear_error(flux_small_ckpt, tmp_path, capsys):
    from edit_jax.cli import main

    ckpt, emb = flux_small_ckpt
    assert main(cli_args("sample", ckpt, emb, tmp_path / "out", "--step-cache", "mag-cache")) == 2
    assert "no MagCache ratios at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
