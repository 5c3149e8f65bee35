"""`edit-jax calibrate-magcache`: MagCache's per-step magnitude ratios of a checkpoint, from a dense
run over the prompts of an embeddings file, written beside the checkpoint (CKPT/mag_ratios.json).

    summary = calibrate_mag_cache("ckpt/flux-dev", "prompts.npz", sampler=SamplerConfig(num_steps=28))
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from edit_jax.checkpoint.paths import resolve
from edit_jax.config import resolve_dtype
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import MagCache
from edit_jax.pipelines.sample_embeddings import checkpoint_and_prompts
from edit_jax.sampling.batches import rows_conditions, sample_in_batches
from edit_jax.sampling.calibration import MAG_RATIOS_FILE, write_mag_ratios
from edit_jax.sampling.latents import initial_noise
from edit_jax.sampling.sampler import SamplerConfig, check_sampling_inputs


def calibrate_mag_cache(ckpt, embeddings, *, sampler: SamplerConfig, height: int = 1024, width: int = 1024,
                        seed: int = 0, out: str | Path | None = None, batch_size: int | None = None, mesh=None,
                        dtype: str = "auto", attention: str = "auto", progress: bool = True) -> dict:
    """Samples every prompt densely, records MagCache's ratio at each step (the mean over all
    prompts of diffusers' per-call ratio; with true CFG the conditional calls', run apart from the
    unconditional ones as the pipelines do), writes them to `out` and returns the file's contents.

    Args:
      ckpt: the checkpoint folder. embeddings: the prompt embeddings file (`edit-jax encode-prompts`).
      sampler: steps, guidance, true CFG (with the file's negative_* embeddings).
      height, width: pixels, multiples of 16. seed: of the noise.
      out: the ratios file (None: CKPT/mag_ratios.json). batch_size: prompts sampled together
        (None: all). mesh, dtype, attention: as `edit_jax.load`'s.
      progress: a bar.
    """
    out = resolve(ckpt) / MAG_RATIOS_FILE if out is None else resolve(out)
    model, params, cond, negative = checkpoint_and_prompts(ckpt, embeddings, height, width, mesh, resolve_dtype(dtype),
                                                           attention)
    config = model.config
    batch = cond["encoder_hidden_states"].shape[0]
    noise = initial_noise(jax.random.key(seed), batch, config.in_channels // 4, height, width)
    check_sampling_inputs(config, noise, cond, negative, sampler)
    sampler = dataclasses.replace(sampler, cfg_mode="sequential")
    elastic = ElasticConfig(mode="dense", step_cache=MagCache(calibrate=True, num_inference_steps=sampler.num_steps))
    size = batch_size or batch
    print(f"calibrating MagCache: {batch} prompts, {height}x{width}, {sampler.num_steps} steps, dense", file=sys.stderr)
    sums, count = np.zeros(sampler.num_steps), 0
    with (tqdm(total=sampler.num_steps * -(-batch // size), desc="calibrate", unit="step", disable=not progress) as bar,
          jax.set_mesh(mesh) if mesh else contextlib.nullcontext()):
        for part in sample_in_batches(model, params, noise, rows_conditions(cond, negative), sampler, size,
                                      elastic=elastic, progress=lambda i: bar.update(1)):
            rows = len(part.ids)
            sums += np.asarray(part.records["mag_ratio"])[:, 0] * rows  # every row of a call holds the call's mean
            count += rows
    ratios = (sums / count).tolist()
    about = {"checkpoint": str(resolve(ckpt)), "prompts": batch, "height": height, "width": width, "seed": seed,
             "guidance": sampler.guidance_scale, "true_cfg": sampler.true_cfg_scale}
    write_mag_ratios(out, ratios, about)
    return {"file": str(out), "mag_ratios": ratios, "num_inference_steps": sampler.num_steps, **about}
