"""Hunyuan3D-2's ShapeVAE decoder: the Flax decoder equals hy3dgen's `ShapeVAE` (float32, tiny
random configs), the chunked volume decode equals its VanillaVolumeDecoder on the same grid
whatever the chunk size, and the mesh is the same marching-cubes call's."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import hy3dgen_shapegen, randomize_, relative_error

from edit_jax.checkpoints_convert.engine import build_params
from edit_jax.checkpoints_convert.hunyuan3d import shape_vae_table
from edit_jax.checkpoints_convert.sources import from_state_dict
from edit_jax.models.shape_vae import (ShapeVAE, ShapeVAEConfig, abstract_shape_vae, decode_volume, extract_surface,
                                       mesh_faces_outward)

TINY = dict(num_latents=16, embed_dim=8, width=32, heads=2, num_decoder_layers=2, num_freqs=4, scale_factor=0.9)
SETTINGS = [dict(qkv_bias=False, qk_norm=True, include_pi=False), dict(qkv_bias=True, qk_norm=False, include_pi=True)]


def tiny(settings: dict, seed: int = 0):
    """(hy3dgen's ShapeVAE with random weights, our config, our params converted from it)."""
    torch.manual_seed(seed)
    reference = randomize_(hy3dgen_shapegen("models.autoencoders").ShapeVAE(**TINY, **settings).eval(), seed)
    config = ShapeVAEConfig(**TINY, **settings)
    abstract = abstract_shape_vae(config)
    return reference, config, build_params(shape_vae_table(abstract), from_state_dict(reference.state_dict()), abstract)


def latents(config, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, config.num_latents, config.embed_dim)).astype(np.float32)


@pytest.mark.parametrize("settings", SETTINGS, ids=["release-like", "bias-no-qk-norm"])
def test_decoder_and_geometry_decoder_match_hy3dgen(settings):
    reference, config, params = tiny(settings)
    x = latents(config)
    points = np.random.default_rng(2).uniform(-1, 1, (2, 50, 3)).astype(np.float32)
    model = ShapeVAE(config)

    decoded = model.apply({"params": params}, jnp.asarray(x), method=ShapeVAE.decode)
    logits = model.apply({"params": params}, jnp.asarray(points), model.apply({"params": params}, decoded,
                                                                             method=ShapeVAE.data_kv),
                         method=ShapeVAE.occupancy)
    with torch.no_grad():
        ref_decoded = reference(1.0 / config.scale_factor * torch.from_numpy(x))
        ref_logits = reference.geo_decoder(queries=torch.from_numpy(points), latents=ref_decoded)

    assert relative_error(decoded, ref_decoded.numpy()) <= 1e-5
    assert relative_error(logits, ref_logits.numpy()) <= 1e-5


@pytest.mark.parametrize("num_chunks", [37, 1000])
def test_volume_decode_in_chunks_matches_hy3dgens_vanilla_volume_decoder(num_chunks):
    reference, config, params = tiny(SETTINGS[0])
    x = latents(config)
    decoded = ShapeVAE(config).apply({"params": params}, jnp.asarray(x), method=ShapeVAE.decode)
    volumes = hy3dgen_shapegen("models.autoencoders.volume_decoders")
    with torch.no_grad():
        ref = volumes.VanillaVolumeDecoder()(reference(1.0 / config.scale_factor * torch.from_numpy(x)), reference.geo_decoder,
                                             bounds=1.01, num_chunks=100, octree_resolution=8, enable_pbar=False)
    done = []

    grid = decode_volume(config, params, decoded, bounds=1.01, octree_resolution=8, num_chunks=num_chunks,
                         progress=lambda d, total: done.append((d, total)))

    assert grid.shape == (2, 9, 9, 9) and done[-1] == (729, 729)
    assert relative_error(grid, ref.numpy()) <= 1e-5


def test_the_mesh_is_hy3dgens_marching_cubes_on_the_same_grid():
    extractors = hy3dgen_shapegen("models.autoencoders.surface_extractors")
    grid = np.random.default_rng(5).standard_normal((9, 9, 9)).astype(np.float32)
    grid = grid + np.linalg.norm(np.stack(np.meshgrid(*[np.linspace(-1, 1, 9)] * 3, indexing="ij")), axis=0) - 0.6
    (ref,) = extractors.MCSurfaceExtractor()(torch.from_numpy(grid)[None], mc_level=0.0, bounds=1.01, octree_resolution=8)

    vertices, faces = extract_surface(grid, 0.0, 1.01)

    np.testing.assert_array_equal(vertices, ref.mesh_v)
    np.testing.assert_array_equal(faces, ref.mesh_f)
    assert mesh_faces_outward(faces)[0].tolist() == faces[0, ::-1].tolist()


def test_bad_volume_settings_and_grids_are_clear_errors():
    _, config, params = tiny(SETTINGS[0])
    with pytest.raises(ValueError, match="octree_resolution 0 and num_chunks 10 must be >= 1"):
        decode_volume(config, params, jnp.zeros((1, 16, 32)), octree_resolution=0, num_chunks=10)
    with pytest.raises(ValueError, match="no surface: the grid's values lie in \\[1, 1\\]"):
        extract_surface(np.ones((5, 5, 5), np.float32))
    with pytest.raises(ValueError, match="geo_decoder_downsample_ratio != 1 is not implemented"):
        dataclasses.replace(config, geo_decoder_downsample_ratio=2)
    with pytest.raises(ValueError, match="not known to edit-jax: \\['encoder_layers'\\]"):
        ShapeVAEConfig.from_hy3dgen({**TINY, "encoder_layers": 2})
