"""edit-jax checkpoints: an orbax params tree plus the model config as JSON.

    CKPT/
      config.json   {"format": "edit-jax", "version": 3, "family": ..., "config": {...}, ...}
      params/       orbax PyTree checkpoint of the plain base params pytree
      routers/      (optional) the E-DiT router params, a separate pytree stacked over layers

A checkpoint is written into a hidden sibling folder and renamed into place only when complete,
so a failed or killed write never leaves something at CKPT that looks finished; the hidden folders
of writes that died (`.CKPT.incomplete-PID-*` of a process no longer running) are removed by the
next write to the same CKPT. Overwriting replaces only an edit-jax checkpoint, never a folder of
other files nor one that holds (or lies inside) a protected path such as the conversion source,
and the old checkpoint goes only after the new one is complete. Params can be written group by
group (`write_checkpoint` takes an iterator of sub-trees), so a converter never holds the whole
model in memory. A tree that another checkpoint already stores as it would be written (the frozen
base a training run read) is hard-linked from there rather than written again (`save`'s
`params_from`). Every path is resolved first: relative paths work everywhere (orbax needs
absolute ones).

Earlier formats still load. Format 1 stored each FLUX single block's proj_out kernel whole,
[L, D + M, D]; since format 2 its attention and MLP rows are two kernels (`JointLinear`), each
sharded by its own input axis: a format-1 checkpoint's metadata lists the two kernels, and loading
splits the stored one (`format_1_joined`). Formats 1 and 2 stored the elastic MLPs' hidden
channels in PyTorch's order; since format 3 the config's `width_groups` says how they are stored
(`edit_jax.layers.channel_ranks`), and an earlier checkpoint is read with width_groups = 1, its
own order.

The package by job: `format` (layout, config.json, what is a checkpoint, format-1 migration),
`store` (orbax metadata, writes and restores), `datafiles` (the stored data files, checked and
read without orbax), `verify` (every value), `paths` (atomic filesystem writes) and `agreement`
(multi-host decisions and barriers). Every name below is
public API, imported from `edit_jax.checkpoint`.
"""

from edit_jax.checkpoint.agreement import agreed
from edit_jax.checkpoint.datafiles import missing_array_files, read_array
from edit_jax.checkpoint.format import (CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, PARAMS_DIR, READABLE_VERSIONS,
                                        ROUTERS_DIR, SHAPE_VAE_DIR, CheckpointError, check_destination, diffusers_hint, flatten,
                                        format_1_joined, is_checkpoint, load_config, read_metadata, router_mode,
                                        run_dir_hint, step_schedule, tree_names, unflatten)
from edit_jax.checkpoint.paths import atomic_file, atomic_folder, overlaps, remove_stale_scratch, resolve
from edit_jax.checkpoint.store import (load_params, load_routers, params_metadata, save, storage_mismatch,
                                       stored_identity, write_checkpoint)
from edit_jax.checkpoint.verify import verify_arrays

__all__ = [
    "CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "PARAMS_DIR", "READABLE_VERSIONS", "ROUTERS_DIR", "SHAPE_VAE_DIR", "CheckpointError",
    "agreed", "atomic_file", "atomic_folder", "check_destination", "diffusers_hint", "flatten", "format_1_joined",
    "is_checkpoint", "load_config", "load_params", "load_routers", "missing_array_files", "overlaps", "params_metadata",
    "read_array", "read_metadata", "remove_stale_scratch", "resolve", "router_mode", "run_dir_hint", "save", "step_schedule",
    "storage_mismatch", "stored_identity", "tree_names", "unflatten", "verify_arrays", "write_checkpoint",
]
