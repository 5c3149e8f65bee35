"""FLUX.1's VAE in Flax against diffusers' AutoencoderKL (tiny random config, CPU, float32)."""

import jax
import numpy as np
import pytest
import torch

from edit_jax.checkpoints_convert.sources import from_state_dict
from edit_jax.checkpoints_convert.engine import build_params, ConversionError
from edit_jax.checkpoints_convert.vae import load_vae, vae_table
from edit_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
            norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False)


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    kinds = len(TINY["block_out_channels"])
    vae = TorchAutoencoderKL(**TINY, down_block_types=("DownEncoderBlock2D",) * kinds,
                             up_block_types=("UpDecoderBlock2D",) * kinds).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every tensor non-trivial
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return vae, folder


@pytest.fixture(scope="module")
def ours(tiny_vae):
    _, folder = tiny_vae
    config, params = load_vae(folder)
    return config, params


def test_encode_matches_diffusers(tiny_vae, ours):
    vae, _ = tiny_vae
    config, params = ours
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 24)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = AutoencoderKL(config).apply({"params": params}, images, method="encode")
    assert rel_err(mean, dist.mean) <= 1e-5 and rel_err(logvar, dist.logvar) <= 1e-5


def test_decode_matches_diffusers(tiny_vae, ours):
    vae, _ = tiny_vae
    config, params = ours
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 6)).astype(np.float32)
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)).sample
    mine = AutoencoderKL(config).apply({"params": params}, z, method="decode")
    assert mine.shape == (2, 3, 32, 24) and rel_err(mine, theirs) <= 1e-5


def test_model_latents_are_the_pipelines_shift_and_scale_and_invert():
    config = AutoencoderKLConfig(**TINY)
    z = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(config.to_model_latents(z), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(config.from_model_latents(config.to_model_latents(z)), z, rtol=1e-5, atol=1e-6)


def test_the_table_reads_back_to_the_diffusers_state_dict(tiny_vae, ours):
    vae, _ = tiny_vae
    _, params = ours
    from edit_jax.checkpoint import flatten

    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    table = vae_table(params)
    assert {src.key for src in table.values()} == set(state)
    for path, value in flatten(params).items():
        np.testing.assert_array_equal(table[path].unapply(np.asarray(value)), state[table[path].key])


def test_a_vae_of_other_shapes_is_one_error_naming_the_tensors(tiny_vae, ours):
    vae, _ = tiny_vae
    config, params = ours
    state = dict(vae.state_dict())
    state.pop("decoder.conv_out.bias")
    state["encoder.conv_in.weight"] = torch.zeros(8, 3, 5, 5)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*decoder\.conv_out\.bias.*encoder\.conv_in\.weight"):
        build_params(vae_table(abstract), from_state_dict(state), abstract)


def test_tiled_decode_matches_diffusers_tiled_decode(tiny_vae, ours):
    from edit_jax.models.vae import decode_tiled

    vae, _ = tiny_vae
    config, params = ours
    z = np.random.default_rng(3).standard_normal((1, 4, 20, 14)).astype(np.float32)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 8  # 32 px tiles of the 4x VAE
    try:
        with torch.no_grad():
            theirs = vae.decode(torch.from_numpy(z)).sample
    finally:
        vae.disable_tiling()
    mine = decode_tiled(config, params, z, tile_size=32)
    assert mine.shape == tuple(theirs.shape) == (1, 3, 80, 56)
    assert rel_err(mine, theirs) <= 1e-5


def test_latents_within_one_tile_decode_whole(ours):
    from edit_jax.models.vae import decode_tiled

    config, params = ours
    z = np.random.default_rng(4).standard_normal((1, 4, 8, 8)).astype(np.float32)
    whole = AutoencoderKL(config).apply({"params": params}, z, method="decode")
    assert rel_err(decode_tiled(config, params, z, tile_size=32), whole) <= 1e-5


def test_a_tile_size_off_the_vae_scale_is_one_clear_error(ours):
    from edit_jax.models.vae import decode_tiled

    config, params = ours
    for tile_size in (30, 8, 40):  # 40: a whole number of latents, but tiles would not step by whole latents
        with pytest.raises(ValueError, match="multiple of 16 px .4 x the VAE's 4x scale"):
            decode_tiled(config, params, np.zeros((1, 4, 8, 8), np.float32), tile_size=tile_size)
