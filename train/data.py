"""Training data. For now a synthetic source: class-conditional toy latents for smoke runs, tests
and benchmarks, drawn on device straight into the batch sharding, a pure function of (seed, step)
(its iterator state is the step: a resumed run gets the same batches).

Each class has a fixed random latent prototype and fixed random text embeddings; a sample is its
class's prototype plus a little noise, so a model can learn the map from text to latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.config import FluxConfig
from train.config import TrainConfig


def shared_inputs(model_config, config: TrainConfig) -> dict:
    """What every sample shares: FLUX RoPE ids [N, 3], [T, 3] (and nothing per sample); Qwen-Image
    the static img_shapes (frames, rows, columns)."""
    if isinstance(model_config, FluxConfig):
        rows, cols = np.meshgrid(np.arange(config.height), np.arange(config.width), indexing="ij")
        img_ids = np.stack([np.zeros(rows.size), rows.ravel(), cols.ravel()], axis=-1).astype(np.float32)
        return {"img_ids": jnp.asarray(img_ids), "txt_ids": jnp.zeros((config.num_txt, 3), jnp.float32)}
    return {"img_shapes": (1, config.height, config.width)}


def synthetic_batch(model_config, config: TrainConfig, step) -> dict:
    """The global batch of `step` (traceable): latents [B, N, C], encoder_hidden_states [B, T, D],
    label [B], and pooled_projections [B, P] + guidance [B] (FLUX dev) or the text mask [B, T]."""
    tables = jax.random.split(jax.random.key(config.seed + 1), 3)
    num_img = config.height * config.width
    prototypes = jax.random.normal(tables[0], (config.num_classes, num_img, model_config.in_channels))
    texts = jax.random.normal(tables[1], (config.num_classes, config.num_txt, model_config.joint_attention_dim))
    key = jax.random.fold_in(jax.random.key(config.seed + 2), step)
    label_key, jitter_key = jax.random.split(key)
    label = jax.random.randint(label_key, (config.batch_size,), 0, config.num_classes)
    batch = {
        "latents": prototypes[label] + 0.1 * jax.random.normal(jitter_key, (config.batch_size, num_img, model_config.in_channels)),
        "encoder_hidden_states": texts[label],
        "label": label,
    }
    if isinstance(model_config, FluxConfig):
        pooled = jax.random.normal(tables[2], (config.num_classes, model_config.pooled_projection_dim))
        batch["pooled_projections"] = pooled[label]
        if model_config.guidance_embeds:
            batch["guidance"] = jnp.full((config.batch_size,), 3.5)
    else:
        batch["encoder_hidden_states_mask"] = jnp.ones((config.batch_size, config.num_txt), jnp.int32)
    return batch
