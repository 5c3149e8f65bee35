"""FLUX.1: our model, fed weights through our converter, equals diffusers' FluxTransformer2DModel."""

import numpy as np
import pytest

import edit_jax
from edit_jax.checkpoints_convert import convert_checkpoint
from edit_jax.models import jit_forward
from reference import FLUX_TINY, flux_inputs, make_diffusers_flux, relative_error, run_diffusers

TOLERANCE = 1e-5


def convert_and_load(save_diffusers, tmp_path, torch_model):
    src = save_diffusers(torch_model)
    ckpt = convert_checkpoint("flux", src, tmp_path / "ckpt", dtype="float32", progress=False)
    return edit_jax.load(ckpt)


def test_tiny_config_matches_diffusers(save_diffusers, tmp_path):
    torch_model = make_diffusers_flux()
    model, params = convert_and_load(save_diffusers, tmp_path, torch_model)
    inputs = flux_inputs(FLUX_TINY, batch=1, height=4, width=4, num_txt=8)

    forward, arrays = jit_forward(model, inputs)
    out = forward(params, arrays)

    assert relative_error(out, run_diffusers(torch_model, inputs)) <= TOLERANCE


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev-guidance", "schnell-no-guidance"])
def test_deeper_config_batch2_nonsquare_grid_matches_diffusers(save_diffusers, tmp_path, guidance_embeds):
    overrides = dict(num_layers=3, num_single_layers=4, guidance_embeds=guidance_embeds)
    torch_model = make_diffusers_flux(seed=1, **overrides)
    model, params = convert_and_load(save_diffusers, tmp_path, torch_model)
    inputs = flux_inputs({**FLUX_TINY, **overrides}, batch=2, height=3, width=5, num_txt=7, seed=1)

    forward, arrays = jit_forward(model, inputs)
    out = forward(params, arrays)

    assert out.shape == (2, 15, 4)
    assert relative_error(out, run_diffusers(torch_model, inputs)) <= TOLERANCE


def test_bad_input_shape_names_the_input(save_diffusers, tmp_path):
    model, params = convert_and_load(save_diffusers, tmp_path, make_diffusers_flux())
    inputs = flux_inputs(FLUX_TINY, batch=1, height=2, width=2, num_txt=3)
    inputs["encoder_hidden_states"] = np.zeros((1, 3, 31), np.float32)

    with pytest.raises(ValueError, match="encoder_hidden_states has shape"):
        model.apply({"params": params}, **inputs)


def test_guidance_required_exactly_when_config_has_guidance_embeds(save_diffusers, tmp_path):
    model, params = convert_and_load(save_diffusers, tmp_path, make_diffusers_flux(guidance_embeds=True))
    inputs = flux_inputs(FLUX_TINY, batch=1, height=2, width=2, num_txt=3)

    with pytest.raises(ValueError, match="pass guidance"):
        model.apply({"params": params}, **inputs)
