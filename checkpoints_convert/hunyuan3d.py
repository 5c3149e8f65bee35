"""Hunyuan3D-2 conversion tables: hy3dgen's `Hunyuan3DDiT` and `ShapeVAE` state dicts (the
release file's `model.*` and `vae.*` tensors, prefixes stripped).

The DiT's blocks are BFL FLUX's, under the same names (fused qkv and linear1, the final adaLN as
(shift, scale)); only the embedders differ: `latent_in` and `cond_in` for FLUX's `img_in` and
`txt_in`, and no pooled `vector_in`. The ShapeVAE's modules carry hy3dgen's names with "_N" for
its one list (`resblocks_3`).
"""

from __future__ import annotations

import dataclasses
import re

import yaml

from edit_jax.checkpoint import SHAPE_VAE_DIR, flatten
from edit_jax.checkpoints_convert.flux import bfl_table, router_table
from edit_jax.checkpoints_convert.tables import Src, transpose
from edit_jax.config import ConfigError, Hunyuan3DConfig
from edit_jax.models.shape_vae import ShapeVAEConfig, abstract_shape_vae

RELEASE_CONFIG = "config.yaml"
RELEASE_KEY = "hunyuan3d_release"  # config.json: the release config.yaml's other parts, written back by export
PREFIXES = {"params": "model.", SHAPE_VAE_DIR: "vae."}  # our tree -> its tensors' prefix in the release file
LEFT_OUT = "conditioner."  # DINOv2: it runs at the edge through transformers, as the text encoders do
EMBEDDERS = {"img_in.": "latent_in.", "txt_in.": "cond_in."}  # BFL FLUX's -> hy3dgen's


def dit_table(cfg: Hunyuan3DConfig) -> dict[str, Src]:
    """Our params <- Hunyuan3DDiT's state dict."""
    table = {}
    for ours, src in bfl_table(cfg).items():
        if ours.startswith("time_text_embed/text_embedder/"):
            continue  # FLUX's pooled vector; Hunyuan3D-2 has none
        key = next((new + src.key[len(old):] for old, new in EMBEDDERS.items() if src.key.startswith(old)), src.key)
        table[ours] = Src(key, src.transforms, src.offset)
    return table


LEAVES = {"kernel": ("weight", (transpose,)), "scale": ("weight", ()), "bias": ("bias", ())}  # Dense, LayerNorm


def shape_vae_table(abstract: dict) -> dict[str, Src]:
    """Our ShapeVAE params <- hy3dgen ShapeVAE's state dict, for every leaf of `abstract`."""
    table = {}
    for path in flatten(abstract):
        *modules, leaf = path.split("/")
        name, transforms = LEAVES[leaf]
        key = ".".join(re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", m) for m in modules)
        table[path] = Src(f"{key}.{name}", transforms)
    return table


def prefixed(table: dict[str, Src], prefix: str) -> dict[str, Src]:
    """The table reading keys under `prefix` (the release file's "model." or "vae.")."""
    return {ours: dataclasses.replace(src, key=prefix + src.key) for ours, src in table.items()}


DIT_FIELDS = {"in_channels": "in_channels", "context_in_dim": "joint_attention_dim", "mlp_ratio": "mlp_ratio",
              "num_heads": "num_attention_heads", "depth": "num_layers", "depth_single_blocks": "num_single_layers",
              "axes_dim": "axes_dims_rope", "qkv_bias": "qkv_bias", "time_factor": "time_factor",
              "guidance_embed": "guidance_embeds"}  # hy3dgen's Hunyuan3DDiT argument -> our field
DIT_INERT = ("hidden_size", "theta", "ckpt_path")  # read below; no positions; loading is ours


def dit_config(params: dict) -> Hunyuan3DConfig:
    """Our config from the release config.yaml's model `params` (hy3dgen's defaults where absent)."""
    unknown = sorted(set(params) - set(DIT_FIELDS) - set(DIT_INERT))
    if unknown:
        raise ConfigError(f"Hunyuan3DDiT config keys not known to edit-jax: {unknown}")
    fields = {ours: params[theirs] for theirs, ours in DIT_FIELDS.items() if theirs in params}
    if "axes_dims_rope" in fields:
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
    heads = params.get("num_heads", 16)
    return Hunyuan3DConfig(**fields, attention_head_dim=params.get("hidden_size", 1024) // heads)


def read_release_config(folder) -> tuple[Hunyuan3DConfig, ShapeVAEConfig]:
    """The DiT's and the ShapeVAE's configs from a release folder's config.yaml; a ConfigError
    where it is not one, or asks for what edit-jax does not build."""
    path = folder / RELEASE_CONFIG if folder is not None else None
    if path is None or not path.is_file():
        raise ConfigError(f"{folder} is not a Hunyuan3D-2 release folder: no {RELEASE_CONFIG} beside its weights")
    try:
        release = yaml.safe_load(path.read_text())
        parts = {name: (release[name]["target"], release[name].get("params") or {}) for name in ("model", "vae", "scheduler")}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a Hunyuan3D-2 config (model, vae and scheduler, each with a target): {e}") from e
    expected = {"model": "Hunyuan3DDiT", "vae": "ShapeVAE", "scheduler": "FlowMatchEulerDiscreteScheduler"}
    for name, cls in expected.items():
        if not parts[name][0].endswith("." + cls):
            raise ConfigError(f"{path}: {name} is {parts[name][0]}, edit-jax converts {cls} only")
    scheduler = parts["scheduler"][1]
    if scheduler.get("shift", 1.0) != 1.0 or scheduler.get("use_dynamic_shifting", False):
        raise ConfigError(f"{path}: a shifted scheduler ({scheduler}) is not implemented in edit-jax")
    return dit_config(parts["model"][1]), ShapeVAEConfig.from_hy3dgen(parts["vae"][1])


def release_table(cfg: Hunyuan3DConfig) -> dict[str, Src]:
    """Our DiT params <- the release file's model.* tensors."""
    return prefixed(dit_table(cfg), PREFIXES["params"])


TABLES = {"release": release_table}
router_table = router_table  # gate_mlps.{i}.* over the double blocks, then the single ones, as FLUX's


def prepare(source, fmt: str = "auto", config: Hunyuan3DConfig | None = None):
    """(config, DiT table, format, None) for a Hunyuan3D-2 release folder: its config.yaml and one
    weight file of model.*, vae.* and conditioner.* tensors (the conditioner is left out)."""
    if fmt not in ("auto", "release"):
        raise ValueError(f"unknown Hunyuan3D-2 format {fmt!r}; choose auto or release")
    found, _ = read_release_config(source.folder)
    if config is not None and config.architecture() != found.architecture():
        raise ConfigError(f"the given config disagrees with {source.folder / RELEASE_CONFIG}")
    source.drop_prefix(LEFT_OUT)
    return found, release_table(found), "release", None


def more_trees(source) -> tuple[dict, dict]:
    """({"shape_vae": (table, abstract)}, config.json keys: {"shape_vae": its config, and the
    release config.yaml's other parts (conditioner, image processor, scheduler, targets)})."""
    _, vae = read_release_config(source.folder)
    release = yaml.safe_load((source.folder / RELEASE_CONFIG).read_text())
    return ({SHAPE_VAE_DIR: shape_vae_tree(vae)},
            {SHAPE_VAE_DIR: dataclasses.asdict(vae), RELEASE_KEY: {k: v for k, v in release.items() if k != "vae"}})


def shape_vae_tree(vae: ShapeVAEConfig) -> tuple[dict[str, Src], dict]:
    """(the ShapeVAE's table over the release file's vae.* tensors, its abstract params)."""
    abstract = abstract_shape_vae(vae)
    return prefixed(shape_vae_table(abstract), PREFIXES[SHAPE_VAE_DIR]), abstract


def release_config_yaml(config: Hunyuan3DConfig, vae: dict, release: dict) -> str:
    """The release config.yaml of a checkpoint: the DiT's params from its config, the ShapeVAE's,
    and the rest as the converted release had them."""
    params = {theirs: getattr(config, ours) for theirs, ours in DIT_FIELDS.items()}
    params["axes_dim"] = list(params["axes_dim"])
    params["hidden_size"] = config.inner_dim
    model = {**release.get("model", {}), "params": {**release.get("model", {}).get("params", {}), **params}}
    out = {**release, "model": model, "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": vae}}
    return yaml.safe_dump(out, sort_keys=False)
