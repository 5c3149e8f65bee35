"""What differs between model families, as one record each family module exports (`FAMILY`).

`edit_jax.models.family_of(config)` looks a config's record up; everything above the models
(sampler, FLOPs, channel ordering, training data) reads a family's particulars from it instead of
branching on the config's type. A new family is a module with its transformer and its record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class ElasticMLP:
    """Where a block stack's elastic MLP lives: the paths under the stack of fc1 (kernel columns
    and bias) and of fc2 (its kernel's rows; `fc2_kernel` names that kernel), and where its hidden
    magnitudes are sown (`edit_jax.layers.sow_hidden_magnitude`)."""

    stack: str
    fc1: tuple[str, ...]
    fc2: tuple[str, ...]
    fc2_kernel: str
    sown: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family (FLUX.1, Qwen-Image), every function taking the family's config first.

    name: the config's `family`. transformer: the Flax module class, built from the config.
    block_stacks: the names of the scanned block stacks, in scan order (their lengths are
    `config.block_stacks`). block_modulations: per stack the AdaLN modulations its blocks compute
    from temb. time_embedding(config, params, timestep, **cond) -> temb [B, D].
    example_inputs(config, rng, batch, height, width, num_txt) -> the model's keyword arguments
    (random, float32) for an image of height x width packed tokens.
    positions(config, rows, cols, num_txt) -> the position inputs every sample of a rows x cols
    grid of packed tokens shares (FLUX: img_ids [N, 3], txt_ids [T, 3]; Qwen-Image: img_shapes).
    prompt_extras(config, batch, num_txt) -> {name: (shape, dtype)} of the per-prompt inputs
    beside the prompt embeddings (FLUX: pooled_projections [B, P]; Qwen-Image: the text mask
    [B, T], int32). guidance(config, scale, batch) -> the guidance inputs ({} without a guidance
    embedding). check_positions(config, cond, num_tokens, batch) -> None, or what is wrong with
    cond's positions for num_tokens image tokens in each of batch rows. scheduler(config) -> the name of the family's
    published scheduler (`edit_jax.sampling.schedules.SCHEDULERS`). cfg_norm_rescale: whether the
    family's pipeline rescales true-CFG velocities to the conditional one's norm.
    cache_carries(config, batch, num_img, num_txt) -> per stack the shapes of one block's carry
    (what a block cache stores). elastic_mlps: the elastic MLP of each stack.
    """

    name: str
    transformer: type
    block_stacks: tuple[str, ...]
    block_modulations: Mapping[str, tuple[str, ...]]
    time_embedding: Callable
    example_inputs: Callable
    positions: Callable
    prompt_extras: Callable
    guidance: Callable
    check_positions: Callable
    scheduler: Callable
    cfg_norm_rescale: bool
    cache_carries: Callable
    elastic_mlps: tuple[ElasticMLP, ...]
