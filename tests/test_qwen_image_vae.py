"""Qwen-Image's VAE in Flax against diffusers' AutoencoderKLQwenImage on single frames (tiny
random config, CPU, float32)."""


import jax
import numpy as np
import pytest
import torch

from edit_jax.checkpoints_convert.engine import ConversionError, build_params
from edit_jax.checkpoints_convert.sources import from_state_dict
from edit_jax.checkpoints_convert.vae import load_vae, vae_table
from edit_jax.checkpoint import flatten
from edit_jax.models.qwen_image_vae import AutoencoderKLQwenImage, AutoencoderKLQwenImageConfig
from reference import randomize_, relative_error

# two downsamplings (4x), one of them temporal (a held time_conv)
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKLQwenImage as TorchVAE

    torch.manual_seed(0)
    vae = randomize_(TorchVAE(**TINY).eval(), scale=0.05)  # RMS gammas start at one, biases at zero
    folder = tmp_path_factory.mktemp("qwen-vae")
    vae.save_pretrained(folder)
    return vae, folder


@pytest.fixture(scope="module")
def ours(tiny_vae):
    return load_vae(tiny_vae[1])


def test_the_config_is_read_by_its_class_name(ours):
    config, _ = ours
    assert isinstance(config, AutoencoderKLQwenImageConfig)
    assert config.downscale == 4 and config.latent_channels == 4


def test_encode_matches_diffusers_on_one_frame(tiny_vae, ours):
    vae, _ = tiny_vae
    config, params = ours
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 12)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images)[:, :, None]).latent_dist
    mean, logvar = AutoencoderKLQwenImage(config).apply({"params": params}, images, method="encode")
    assert mean.shape == (2, 4, 4, 3)
    assert relative_error(mean, dist.mean[:, :, 0].numpy()) <= 1e-5
    assert relative_error(logvar, dist.logvar[:, :, 0].numpy()) <= 1e-5


def test_decode_matches_diffusers_on_one_frame(tiny_vae, ours):
    vae, _ = tiny_vae
    config, params = ours
    z = 4 * np.random.default_rng(1).standard_normal((2, 4, 5, 4)).astype(np.float32)  # large enough to clamp
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)[:, :, None]).sample[:, :, 0].numpy()
    mine = AutoencoderKLQwenImage(config).apply({"params": params}, z, method="decode")
    assert mine.shape == (2, 3, 20, 16) and relative_error(mine, theirs) <= 1e-5
    assert np.abs(theirs).max() == 1.0  # the clamp to [-1, 1] is exercised


def test_model_latents_are_the_pipelines_per_channel_normalisation(ours):
    config, _ = ours
    z = np.random.default_rng(2).standard_normal((1, 4, 3, 3)).astype(np.float32)
    mean = np.array(TINY["latents_mean"], np.float32)[None, :, None, None]
    inverse_std = 1.0 / np.array(TINY["latents_std"], np.float32)[None, :, None, None]
    np.testing.assert_allclose(config.to_model_latents(z), (z - mean) * inverse_std, rtol=1e-6)  # img2img's encode
    np.testing.assert_allclose(config.from_model_latents(z), z / inverse_std + mean, rtol=1e-6)  # the pipeline's decode


def test_the_table_reads_back_to_the_diffusers_state_dict(tiny_vae, ours):
    vae, _ = tiny_vae
    _, params = ours
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    table = vae_table(params)
    assert {src.key for src in table.values()} == set(state)  # time_conv included: nothing dropped
    for path, value in flatten(params).items():
        np.testing.assert_array_equal(table[path].unapply(np.asarray(value)), state[table[path].key])


def test_a_vae_of_other_shapes_is_one_error_naming_the_tensors(tiny_vae, ours):
    vae, _ = tiny_vae
    _, params = ours
    state = dict(vae.state_dict())
    state.pop("decoder.conv_out.bias")
    state["encoder.mid_block.attentions.0.norm.gamma"] = torch.ones(8, 1, 1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*decoder\.conv_out\.bias.*"
                                              r"encoder\.mid_block\.attentions\.0\.norm\.gamma"):
        build_params(vae_table(abstract), from_state_dict(state), abstract)


def test_tiled_decode_matches_diffusers_tiled_decode(tiny_vae, ours):
    from edit_jax.models.vae import decode_tiled

    vae, _ = tiny_vae
    config, params = ours
    z = np.random.default_rng(3).standard_normal((1, 4, 20, 14)).astype(np.float32)
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    try:
        with torch.no_grad():
            theirs = vae.decode(torch.from_numpy(z)[:, :, None]).sample[:, :, 0].numpy()
    finally:
        vae.disable_tiling()
    mine = decode_tiled(config, params, z, tile_size=32)
    assert mine.shape == theirs.shape == (1, 3, 80, 56)
    assert relative_error(mine, np.clip(theirs, -1, 1)) <= 1e-5  # the pipeline clamps diffusers' tiles after blending


def test_another_vae_class_is_one_clear_error(tmp_path):
    from edit_jax.checkpoints_convert.vae import vae_config

    with pytest.raises(ValueError, match="vae class 'AutoencoderKLWan' is not supported"):
        vae_config({"_class_name": "AutoencoderKLWan"})
    with pytest.raises(ValueError, match="latents_mean has 2 entries for z_dim 4"):
        AutoencoderKLQwenImageConfig.from_diffusers({**TINY, "latents_mean": [0.0, 0.0]})
    with pytest.raises(ValueError, match=r"attn_scales \(0.5,\): only \[\]"):
        AutoencoderKLQwenImageConfig.from_diffusers({**TINY, "attn_scales": [0.5]})
