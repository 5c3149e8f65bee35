"""Schedules equal diffusers' FlowMatchEulerDiscreteScheduler as each pipeline sets it up."""

import dataclasses

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

from edit_jax.sampling.schedules import SCHEDULERS, flow_match_schedule


DIFFUSERS_SCHEDULES = [name for name, config in SCHEDULERS.items() if not config.noise_at_zero]


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6889])
def test_schedule_matches_diffusers_as_the_pipeline_sets_it(name, steps, image_seq_len):
    config = SCHEDULERS[name]
    if config.shift_terminal and steps == 1:
        pytest.skip("one step is rejected for shift_terminal schedules (see the next test)")
    reference = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(config))
    mu = flux_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    sigmas, timesteps = flow_match_schedule(config, steps, image_seq_len)

    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_hunyuan3d_schedule_matches_hy3dgens_scheduler_as_its_pipeline_sets_it(steps, shift):
    from reference import hy3dgen_shapegen

    reference = hy3dgen_shapegen("schedulers").FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(steps, sigmas=np.linspace(0, 1, steps))

    sigmas, timesteps = flow_match_schedule(dataclasses.replace(SCHEDULERS["hunyuan3d"], shift=shift), steps, 3072)

    np.testing.assert_array_equal(sigmas, reference.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())


def test_fewer_than_one_step_is_an_error():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flow_match_schedule(SCHEDULERS["flux-dev"], 0, 256)


def test_one_step_with_shift_terminal_is_an_error():
    with pytest.raises(ValueError, match="needs num_steps >= 2"):
        flow_match_schedule(SCHEDULERS["qwen-image"], 1, 256)
