"""`export_checkpoint`: an edit-jax checkpoint back to PyTorch layouts, by reading the import
tables backward (each transform's inverse), never through a second hand-written mapping.

    diffusers     the DiT in diffusers' layout: sharded safetensors
                  (diffusion_pytorch_model-0000i-of-0000N.safetensors), their index and config.json,
                  loadable with FluxTransformer2DModel / QwenImageTransformer2DModel.from_pretrained
                  and, for a checkpoint with routers, routers.safetensors beside them: the routers
                  as gate_mlps.{i}.* (diffusers' model has none; `edit-jax convert` reads the folder
                  back with them, and the release's code loads them as it loads its own file)
    edit-release  one model.safetensors: the DiT keys plus the routers as gate_mlps.{i}.* (the
                  released E-DiT layout, SPEC section 6; FLUX numbers its double blocks first, then
                  its single blocks)
    release       Hunyuan3D-2's release folder: config.yaml and model.safetensors of the DiT's
                  model.* and the ShapeVAE's vae.* tensors (the image encoder stays in the release
                  it was converted from), routers.safetensors beside them when there are routers

Every file records the MLP activation in its safetensors metadata ("activation"), which
`edit-jax convert` reads back. A format's own code runs one activation (`NATIVE_ACTIVATION`:
diffusers' tanh GELU; the Qwen-Image release's x * sigmoid(1.702 x)); a checkpoint of another is
refused unless `allow_activation_change`, since that code would run it as a slightly other model.

Arrays are read one source tensor at a time and, for diffusers, written in shards of about
`shard_bytes` as each fills: peak memory is about one shard plus the stacked params of one source
tensor (edit-release, one file, holds the whole model once). The output folder appears only when
complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edit_jax.checkpoints_convert import flux, hunyuan3d, qwen_image
from edit_jax.checkpoints_convert.engine import ConversionError
from edit_jax.checkpoints_convert.sources import ROUTERS_FILE
from edit_jax.checkpoints_convert.tables import join
from edit_jax.checkpoint import (ROUTERS_DIR, SHAPE_VAE_DIR, CheckpointError, atomic_folder, flatten, load_config,
                                 overlaps, params_metadata, read_array, read_metadata, resolve, tree_names)
from edit_jax.models.shape_vae import ShapeVAEConfig

FAMILIES = {"flux": flux, "qwen-image": qwen_image, "hunyuan3d": hunyuan3d}
FORMATS = {"flux": ("diffusers", "edit-release"), "qwen-image": ("diffusers", "edit-release"), "hunyuan3d": ("release",)}
DIFFUSERS_CLASSES = {"flux": "FluxTransformer2DModel", "qwen-image": "QwenImageTransformer2DModel"}
OURS_ONLY = ("mlp_ratio", "activation", "router_hidden", "width_buckets", "width_groups")  # fields diffusers does not know
WEIGHTS = "diffusion_pytorch_model"
ACTIVATION_NAMES = {"gelu_tanh": "the tanh GELU", "sigmoid_gelu": "x * sigmoid(1.702 x)"}


def native_activation(family: str, fmt: str) -> str:
    """The MLP activation the code that reads `fmt` runs (diffusers' classes; the E-DiT release's)."""
    return "sigmoid_gelu" if (family, fmt) == ("qwen-image", "edit-release") else "gelu_tanh"


def check_activation(config, fmt: str, allow_change: bool) -> None:
    """Raises ConversionError when `fmt`'s own code would run the model with another activation."""
    native = native_activation(config.family, fmt)
    if config.activation != native and not allow_change:
        raise ConversionError(
            f"this checkpoint's MLPs use {ACTIVATION_NAMES[config.activation]} ({config.activation}), and the code "
            f"that reads --format {fmt} runs {ACTIVATION_NAMES[native]} ({native}): it would compute a slightly "
            "different model. --allow-activation-change exports anyway (the files record the activation, so "
            "`edit-jax convert` reads them back as they were)")


def _tables(config, fmt: str, has_routers: bool) -> dict[str, dict]:
    module = FAMILIES[config.family]
    tables = {"params": module.TABLES["release" if fmt == "release" else "diffusers"](config)}
    if fmt == "edit-release" and not has_routers:
        raise ConversionError("--format edit-release writes the routers, and this checkpoint has none")
    if has_routers:
        tables[ROUTERS_DIR] = module.router_table(config)
    return tables


def _tensors(path: Path, tables: dict[str, dict], dtype):
    """Yields (source key, tensor) for every source tensor, one stacked source tensor at a time
    (the params cut from one fused tensor are read together and joined)."""
    for tree, table in tables.items():
        yield from _tree_tensors(path, tree, table, dtype)


def _tree_tensors(path: Path, tree: str, table: dict, dtype):
    """`_tensors` of one tree (params or routers)."""
    stored = flatten(params_metadata(path, tree))
    if set(stored) != set(table):
        raise ConversionError(f"{path}/{tree} holds {sorted(set(stored) ^ set(table))[:5]} that the table does not map")
    readers: dict[tuple[str, int], list[str]] = {}
    for name in sorted(table):
        readers.setdefault((table[name].key, table[name].offset), []).append(name)
    for names in readers.values():
        srcs = [table[name] for name in names]
        for name, src in zip(names, srcs):
            if not src.invertible:
                raise ConversionError(f"{name} <- {src.key} cannot be read backward")
        values = [read_array(path, tree, name) for name in names]
        values = [v.astype(dtype) for v in values] if dtype is not None else values
        keys = srcs[0].keys(values[0].shape[0] if srcs[0].stacked else None)
        for i, key in enumerate(keys):
            layers = [v[i] if srcs[0].stacked else v for v in values]
            yield key, np.ascontiguousarray(join([(src, src.unapply(layer)) for src, layer in zip(srcs, layers)]))


def _is_export(folder: Path) -> bool:
    """Whether `folder` looks like an earlier export: a diffusers config of our classes, or only
    the release file."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") in DIFFUSERS_CLASSES.values()
    except (OSError, ValueError, AttributeError):
        return sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]


def _write_diffusers(folder: Path, tensors, shard_bytes: int, metadata: dict) -> None:
    """Writes the (key, tensor) pairs in shards of about `shard_bytes`, each as soon as it fills."""
    weight_map, total, shard, size = {}, 0, {}, 0
    for key, tensor in tensors:
        shard[key] = tensor
        size += tensor.nbytes
        if size >= shard_bytes:
            _write_shard(folder, shard, weight_map, metadata)
            total, shard, size = total + size, {}, 0
    if shard or not weight_map:
        _write_shard(folder, shard, weight_map, metadata)
        total += size
    _name_shards(folder, weight_map, total)


def _write_shard(folder: Path, tensors: dict, weight_map: dict, metadata: dict) -> None:
    """Writes `tensors` as the next shard under a provisional name (the count is known at the end)."""
    from safetensors.numpy import save_file

    name = f"shard-{len(set(weight_map.values())):05d}.safetensors"
    save_file(tensors, folder / name, metadata=metadata)
    weight_map.update({k: name for k in tensors})


def _name_shards(folder: Path, weight_map: dict, total_bytes: int) -> None:
    """Renames the shards to diffusers' names (one: diffusion_pytorch_model.safetensors; more:
    -0000i-of-0000N and an index of `total_bytes`)."""
    provisional = sorted(set(weight_map.values()))
    if len(provisional) == 1:
        names = {provisional[0]: f"{WEIGHTS}.safetensors"}
    else:
        names = {p: f"{WEIGHTS}-{i + 1:05d}-of-{len(provisional):05d}.safetensors" for i, p in enumerate(provisional)}
    for old, new in names.items():
        (folder / old).rename(folder / new)
    if len(provisional) > 1:
        index = {"metadata": {"total_size": int(total_bytes)},
                 "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def diffusers_config(config) -> dict:
    d = {k: v for k, v in config.architecture().items() if k not in OURS_ONLY}
    d["axes_dims_rope"] = list(d["axes_dims_rope"])
    return {"_class_name": DIFFUSERS_CLASSES[config.family], **d}


def export_checkpoint(ckpt: str | Path, out: str | Path, fmt: str | None = None, *, dtype: str | None = None,
                      shard_bytes: int = 5 << 30, overwrite: bool = False, progress: bool = True,
                      allow_activation_change: bool = False) -> Path:
    """Writes the checkpoint `ckpt` as `fmt` into the folder `out`; returns `out`.

    Args:
      fmt: "diffusers" or "edit-release" (FLUX, Qwen-Image), "release" (Hunyuan3D-2); None: the
        family's first (diffusers; release).
      dtype: the tensors' dtype (default: as stored).
      shard_bytes: diffusers' shard size.
      allow_activation_change: export a model whose MLP activation is not the one `fmt`'s own code
        runs (`check_activation`), saying so, instead of refusing.
    """
    from safetensors.numpy import save_file

    ckpt, out = resolve(ckpt), resolve(out)
    config = load_config(ckpt)
    fmt = FORMATS[config.family][0] if fmt is None else fmt
    if fmt not in FORMATS[config.family]:
        raise ValueError(f"a {config.family} checkpoint exports as {' or '.join(FORMATS[config.family])}, not {fmt!r}")
    tables = _tables(config, fmt, ROUTERS_DIR in tree_names(ckpt))
    check_activation(config, fmt, allow_activation_change)
    if overlaps(out, ckpt):
        raise CheckpointError(f"refusing to export into {out}: it is, holds or lies inside the checkpoint {ckpt}")
    if fmt == "release":
        return _export_release(ckpt, out, config, tables, dtype, overwrite, progress)
    if out.exists() and not (overwrite and _is_export(out)):
        raise CheckpointError(f"{out} already exists" + (" and is not an earlier export (a diffusers config.json or "
                                                          "model.safetensors)" if overwrite else " (--overwrite replaces an earlier export)"))
    if config.activation != native_activation(config.family, fmt):
        print(f"export: {fmt}'s own code runs {ACTIVATION_NAMES[native_activation(config.family, fmt)]}, this model "
              f"{ACTIVATION_NAMES[config.activation]}; the files record {config.activation} for edit-jax convert",
              file=sys.stderr)
    metadata = {"format": "pt", "activation": config.activation}
    np_dtype = None if dtype is None else np.dtype(__import__("ml_dtypes").bfloat16 if dtype == "bfloat16" else dtype)
    tensors = tqdm(_tensors(ckpt, tables, np_dtype), desc="export", unit="tensor", disable=not progress)
    with atomic_folder(out) as tmp:
        if fmt == "edit-release":  # one file: the release layout is the whole model in one safetensors
            save_file(dict(tensors), tmp / "model.safetensors", metadata=metadata)
        else:
            _write_diffusers(tmp, tqdm(_tree_tensors(ckpt, "params", tables["params"], np_dtype), desc="export",
                                       unit="tensor", disable=not progress), shard_bytes, metadata)
            if ROUTERS_DIR in tables:
                save_file(dict(_tree_tensors(ckpt, ROUTERS_DIR, tables[ROUTERS_DIR], np_dtype)), tmp / ROUTERS_FILE,
                          metadata=metadata)
            (tmp / "config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
    if fmt == "diffusers" and ROUTERS_DIR in tables:
        print(f"export: diffusers' {DIFFUSERS_CLASSES[config.family]} has no routers: they are in "
              f"{out / ROUTERS_FILE} (gate_mlps.{{i}}.*, the E-DiT release's names); `edit-jax convert` reads the "
              "folder back with them", file=sys.stderr)
    return out


def _export_release(ckpt: Path, out: Path, config, tables: dict, dtype: str | None, overwrite: bool, progress: bool) -> Path:
    """`export_checkpoint`'s Hunyuan3D-2 release folder (see the module docstring)."""
    from safetensors.numpy import save_file

    meta = read_metadata(ckpt)
    if SHAPE_VAE_DIR not in tree_names(ckpt):
        raise ConversionError(f"{ckpt} holds no ShapeVAE: a release folder needs the one `edit-jax convert hunyuan3d` keeps")
    if out.exists() and not (overwrite and (out / hunyuan3d.RELEASE_CONFIG).is_file() and (out / "model.safetensors").is_file()):
        raise CheckpointError(f"{out} already exists" + (" and is not an earlier export" if overwrite else
                                                          " (--overwrite replaces an earlier export)"))
    vae_table, _ = hunyuan3d.shape_vae_tree(ShapeVAEConfig(**meta[SHAPE_VAE_DIR]))
    np_dtype = None if dtype is None else np.dtype(__import__("ml_dtypes").bfloat16 if dtype == "bfloat16" else dtype)
    metadata = {"format": "pt"}
    with atomic_folder(out) as tmp:
        model = {**dict(_tree_tensors(ckpt, "params", tables["params"], np_dtype)),
                 **dict(_tree_tensors(ckpt, SHAPE_VAE_DIR, vae_table, np_dtype))}
        save_file(dict(tqdm(model.items(), desc="export", unit="tensor", disable=not progress)), tmp / "model.safetensors",
                  metadata=metadata)
        if ROUTERS_DIR in tables:
            save_file(dict(_tree_tensors(ckpt, ROUTERS_DIR, tables[ROUTERS_DIR], np_dtype)), tmp / ROUTERS_FILE,
                      metadata=metadata)
        (tmp / hunyuan3d.RELEASE_CONFIG).write_text(hunyuan3d.release_config_yaml(
            config, meta[SHAPE_VAE_DIR], meta.get(hunyuan3d.RELEASE_KEY, {})))
    return out
