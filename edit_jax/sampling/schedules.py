"""Flow-matching schedules as diffusers' FlowMatchEulerDiscreteScheduler builds them, set up the
way FluxPipeline and QwenImagePipeline set them up, in NumPy float32 (static per run).

sigma runs from 1 (pure noise) down to 0; x_t = (1 - sigma) x0 + sigma noise. The model reads
timestep = (1000 sigma) / 1000 in float32, exactly as the pipelines pass it. Hunyuan3D-2's
pipeline runs its time the other way (`noise_at_zero`: from 0, noise, to 1, data); the sampler's
Euler step x += (sigma_next - sigma) v is the same in either direction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' scheduler_config.json fields that matter for flow-matching Euler sampling."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    noise_at_zero: ClassVar[bool] = False  # `Hunyuan3DSchedulerConfig`: time runs from noise at 0 to data at 1


@dataclasses.dataclass(frozen=True)
class Hunyuan3DSchedulerConfig(SchedulerConfig):
    """hy3dgen's FlowMatchEulerDiscreteScheduler as its pipeline sets it up: linspace(0, 1, steps),
    shifted by `shift`, then 1 (the other fields are not read)."""

    noise_at_zero: ClassVar[bool] = True


SCHEDULERS = {
    "flux-dev": SchedulerConfig(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
    "flux-schnell": SchedulerConfig(shift=1.0, use_dynamic_shifting=False),
    "qwen-image": SchedulerConfig(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192,
        shift_terminal=0.02, time_shift_type="exponential",
    ),
    "hunyuan3d": Hunyuan3DSchedulerConfig(shift=1.0),
}


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """mu, linear in the number of image tokens (the pipelines' resolution-dependent shift).

    Args:
      image_seq_len: image tokens of the packed latents. base_seq_len, max_seq_len: the token
        counts at which mu is base_shift and max_shift (the scheduler config's).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(scheduler: SchedulerConfig, image_seq_len: int, sigmas):
    """The scheduler's shift of `sigmas` (NumPy or JAX arrays in (0, 1]) towards noise: dynamic
    (mu linear in the image's token count; exponential or linear in mu) or a fixed `shift`, as
    FlowMatchEulerDiscreteScheduler.set_timesteps applies it."""
    if scheduler.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, scheduler.base_image_seq_len, scheduler.max_image_seq_len,
                             scheduler.base_shift, scheduler.max_shift)
        if scheduler.time_shift_type == "exponential":  # diffusers' (1 / t - 1) ** sigma, with sigma 1
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))
    return scheduler.shift * sigmas / (1 + (scheduler.shift - 1) * sigmas)


def flow_match_schedule(scheduler: SchedulerConfig, num_steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [num_steps + 1] ending in 0, timesteps [num_steps] = 1000 sigma), float32.

    With `noise_at_zero` (Hunyuan3D-2's pipeline and scheduler): sigmas linspace(0, 1, num_steps)
    (the pipeline's default; its last step, from 1 to 1, moves nothing), shifted by `shift`, then 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if scheduler.noise_at_zero:
        sigmas = np.linspace(0, 1, num_steps)
        sigmas = (scheduler.shift * sigmas / (1 + (scheduler.shift - 1) * sigmas)).astype(np.float32)
        return np.concatenate([sigmas, np.ones(1, np.float32)]), sigmas * np.float32(scheduler.num_train_timesteps)
    if scheduler.shift_terminal and num_steps < 2:
        raise ValueError("a schedule stretched to shift_terminal (Qwen-Image) needs num_steps >= 2 "
                         "(with one step diffusers divides 0 by 0)")
    sigmas = time_shift(scheduler, image_seq_len, np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32))
    if scheduler.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - scheduler.shift_terminal))
    sigmas = np.asarray(sigmas, np.float32)
    timesteps = sigmas * np.float32(scheduler.num_train_timesteps)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps
