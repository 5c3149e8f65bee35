"""Sampling: whole-loop parity with the diffusers pipelines on tiny transformers, the elastic
sampler against the dense one, a user-written sampler on the pure velocity function, bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import edit_jax
from edit_jax.checkpoints_convert import convert_checkpoint
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.sampling.latents import flux_img_ids, flux_txt_ids, qwen_img_shapes
from edit_jax.models.registry import init_routers, init_variables
from edit_jax.sampling import sampler as sampler_module
from edit_jax.sampling.sampler import SamplerConfig, make_conditions, sample
from edit_jax.sampling.step_schedule import ScheduleDecisions
from edit_jax.sampling.schedules import SCHEDULERS
from reference import make_diffusers_flux, make_diffusers_qwen, relative_error

HEIGHT, WIDTH = 64, 48  # pixels: 4 x 3 packed tokens


def flux_pipeline(transformer, schnell: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["flux-schnell" if schnell else "flux-dev"]))
    return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def load_converted(family, torch_model, save_diffusers, tmp_path):
    ckpt = convert_checkpoint(family, save_diffusers(torch_model), tmp_path / "ckpt", dtype="float32", progress=False)
    return edit_jax.load(ckpt)


def flux_setup(save_diffusers, tmp_path, guidance_embeds: bool = True, seed: int = 0):
    """A tiny diffusers FLUX, converted, and its inputs: one prompt of 6 tokens and packed noise of 4 x 3 tokens."""
    torch_model = make_diffusers_flux(guidance_embeds=guidance_embeds, in_channels=16)
    model, params = load_converted("flux", torch_model, save_diffusers, tmp_path)
    rng = np.random.default_rng(seed)
    prompt = rng.standard_normal((1, 6, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 32)).astype(np.float32)
    noise = rng.standard_normal((1, 12, 16)).astype(np.float32)
    return torch_model, model, params, prompt, pooled, noise


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_sampler_matches_the_diffusers_pipeline(variant, save_diffusers, tmp_path):
    dev = variant == "dev"
    torch_model, model, params, prompt, pooled, noise = flux_setup(save_diffusers, tmp_path, guidance_embeds=dev)
    steps = 6 if dev else 4

    with torch.no_grad():
        ref = flux_pipeline(torch_model, not dev)(
            prompt_embeds=torch.from_numpy(prompt), pooled_prompt_embeds=torch.from_numpy(pooled),
            latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH, num_inference_steps=steps,
            guidance_scale=3.5, output_type="latent", return_dict=False,
        )[0].numpy()
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "pooled_projections": jnp.asarray(pooled),
            "img_ids": jnp.asarray(flux_img_ids(HEIGHT, WIDTH)), "txt_ids": jnp.asarray(flux_txt_ids(6))}
    latents, _ = sample(model, params, jnp.asarray(noise), cond, SamplerConfig(num_steps=steps, guidance_scale=3.5))

    assert relative_error(latents, ref) <= 1e-4


def qwen_setup(save_diffusers, tmp_path):
    torch_model = make_diffusers_qwen()
    model, params = load_converted("qwen-image", torch_model, save_diffusers, tmp_path)
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((1, 7, 16)).astype(np.float32)
    prompt_mask = np.ones((1, 7), np.int64)
    prompt_mask[0, 5:] = 0
    negative = rng.standard_normal((1, 4, 16)).astype(np.float32)
    noise = rng.standard_normal((1, 12, 16)).astype(np.float32)
    return torch_model, model, params, prompt, prompt_mask, negative, noise


def test_qwen_sampler_with_true_cfg_matches_the_diffusers_pipeline(save_diffusers, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch_model, model, params, prompt, prompt_mask, negative, noise = qwen_setup(save_diffusers, tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["qwen-image"]))
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=torch_model)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=torch.from_numpy(prompt), prompt_embeds_mask=torch.from_numpy(prompt_mask),
            negative_prompt_embeds=torch.from_numpy(negative), negative_prompt_embeds_mask=torch.ones(1, 4, dtype=torch.int64),
            true_cfg_scale=4.0, latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH,
            num_inference_steps=5, output_type="latent", return_dict=False,
        )[0].numpy()
    shapes = qwen_img_shapes(HEIGHT, WIDTH)
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "encoder_hidden_states_mask": jnp.asarray(prompt_mask), "img_shapes": shapes}
    neg = {"encoder_hidden_states": jnp.asarray(negative), "encoder_hidden_states_mask": jnp.ones((1, 4), jnp.int32), "img_shapes": shapes}

    for mode in ("batched", "sequential"):
        latents, _ = sample(model, params, jnp.asarray(noise), cond, SamplerConfig(num_steps=5, true_cfg_scale=4.0, cfg_mode=mode),
                            negative_cond=neg)
        assert relative_error(latents, ref) <= 1e-4, mode


def recording_reference_tokens(transformer, num_img: int) -> dict:
    """Wraps a diffusers transformer so that its first call keeps what the pipeline appended after
    its own num_img latent tokens (the encoded reference image) and the positions it passed."""
    seen, forward = {}, transformer.forward

    def recording(*args, hidden_states, **kwargs):
        if not seen:
            seen.update(reference=hidden_states[:, num_img:].numpy().copy(), img_shapes=kwargs.get("img_shapes"),
                        img_ids=kwargs.get("img_ids"))
        return forward(*args, hidden_states=hidden_states, **kwargs)

    transformer.forward = recording
    return seen


def test_qwen_image_edit_sampling_with_a_reference_image_matches_the_diffusers_pipeline(save_diffusers, tmp_path,
                                                                                        monkeypatch):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
    from PIL import Image

    # the pipeline resizes the reference to about 1024^2 pixels; 48^2 keeps the test quick
    resize = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: resize(48 * 48, ratio))

    from reference import randomize_
    from tiny_pipeline import QWEN_VAE_TINY

    torch_model, model, params, prompt, prompt_mask, negative, noise = qwen_setup(save_diffusers, tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["qwen-image"]))
    vae = randomize_(AutoencoderKLQwenImage(**QWEN_VAE_TINY).eval(), scale=0.05)
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=torch_model)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 64, 3), np.uint8))
    seen = recording_reference_tokens(torch_model, noise.shape[1])
    with torch.no_grad():
        ref = pipe(
            image=image, prompt_embeds=torch.from_numpy(prompt), prompt_embeds_mask=torch.from_numpy(prompt_mask),
            negative_prompt_embeds=torch.from_numpy(negative), negative_prompt_embeds_mask=torch.ones(1, 4, dtype=torch.int64),
            true_cfg_scale=4.0, latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH,
            num_inference_steps=3, output_type="latent", return_dict=False,
        )[0].numpy()
    segments = [qwen_img_shapes(HEIGHT, WIDTH), seen["img_shapes"][0][1]]  # the image generated, then the reference
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "encoder_hidden_states_mask": jnp.asarray(prompt_mask),
            "img_shapes": segments, "reference_latents": jnp.asarray(seen["reference"])}
    neg = {"encoder_hidden_states": jnp.asarray(negative), "encoder_hidden_states_mask": jnp.ones((1, 4), jnp.int32),
           "img_shapes": segments}

    latents, _ = sample(model, params, jnp.asarray(noise), cond, SamplerConfig(num_steps=3, true_cfg_scale=4.0),
                        negative_cond=neg)
    assert latents.shape == noise.shape and seen["reference"].shape[1] > 0
    assert relative_error(latents, ref) <= 1e-4


def test_flux_kontext_sampling_with_a_reference_image_matches_the_diffusers_pipeline(save_diffusers, tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
    from PIL import Image

    from reference import randomize_
    from tiny_pipeline import VAE_TINY

    torch_model, model, params, prompt, pooled, noise = flux_setup(save_diffusers, tmp_path, seed=4)
    scheduler = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["flux-dev"]))
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=randomize_(AutoencoderKL(**VAE_TINY).eval(), scale=0.05),
                               text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=torch_model)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (32, 80, 3), np.uint8))  # 2 x 5 packed tokens
    seen = recording_reference_tokens(torch_model, noise.shape[1])
    with torch.no_grad():
        ref = pipe(image=image, prompt_embeds=torch.from_numpy(prompt), pooled_prompt_embeds=torch.from_numpy(pooled),
                   latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=2.5,
                   max_area=HEIGHT * WIDTH, _auto_resize=False, output_type="latent", return_dict=False)[0].numpy()
    img_ids = np.concatenate([flux_img_ids(HEIGHT, WIDTH), flux_img_ids(32, 80, index=1)])
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "pooled_projections": jnp.asarray(pooled),
            "img_ids": jnp.asarray(img_ids), "txt_ids": jnp.asarray(flux_txt_ids(6)),
            "reference_latents": jnp.asarray(seen["reference"])}

    latents, _ = sample(model, params, jnp.asarray(noise), cond, SamplerConfig(num_steps=4, guidance_scale=2.5))
    np.testing.assert_array_equal(img_ids, seen["img_ids"].numpy())
    assert relative_error(latents, ref) <= 1e-4


def test_reference_latents_of_another_batch_or_width_are_one_clear_error(save_diffusers, tmp_path):
    torch_model, model, params, prompt, prompt_mask, negative, noise = qwen_setup(save_diffusers, tmp_path)
    segments = [qwen_img_shapes(HEIGHT, WIDTH), (1, 2, 2)]
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "encoder_hidden_states_mask": jnp.asarray(prompt_mask),
            "img_shapes": segments}
    for reference, message in ((np.zeros((2, 4, 16)), r"reference_latents have shape \(2, 4, 16\), expected packed \[1, M, 16\]"),
                               (np.zeros((1, 5, 16)), "latents and reference_latents hold 17 tokens but img_shapes")):
        with pytest.raises(ValueError, match=message):
            sample(model, params, jnp.asarray(noise), {**cond, "reference_latents": jnp.asarray(reference, jnp.float32)},
                   SamplerConfig(num_steps=1))


def small_flux(save_diffusers, tmp_path):
    torch_model = make_diffusers_flux(guidance_embeds=True, in_channels=16, num_layers=2, num_single_layers=2)
    model, params = load_converted("flux", torch_model, save_diffusers, tmp_path)
    rng = np.random.default_rng(1)
    cond = {"encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32),
            "pooled_projections": jnp.asarray(rng.standard_normal((2, 32)), jnp.float32),
            "img_ids": jnp.asarray(flux_img_ids(HEIGHT, WIDTH)), "txt_ids": jnp.asarray(flux_txt_ids(6))}
    noise = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
    return model, params, cond, noise


@pytest.mark.parametrize(
    "elastic",
    [ElasticConfig(mode="forced"), ElasticConfig(mode="infer", decision="sample", cache=True, cache_start=0, delta_margin=0.0)],
    ids=["all-forced-on-cache-off", "fresh-routers-cache-margin-0"],
)
def test_elastic_sampler_with_every_block_on_equals_the_dense_sampler(elastic, save_diffusers, tmp_path):
    model, params, cond, noise = small_flux(save_diffusers, tmp_path)
    routers = init_routers(model.config)
    sampler = SamplerConfig(num_steps=4)
    dense, _ = sample(model, params, noise, cond, sampler)

    all_on = {"run": jnp.ones(4, bool), "bucket": jnp.full(4, 3)} if elastic.mode == "forced" else None
    latents, records = sample(model, params, noise, cond, sampler, routers=routers, elastic=elastic, decisions=all_on)

    # equal to float32 rounding: XLA fuses the ops inside a switch branch differently, not bit for bit
    np.testing.assert_allclose(latents, dense, rtol=0, atol=1e-6 * float(jnp.abs(dense).max()))
    assert records["executed"].all() and not records["cache_hit"].any()


def test_a_user_written_heun_sampler_runs_on_the_pure_velocity_function(save_diffusers, tmp_path):
    from edit_jax.sampling.sampler import init_state, make_velocity_fn

    model, params, cond, noise = small_flux(save_diffusers, tmp_path)
    cond = {**cond, "guidance": jnp.full((2,), 3.5)}
    elastic = ElasticConfig(mode="infer", cache=True, cache_start=2)
    f = make_velocity_fn(model, params, init_routers(model.config), elastic)
    state = init_state(model.config, elastic, batch=2, num_img=12, num_txt=6)
    sigmas = jnp.linspace(1.0, 0.0, 5)

    def heun_step(i, carry):
        x, state = carry
        v, state = f(x, jnp.full((2,), sigmas[i]), cond, state)
        x_euler = x + (sigmas[i + 1] - sigmas[i]) * v
        v_next, state = f(x_euler, jnp.full((2,), sigmas[i + 1]), cond, state)
        return x + (sigmas[i + 1] - sigmas[i]) * 0.5 * (v + v_next), state

    x, state = jax.jit(lambda x, state: jax.lax.fori_loop(0, 4, heun_step, (x, state)))(noise, state)
    assert x.shape == noise.shape and np.isfinite(np.asarray(x)).all()
    assert int(state["step"]) == 8 and bool(state["cache"]["transformer_blocks"].stored.all())


def test_bad_sampling_inputs_are_clear_errors(save_diffusers, tmp_path):
    model, params, cond, noise = small_flux(save_diffusers, tmp_path)
    with pytest.raises(ValueError, match=r"latents hold 16 tokens but img_ids has 12 \(wrong resolution\?\)"):
        sample(model, params, jnp.zeros((2, 16, 16)), cond, SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number, got nan"):
        SamplerConfig(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="routers were given but the elastic mode is dense, so they would not run"):
        sample(model, params, noise, cond, SamplerConfig(num_steps=2), routers=init_routers(model.config))
    with pytest.raises(ValueError, match="prompt embeddings have width 31, the model expects 32"):
        sample(model, params, noise, {**cond, "encoder_hidden_states": jnp.zeros((2, 6, 31))}, SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="true_cfg_scale 4.0 > 1 needs negative prompt embeddings"):
        sample(model, params, noise, cond, SamplerConfig(num_steps=2, true_cfg_scale=4.0))
    with pytest.raises(ValueError, match=r"latents have shape \(2, 12, 8\), expected packed \[B, N, 16\]"):
        sample(model, params, jnp.zeros((2, 12, 8)), cond, SamplerConfig(num_steps=2))


@pytest.mark.parametrize("preset", ["flux-tiny", "qwen-image-tiny"])
def test_every_prompt_array_must_hold_one_row_per_sample(preset):
    from edit_jax.sampling.sampler import make_conditions

    config = edit_jax.preset(preset)
    model, params = edit_jax.build_model(config), edit_jax.models.init_params(config)
    noise = jnp.zeros((2, 16, config.in_channels))
    flux = preset.startswith("flux")

    def cond(prompts, side_rows=None):
        side = np.ones((side_rows or prompts, config.pooled_projection_dim if flux else 5), np.float32)
        return make_conditions(config, np.ones((prompts, 5, config.joint_attention_dim), np.float32), 64, 64,
                               side if flux else None, None if flux else side)

    with pytest.raises(ValueError, match="prompt embeddings hold 3 prompts but the latents 2 samples"):
        sample(model, params, noise, cond(3), SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="negative prompt embeddings hold 1 prompts but the latents 2 samples"):
        sample(model, params, noise, cond(2), SamplerConfig(num_steps=2, true_cfg_scale=4.0), negative_cond=cond(1))
    side = "pooled_projections" if flux else "encoder_hidden_states_mask"
    with pytest.raises(ValueError, match=rf"prompt {side} has shape \(3, \d+\), expected \[2, \d+\]"):
        sample(model, params, noise, cond(2, side_rows=3), SamplerConfig(num_steps=2))


def test_flux_true_cfg_matches_the_diffusers_pipeline(save_diffusers, tmp_path):
    torch_model = make_diffusers_flux(guidance_embeds=False, in_channels=16)
    model, params = load_converted("flux", torch_model, save_diffusers, tmp_path)
    rng = np.random.default_rng(2)
    prompt, negative = (rng.standard_normal((1, 6, 32)).astype(np.float32) for _ in range(2))
    pooled, neg_pooled = (rng.standard_normal((1, 32)).astype(np.float32) for _ in range(2))
    noise = rng.standard_normal((1, 12, 16)).astype(np.float32)
    with torch.no_grad():
        ref = flux_pipeline(torch_model, schnell=True)(
            prompt_embeds=torch.from_numpy(prompt), pooled_prompt_embeds=torch.from_numpy(pooled),
            negative_prompt_embeds=torch.from_numpy(negative), negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled),
            true_cfg_scale=3.0, latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH, num_inference_steps=4,
            output_type="latent", return_dict=False,
        )[0].numpy()
    ids = {"img_ids": jnp.asarray(flux_img_ids(HEIGHT, WIDTH)), "txt_ids": jnp.asarray(flux_txt_ids(6))}
    cond = {"encoder_hidden_states": jnp.asarray(prompt), "pooled_projections": jnp.asarray(pooled), **ids}
    neg = {"encoder_hidden_states": jnp.asarray(negative), "pooled_projections": jnp.asarray(neg_pooled), **ids}

    latents, _ = sample(model, params, jnp.asarray(noise), cond, SamplerConfig(num_steps=4, true_cfg_scale=3.0), negative_cond=neg)

    assert relative_error(latents, ref) <= 1e-4


def test_sequential_true_cfg_with_routers_records_both_branches(save_diffusers, tmp_path):
    model, params, cond, noise = small_flux(save_diffusers, tmp_path)
    routers = init_routers(model.config)
    sampler = SamplerConfig(num_steps=2, true_cfg_scale=2.0, cfg_mode="sequential")

    _, records = sample(model, params, noise, cond, sampler, routers=routers, elastic=ElasticConfig(mode="infer"),
                        negative_cond=cond)

    assert records["executed"].shape == (2, 2 * noise.shape[0], 4)
    assert records["flops_total"].shape == (2,)


def test_the_velocity_function_jits_with_qwen_conditions_and_takes_params_as_arguments():
    from edit_jax.sampling.sampler import init_state, make_conditions, velocity_fn

    config = edit_jax.preset("qwen-image-tiny")
    variables = edit_jax.models.init_variables(config)
    model = edit_jax.build_model(config)
    cond = make_conditions(config, np.ones((1, 4, config.joint_attention_dim), np.float32), 64, 48)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 12, config.in_channels)), jnp.float32)
    elastic = ElasticConfig(mode="infer")
    g = velocity_fn(model, elastic)
    state = init_state(config, elastic, 1, 12, 4)

    v, _ = jax.jit(g)(variables["params"], variables["routers"], x, jnp.full((1,), 0.5), cond, state)
    grads = jax.grad(lambda r: jnp.sum(g(variables["params"], r, x, jnp.full((1,), 0.5), cond, state)[0]))(variables["routers"])

    assert v.shape == x.shape
    assert jax.tree.structure(grads) == jax.tree.structure(variables["routers"])


def test_an_explicit_step_decides_when_the_cache_starts():
    from edit_jax.sampling.sampler import init_state, make_velocity_fn

    config = edit_jax.preset("qwen-image-tiny")
    variables = edit_jax.models.init_variables(config)
    model = edit_jax.build_model(config)
    cond = {"encoder_hidden_states": jnp.ones((1, 4, config.joint_attention_dim)),
            "encoder_hidden_states_mask": jnp.ones((1, 4), jnp.int32), "img_shapes": (1, 4, 3)}
    x = jnp.zeros((1, 12, config.in_channels))
    elastic = ElasticConfig(mode="infer", cache=True, cache_start=3)
    f = make_velocity_fn(model, variables["params"], variables["routers"], elastic)
    state = init_state(config, elastic, 1, 12, 4)

    _, before = f(x, jnp.full((1,), 0.5), cond, state, step=2)
    _, after = f(x, jnp.full((1,), 0.5), cond, state, step=3)

    assert not before["cache"]["transformer_blocks"].stored.any()
    assert after["cache"]["transformer_blocks"].stored.all()
    assert int(after["step"]) == 4


def test_sampling_with_routers_equals_a_step_loop_whose_calls_compute_their_own_modulations():
    from edit_jax.models.registry import init_variables
    from edit_jax.sampling.sampler import default_scheduler, init_state, make_conditions, make_velocity_fn
    from edit_jax.sampling.schedules import flow_match_schedule

    config = edit_jax.preset("flux-tiny")
    model, variables = edit_jax.build_model(config), init_variables(config)
    routers = jax.tree.map(lambda x: x, variables["routers"])
    for stack in routers.values():
        stack["router"]["gate_head"]["kernel"] *= 300.0  # p follows each step's modulation, some near tau
    rng = np.random.default_rng(0)
    cond = make_conditions(config, rng.standard_normal((1, 4, config.joint_attention_dim)), HEIGHT, WIDTH,
                           rng.standard_normal((1, config.pooled_projection_dim)))
    noise = jnp.asarray(rng.standard_normal((1, 12, config.in_channels)), jnp.float32)
    elastic = ElasticConfig(mode="infer", cache=True, cache_start=1, delta_margin=0.2)

    latents, records = sample(model, variables["params"], noise, cond, SamplerConfig(num_steps=3), routers=routers,
                              elastic=elastic)

    sigmas, timesteps = flow_match_schedule(default_scheduler(config), 3, 12)
    f = jax.jit(make_velocity_fn(model, variables["params"], routers, elastic, return_aux=True))
    x, state = noise, init_state(config, elastic, 1, 12, 4)
    for i in range(3):
        v, state, aux = f(x, jnp.full((1,), timesteps[i] / 1000), cond, state)
        np.testing.assert_allclose(records["p"][i], aux["p"], rtol=1e-6)
        np.testing.assert_array_equal(records["cache_hit"][i], aux["cache_hit"])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    assert not np.all(records["p"] == records["p"][0])  # the routers' modulation changed with the step
    assert records["cache_hit"].any() and not records["cache_hit"].all()
    assert relative_error(latents, x) <= 1e-5


@pytest.mark.parametrize("elastic", [None, ElasticConfig(mode="infer", cache=True)], ids=["dense", "routers and cache"])
def test_the_sampling_loop_reads_no_modulation_kernel_in_its_steps(elastic):
    from edit_jax.models.registry import init_variables
    from edit_jax.sampling.sampler import make_conditions

    config = dataclasses.replace(edit_jax.preset("flux-tiny"), mlp_ratio=2.0)  # no MLP width is 3D or 6D wide
    model, variables = edit_jax.build_model(config), init_variables(config)
    rng = np.random.default_rng(0)
    cond = make_conditions(config, rng.standard_normal((1, 4, config.joint_attention_dim)), HEIGHT, WIDTH,
                           rng.standard_normal((1, config.pooled_projection_dim)))
    noise = jnp.asarray(rng.standard_normal((1, 12, config.in_channels)), jnp.float32)
    routers = variables["routers"] if elastic is not None else None  # dense sampling takes none
    closed = jax.make_jaxpr(lambda p, r: sample(model, p, noise, cond, SamplerConfig(num_steps=3), routers=r,
                                                elastic=elastic)[0])(variables["params"], routers)
    d = config.inner_dim

    def kernels(jaxpr, in_step):  # the shapes of every dot's operands, and whether it is in the step loop
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield in_step, {tuple(v.aval.shape[-2:]) for v in eqn.invars}
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from kernels(sub, in_step or eqn.primitive.name == "scan")

    modulation = {(d, 6 * d), (d, 3 * d)}  # the blocks' AdaLN (and the routers' own) kernels
    found = list(kernels(closed.jaxpr, False))
    assert any(not in_step and shapes & modulation for in_step, shapes in found)  # computed ahead
    assert not [shapes for in_step, shapes in found if in_step and shapes & modulation]


def test_step_schedules_of_one_shape_share_one_compiled_loop_and_each_gives_its_own_samples():
    config = edit_jax.preset("flux-tiny")
    model, params = edit_jax.build_model(config), init_variables(config)["params"]
    rng = np.random.default_rng(0)
    cond = make_conditions(config, rng.standard_normal((1, 4, config.joint_attention_dim)), HEIGHT, WIDTH,
                           rng.standard_normal((1, config.pooled_projection_dim)))
    noise = jnp.asarray(rng.standard_normal((1, 12, config.in_channels)), jnp.float32)
    steps, blocks, full = 3, config.num_blocks, len(config.width_buckets) - 1
    every = ScheduleDecisions(jnp.ones((steps, blocks), bool), jnp.full((steps, blocks), full, jnp.int32))
    half = ScheduleDecisions(jnp.asarray(np.arange(steps * blocks).reshape(steps, blocks) % 2 == 0),
                             jnp.full((steps, blocks), full, jnp.int32))
    run = lambda decisions: sample(model, params, noise, cond, SamplerConfig(num_steps=steps),  # noqa: E731
                                   elastic=ElasticConfig(mode="forced"), decisions=decisions)
    sampler_module._runner.cache_clear()

    dense, _ = sample(model, params, noise, cond, SamplerConfig(num_steps=steps))
    (all_on, all_records), (halved, half_records) = run(every), run(half)
    assert sampler_module._runner.cache_info().currsize == 2  # dense, and one loop for both schedules
    np.testing.assert_allclose(all_on, dense, rtol=1e-5, atol=1e-6)
    assert np.asarray(all_records["executed"]).all()
    np.testing.assert_array_equal(np.asarray(half_records["executed"])[:, 0], np.asarray(half.run))
    assert relative_error(halved, dense) > 1e-3
