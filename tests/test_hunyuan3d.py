"""Hunyuan3D-2's shape DiT: the Flax model equals hy3dgen's `Hunyuan3DDiT` (float32, tiny random
configs, with and without the guidance embedding) through the converter's table, whole denoising
runs equal `Hunyuan3DDiTFlowMatchingPipeline`'s loop (CFG and guidance-distilled), and it runs the
elastic mechanism, FLOPs accounting and caches of the other families."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import hy3dgen_shapegen, make_hy3dgen_dit, randomize_, relative_error

import edit_jax
from edit_jax.checkpoints_convert.engine import ConversionError, build_params
from edit_jax.checkpoints_convert.hunyuan3d import dit_table
from edit_jax.checkpoints_convert.sources import from_state_dict
from edit_jax.cli import main
from edit_jax.config import ConfigError, Hunyuan3DConfig
from edit_jax.elastic import ElasticConfig, FirstBlockCache, TaylorSeer
from edit_jax.models.registry import (abstract_params, build_model, example_inputs, init_routers, init_step_cache,
                                      jit_forward)
from edit_jax.models.shape_vae import ShapeVAE
from edit_jax.sampling.sampler import SamplerConfig, sample
from edit_jax.train.step import data_target, model_time

TINY = edit_jax.preset("hunyuan3d-tiny")


def converted(torch_model, config):
    return build_params(dit_table(config), from_state_dict(torch_model.state_dict()), abstract_params(config))


def hy3dgen_velocity(torch_model, inputs: dict) -> np.ndarray:
    kwargs = {"guidance": torch.from_numpy(np.array(inputs["guidance"]))} if "guidance" in inputs else {}
    with torch.no_grad():
        out = torch_model(torch.from_numpy(np.array(inputs["hidden_states"])), torch.from_numpy(np.array(inputs["timestep"])),
                          {"main": torch.from_numpy(np.array(inputs["encoder_hidden_states"]))}, **kwargs)
    return out.numpy()


def forward(model, params, inputs):
    """Our velocity, jitted: one compiled program (op by op, it took longer than compiling)."""
    jitted, arrays = jit_forward(model, inputs)
    return jitted(params, arrays)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_dit_matches_hy3dgen(guidance_embeds):
    config = TINY.replace(guidance_embeds=guidance_embeds)
    torch_model = make_hy3dgen_dit(guidance_embed=guidance_embeds)
    params = converted(torch_model, config)
    inputs = example_inputs(config, batch=2, height=3, width=4, num_txt=5)

    velocity = forward(build_model(config), params, inputs)

    assert velocity.shape == inputs["hidden_states"].shape
    assert relative_error(velocity, hy3dgen_velocity(torch_model, inputs)) <= 1e-5


def test_release_config_is_the_dit_presets():
    assert edit_jax.preset("hunyuan3d-2").inner_dim == 1024 and edit_jax.preset("hunyuan3d-2").num_blocks == 48
    assert edit_jax.preset("hunyuan3d-2").joint_attention_dim == 1536


def test_every_dit_block_runs_elastic_and_a_closed_pattern_changes_the_velocity_and_cuts_flops():
    config = TINY
    params = converted(make_hy3dgen_dit(), config)
    inputs = example_inputs(config, batch=1, height=2, width=4, num_txt=5)
    model = build_model(config)
    forced = jax.jit(lambda run, bucket: model.apply({"params": params}, **inputs, elastic=ElasticConfig(mode="forced"),
                                                     decisions={"run": run, "bucket": bucket}))
    dense, dense_aux = forced(jnp.ones(4, bool), jnp.full(4, 3))
    skipped, aux = forced(jnp.array([True, False, True, False]), jnp.full(4, 1))

    np.testing.assert_allclose(dense, forward(model, params, inputs), rtol=1e-5, atol=1e-6)
    assert relative_error(skipped, dense) > 1e-3
    assert np.asarray(aux["executed"]).tolist() == [[1, 0, 1, 0]]
    assert float(aux["flops"]["total"].sum()) < 0.6 * float(dense_aux["flops"]["total"].sum())


def test_routers_and_the_first_block_cache_run_on_the_dit():
    config = TINY
    params = converted(make_hy3dgen_dit(), config)
    inputs = example_inputs(config, batch=2, height=2, width=4, num_txt=5)
    method = FirstBlockCache(10.0)
    elastic = ElasticConfig(mode="infer", step_cache=method)
    variables = {"params": params, "routers": init_routers(config)}
    call = jax.jit(lambda state, step: build_model(config).apply(variables, **inputs, elastic=elastic, step_cache=state,
                                                                  step=step)[1])
    aux = call(init_step_cache(config, 2, 8, 5, method), 0)
    aux = call(aux["step_cache"], 1)

    assert np.asarray(aux["p"]).shape == (2, 4)
    assert not np.asarray(aux["step_computed"]).any()  # the same inputs again: the stored residual is reused


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="qkv_bias=False is not implemented"):
        Hunyuan3DConfig(qkv_bias=False)
    inputs = example_inputs(TINY, batch=1, height=2, width=2, num_txt=3)
    params = converted(make_hy3dgen_dit(), TINY)
    with pytest.raises(ValueError, match="encoder_hidden_states has shape .* expected \\[1, T, 24\\] \\(image features\\)"):
        build_model(TINY).apply({"params": params}, **{**inputs, "encoder_hidden_states": jnp.zeros((1, 3, 7))})
    with pytest.raises(ValueError, match="no guidance embedding"):
        build_model(TINY).apply({"params": params}, **inputs, guidance=jnp.ones((1,)))


def test_a_flux_state_dict_is_not_a_hunyuan3d_dit():
    from reference import make_diffusers_flux

    flux = make_diffusers_flux()
    with pytest.raises(ConversionError, match="does not match the model config") as error:
        build_params(dit_table(TINY), from_state_dict(flux.state_dict()), abstract_params(TINY))
    assert "cond_in.weight" in str(error.value) and "context_embedder.weight" in str(error.value)


def hy3dgen_denoising(torch_model, features: np.ndarray, latent_shape: tuple, steps: int, guidance_scale: float, seed: int):
    """(noise, latents) of Hunyuan3DDiTFlowMatchingPipeline's denoising loop on the tiny DiT, its
    image encoder's output given as `features` [B, T, C] (and zeros unconditionally, as DINOv2's
    unconditional embedding is) and its latents drawn from `seed` as the pipeline draws them."""
    pipelines, schedulers = hy3dgen_shapegen("pipelines"), hy3dgen_shapegen("schedulers")
    main = torch.from_numpy(features)

    class Conditioner(torch.nn.Module):
        def forward(self, image, **_):
            return {"main": main}

        def unconditional_embedding(self, batch, **_):
            return {"main": torch.zeros_like(main)}

    class Latents(torch.nn.Module):
        pass

    vae = Latents()
    vae.latent_shape = latent_shape
    pipe = pipelines.Hunyuan3DDiTFlowMatchingPipeline(
        vae=vae, model=torch_model, scheduler=schedulers.FlowMatchEulerDiscreteScheduler(), conditioner=Conditioner(),
        image_processor=lambda image: {"image": torch.zeros(1, 3, 2, 2)}, device="cpu", dtype=torch.float32)
    noise = torch.randn((len(features), *latent_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        latents = pipe(image=[None] * len(features), num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(seed), output_type="latent", enable_pbar=False)
    return noise.numpy(), latents.numpy()


@pytest.mark.parametrize("guidance_embeds, steps", [(False, 6), (True, 4)])
def test_denoising_loop_matches_hy3dgens_flow_matching_pipeline(guidance_embeds, steps):
    config = TINY.replace(guidance_embeds=guidance_embeds)
    torch_model = make_hy3dgen_dit(guidance_embed=guidance_embeds)
    features = np.random.default_rng(3).standard_normal((2, 5, config.joint_attention_dim)).astype(np.float32)
    noise, ref = hy3dgen_denoising(torch_model, features, (12, config.in_channels), steps, 5.0, seed=0)
    cond, negative = ({"encoder_hidden_states": jnp.asarray(f)} for f in (features, np.zeros_like(features)))
    sampler = (SamplerConfig(num_steps=steps, guidance_scale=5.0) if guidance_embeds
               else SamplerConfig(num_steps=steps, true_cfg_scale=5.0))

    latents, _ = sample(build_model(config), converted(torch_model, config), jnp.asarray(noise), cond, sampler,
                        negative_cond=None if guidance_embeds else negative)

    assert relative_error(latents, ref) <= 1e-4


def test_sampling_shapes_with_routers_per_sample_decisions_and_a_step_cache():
    config = TINY
    features = np.random.default_rng(4).standard_normal((2, 5, config.joint_attention_dim)).astype(np.float32)
    cond, negative = ({"encoder_hidden_states": jnp.asarray(f)} for f in (features, np.zeros_like(features)))
    noise = jax.random.normal(jax.random.key(0), (2, 12, config.in_channels))
    elastic = ElasticConfig(mode="infer", decision="sample", step_cache=TaylorSeer(cache_interval=2, disable_cache_before_step=2))

    latents, records = sample(build_model(config), converted(make_hy3dgen_dit(), config), noise, cond,
                              SamplerConfig(num_steps=6, true_cfg_scale=5.0), routers=init_routers(config),
                              elastic=elastic, negative_cond=negative)

    assert np.isfinite(latents).all() and latents.shape == noise.shape
    assert np.asarray(records["step_computed"])[:, 0].tolist() == [1, 1, 0, 1, 0, 1]
    assert np.asarray(records["p"]).shape == (6, 4, 4)  # steps, conditional + unconditional rows, blocks


SHAPE_VAE = dict(num_latents=12, embed_dim=8, width=32, heads=2, num_decoder_layers=2, num_freqs=4, qkv_bias=False,
                 qk_norm=True, scale_factor=0.9)


def release_folder(folder, file_type: str = "safetensors", parts=("model", "vae", "conditioner")):
    """A tiny Hunyuan3D-2 release folder: config.yaml and one weight file of model.*, vae.* and
    conditioner.* tensors (the layout hy3dgen's from_single_file reads); returns its DiT and VAE."""
    import yaml
    from safetensors.torch import save_file

    dit = make_hy3dgen_dit()
    torch.manual_seed(1)
    vae = randomize_(hy3dgen_shapegen("models.autoencoders").ShapeVAE(**SHAPE_VAE).eval(), 1)
    config = {
        "model": {"target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
                  "params": dict(in_channels=8, context_in_dim=24, hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2,
                                 depth_single_blocks=2, axes_dim=[16], theta=10000, qkv_bias=True, guidance_embed=False)},
        "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": SHAPE_VAE},
        "conditioner": {"target": "hy3dgen.shapegen.models.SingleImageEncoder", "params": {}},
        "image_processor": {"target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2", "params": {"size": 512}},
        "scheduler": {"target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                      "params": {"num_train_timesteps": 1000}},
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    state = {"model": dit.state_dict(), "vae": vae.state_dict(),
             "conditioner": {"main_image_encoder.model.embeddings.cls_token": torch.zeros(1, 1, 24)}}
    state = {k: {n: t.contiguous() for n, t in v.items()} for k, v in state.items() if k in parts}
    if file_type == "safetensors":
        save_file({f"{k}.{n}": t for k, v in state.items() for n, t in v.items()}, folder / "model.fp16.safetensors")
    else:
        torch.save(state, folder / "model.fp16.ckpt")
    return dit, vae


@pytest.mark.parametrize("file_type", ["safetensors", "ckpt"])
def test_convert_a_release_folder_then_load_the_dit_and_the_shape_vae(file_type, tmp_path, capsys):

    dit, vae = release_folder(tmp_path / "release", file_type)
    assert main(["convert", "hunyuan3d", str(tmp_path / "release"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    model, params = edit_jax.load(tmp_path / "ckpt")
    vae_config, vae_params = edit_jax.load_shape_vae(tmp_path / "ckpt")
    inputs = example_inputs(model.config, batch=1, height=2, width=3, num_txt=4)
    x = np.random.default_rng(0).standard_normal((1, 12, 8)).astype(np.float32)

    assert relative_error(forward(model, params, inputs), hy3dgen_velocity(dit, inputs)) <= 1e-5
    with torch.no_grad():
        ref = vae(1.0 / vae_config.scale_factor * torch.from_numpy(x)).numpy()
    assert relative_error(ShapeVAE(vae_config).apply({"params": vae_params}, jnp.asarray(x), method=ShapeVAE.decode), ref) <= 1e-5
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "shape_vae (" in capsys.readouterr().out


def test_a_release_without_its_vae_or_a_folder_of_another_family_is_a_clear_error(tmp_path, capsys):
    from reference import make_diffusers_flux


    release_folder(tmp_path / "no-vae", parts=("model", "conditioner"))
    assert main(["convert", "hunyuan3d", str(tmp_path / "no-vae"), str(tmp_path / "out")]) == 2
    assert "missing keys" in (err := capsys.readouterr().err) and "vae.geo_decoder.ln_post.weight" in err
    make_diffusers_flux().save_pretrained(tmp_path / "flux")
    assert main(["convert", "hunyuan3d", str(tmp_path / "flux"), str(tmp_path / "out")]) == 2
    assert "is not a Hunyuan3D-2 release folder: no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_training_reads_hunyuan3d_time_as_its_pipeline_runs_it():

    s, x0, noise = jnp.array([0.0, 0.25, 1.0]), jnp.ones((3, 2, 2)), jnp.zeros((3, 2, 2))
    # x_t = (1 - s) x0 + s noise: hy3dgen's time t = 1 - s runs from noise (0) to data (1), d x_t / d t = x0 - noise
    np.testing.assert_array_equal(model_time(TINY, s), 1 - s)
    np.testing.assert_array_equal(data_target(TINY, x0, noise), x0 - noise)
    flux = edit_jax.preset("flux-tiny")
    np.testing.assert_array_equal(model_time(flux, s), s)
    np.testing.assert_array_equal(data_target(flux, x0, noise), noise - x0)


def test_export_back_to_a_release_folder_gives_the_release_tensors_and_converts_again(tmp_path, capsys):
    import yaml
    from safetensors.numpy import load_file


    release_folder(tmp_path / "release")
    assert main(["convert", "hunyuan3d", str(tmp_path / "release"), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "exported")]) == 0
    original = load_file(tmp_path / "release" / "model.fp16.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")

    assert set(exported) == {k for k in original if not k.startswith("conditioner.")}
    for key, tensor in exported.items():
        np.testing.assert_array_equal(tensor, original[key], err_msg=key)
    config = yaml.safe_load((tmp_path / "exported" / "config.yaml").read_text())
    assert config["model"]["params"]["depth"] == 2 and config["vae"]["params"]["num_latents"] == 12
    assert config["scheduler"]["target"].endswith("FlowMatchEulerDiscreteScheduler")
    assert main(["convert", "hunyuan3d", str(tmp_path / "exported"), str(tmp_path / "again"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--format", "diffusers"]) == 2
    assert "a hunyuan3d checkpoint exports as release, not 'diffusers'" in capsys.readouterr().err
