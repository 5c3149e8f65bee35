"""MagCache's calibration: the per-step magnitude ratios of a checkpoint's dense sampling run, and
the file they are kept in beside the checkpoint (`mag_ratios.json`).

    ratios = calibrate_mag_ratios(model, params, noise, cond, SamplerConfig(num_steps=28))
    write_mag_ratios(ckpt / MAG_RATIOS_FILE, ratios, {"height": 1024, "width": 1024})
    method = MagCache(read_mag_ratios(ckpt / MAG_RATIOS_FILE), num_inference_steps=28)

The file is JSON: {"mag_ratios": [one float per step], "num_inference_steps": N, ...what the run
was (size, prompts, scheduler)}. Ratios of another step count are resampled (`MagCache.ratios`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from edit_jax.checkpoint.paths import atomic_file, resolve
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import MagCache
from edit_jax.sampling.sampler import SamplerConfig, sample

MAG_RATIOS_FILE = "mag_ratios.json"


def calibrate_mag_ratios(model, params: dict, noise: jax.Array, cond: dict, sampler: SamplerConfig,
                         negative_cond: dict | None = None) -> list[float]:
    """Per step, mean ||r_t|| / ||r_(t-1)|| of the stacks' image residual over the tokens and rows
    of a dense run (1.0 at the first step), as diffusers' `MagCacheConfig(calibrate=True)` prints
    for one call; with true CFG, the conditional call's (run as a call of its own, as the
    pipelines do).

    Args:
      model, params: the transformer and its base params. noise: [B, N, C] packed latents.
      cond, negative_cond: the prompts' conditions (`make_conditions`). sampler: steps, guidance, CFG.
    """
    elastic = ElasticConfig(mode="dense", step_cache=MagCache(calibrate=True, num_inference_steps=sampler.num_steps))
    sampler = dataclasses.replace(sampler, cfg_mode="sequential")
    _, records = sample(model, params, noise, cond, sampler, elastic=elastic, negative_cond=negative_cond)
    ratios = np.asarray(records["mag_ratio"])[:, : noise.shape[0]]
    return [float(r) for r in ratios.mean(axis=1)]


def write_mag_ratios(path: str | Path, ratios: list[float], about: dict | None = None) -> Path:
    """Writes the ratios (and what the run was) as JSON, atomically; returns the path.

    Args:
      path: the file (typically CKPT/mag_ratios.json). ratios: one per step. about: more fields.
    """
    path = resolve(path)
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"MagCache ratios must be finite numbers, one per step, got {ratios!r}")
    body = {"mag_ratios": [float(r) for r in ratios], "num_inference_steps": len(ratios), **(about or {})}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
    return path


def read_mag_ratios(path: str | Path) -> tuple[float, ...]:
    """The ratios of a `write_mag_ratios` file; ValueError naming the file if it holds none."""
    path = resolve(path)
    if not path.is_file():
        raise ValueError(f"no MagCache ratios at {path}: calibrate them first (`edit-jax calibrate-magcache`)")
    try:
        ratios = json.loads(path.read_text())["mag_ratios"]
        ratios = tuple(float(r) for r in ratios)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a MagCache ratios file (JSON with a 'mag_ratios' list of numbers): {e}") from e
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise ValueError(f"{path}: 'mag_ratios' must be finite numbers, one per step")
    return ratios
