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

from edit_jax.config import ConfigError
from edit_jax.models.registry import family_of
from edit_jax.train.config import TrainConfig
from edit_jax.train.dataset import batch_iterator, check_fits, make_pipeline, read_manifest


def shared_inputs(model_config, rows: int, cols: int, num_txt: int) -> dict:
    """What every sample of a batch on a rows x cols grid of packed tokens with num_txt text
    tokens shares: FLUX RoPE ids [N, 3], [T, 3]; Qwen-Image the static img_shapes.

    Args:
      model_config: the model config. rows, cols: the grid of packed tokens. num_txt: T.
    """
    return family_of(model_config).positions(model_config, rows, cols, num_txt)


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
    family = family_of(model_config)
    for key, (shape, dtype) in family.prompt_extras(model_config, config.batch_size, config.num_txt).items():
        if np.issubdtype(dtype, np.integer):  # a text mask: every token valid
            batch[key] = jnp.ones(shape, dtype)
        else:  # one random embedding per class, as the prompt embeddings
            batch[key] = jax.random.normal(tables[2], (config.num_classes, *shape[1:]))[label]
    return {**batch, **family.guidance(model_config, config.guidance, config.batch_size)}


class DataSource:
    """The run's batches as global arrays in the batch sharding: `next(step)` -> (batch, grid),
    grid the (rows, columns) of packed tokens. A dataset folder is checked against the model
    before any compute and read by its grain pipeline (each process reads its own slice; the
    slices are assembled into global arrays); `iterator` is grain's checkpointable iterator (None
    for the synthetic source, whose state is the step)."""

    def __init__(self, config: TrainConfig, model_config, sharding):
        self.config, self.model_config, self.sharding = config, model_config, sharding
        self.iterator = None
        if config.data == "synthetic":
            self._synthetic = jax.jit(lambda step: synthetic_batch(model_config, config, step), out_shardings=sharding)
            return

        check_fits(read_manifest(config.data), model_config, config.data)
        processes = jax.process_count()
        if config.batch_size % processes:
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {processes} processes")
        pipeline = make_pipeline(config.data, config.batch_size // processes, config.seed, jax.process_index(), processes)
        self.iterator = batch_iterator(pipeline, config.prefetch)

    def next(self, step: int) -> tuple[dict, tuple[int, int]]:
        if self.iterator is None:
            batch = self._synthetic(step)
            batch.pop("label")
            return batch, (self.config.height, self.config.width)
        local = next(self.iterator)
        grid = tuple(int(x) for x in local.pop("grid"))
        local.update(family_of(self.model_config).guidance(self.model_config, self.config.guidance, local["latents"].shape[0]))
        batch = {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in local.items()}
        return batch, grid
