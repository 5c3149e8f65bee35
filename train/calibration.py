"""Calibration inputs for `edit-jax order-channels` from a prepared training dataset: real
latents, noised to random levels as training noises them, with their own text embeddings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from edit_jax.models.registry import family_of
from edit_jax.train.data import shared_inputs
from edit_jax.train.dataset import check_fits, make_pipeline, read_manifest

GUIDANCE = 3.5  # FLUX.1-dev's usual embedded guidance


def dataset_calibration(path, model_config, batches: int = 4, batch_size: int = 4, seed: int = 0) -> list[dict]:
    """`batches` model input dicts (keyword arguments of the model, as `example_inputs` gives)
    of up to `batch_size` examples each: hidden_states = (1 - s) x0 + s noise with s uniform in
    [0.05, 0.95], the examples' text embeddings, and the RoPE ids or img_shapes of their grid.

    Args:
      path: the dataset folder. model_config: the model's config (checked against the dataset).
      batches: how many batches. batch_size: examples per batch, at most. seed: of the order and noise.
    """
    manifest = read_manifest(path)
    check_fits(manifest, model_config, path)
    size = min(batch_size, max(b["count"] for b in manifest["buckets"]))
    iterator = iter(make_pipeline(path, size, seed).to_iter_dataset())
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        batch = next(iterator)
        x0, (rows, cols) = batch["latents"], (int(g) for g in batch["grid"])
        s = rng.uniform(0.05, 0.95, (x0.shape[0],)).astype(np.float32)
        inputs = {"hidden_states": (1 - s)[:, None, None] * x0 + s[:, None, None] * rng.standard_normal(x0.shape),
                  "timestep": s, "encoder_hidden_states": batch["encoder_hidden_states"]}
        family = family_of(model_config)
        inputs.update({key: batch[key] for key in family.prompt_extras(model_config, *batch["encoder_hidden_states"].shape[:2])})
        inputs.update(family.guidance(model_config, GUIDANCE, x0.shape[0]))
        inputs = {k: jnp.asarray(v, jnp.int32 if k.endswith("mask") else jnp.float32) for k, v in inputs.items()}
        out.append({**inputs, **shared_inputs(model_config, rows, cols, inputs["encoder_hidden_states"].shape[1])})
    return out
