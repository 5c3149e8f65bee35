"""The checkpoint format: the folder's layout and config.json, what is and is not a checkpoint
(with hints for the folders given in place of one), the stored trees' metadata, and the format-1
migration (a FLUX single block's proj_out stored whole)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edit_jax.checkpoint.paths import overlaps, resolve
from edit_jax.config import DIFFUSERS_CLASSES, config_from_dict, proj_out_parts

FORMAT_NAME = "edit-jax"


FORMAT_VERSION = 3


READABLE_VERSIONS = (1, 2, 3)


CONFIG_FILE = "config.json"


PARAMS_DIR = "params"


ROUTERS_DIR = "routers"
SHAPE_VAE_DIR = "shape_vae"  # Hunyuan3D-2: its ShapeVAE decoder, converted from the same release file


class CheckpointError(ValueError):
    """A path that is not a complete edit-jax checkpoint, or one that does not fit its use."""


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json says it is an edit-jax checkpoint."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(path: Path, overwrite: bool, protect: Iterable[str | Path] = ()) -> None:
    """Raises CheckpointError unless a checkpoint may be written at `path` (resolved): it must not
    overlap a protected path (the source of a conversion), and an existing `path` is replaced
    only with `overwrite` and only when it is an edit-jax checkpoint."""
    for other in protect:
        if overlaps(path, resolve(other)):
            raise CheckpointError(f"refusing to write {path}: it is, holds or lies inside {resolve(other)} (the source)")
    if not path.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if not is_checkpoint(path):
        raise CheckpointError(
            f"refusing to overwrite {path}: it is not an edit-jax checkpoint (no {CONFIG_FILE} saying so); "
            "--overwrite only replaces checkpoints this tool wrote"
        )


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, path + "/"))
        else:
            flat[path] = v
    return flat


def run_dir_hint(path: Path) -> str:
    """Where a training run's folder, given in place of a checkpoint, keeps its trained one ("" for
    other folders)."""
    if is_checkpoint(path / "edit-jax"):
        return f": it is a training run's folder, whose trained checkpoint is {path / 'edit-jax'}"
    if (path / "checkpoints").is_dir() and (path / CONFIG_FILE).is_file():
        return (": it looks like a training run's folder whose run has not finished; its trained checkpoint "
                f"will be {path / 'edit-jax'} (rerun the training command to finish it)")
    return ""


def diffusers_hint(path: Path) -> str:
    """The `convert` command that makes a checkpoint of a diffusers folder given in place of one
    ("" for other folders)."""
    family = _diffusers_family(path)
    if family is None:
        return ""
    name = path.parent.name if path.name == "transformer" else path.name
    return (f": it is a diffusers {family} model folder, not yet converted; make a checkpoint with "
            f"`edit-jax convert {family} {path} ckpt/{name}`")


def _diffusers_family(path: Path) -> str | None:
    """The family of a diffusers transformer folder, or of the pipeline folder holding one; None
    for other folders."""
    for folder in (path, path / "transformer"):
        try:
            name = json.loads((folder / CONFIG_FILE).read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if name in DIFFUSERS_CLASSES:
            return DIFFUSERS_CLASSES[name]
    return None


ROUTER_MODE_KEY = "router_mode"
ROUTER_MODES = ("skip", "reuse")


def router_mode(path: str | Path) -> dict[str, Any]:
    """What a checkpoint's routers were trained for: {"closed": "skip"} (E-DiT: a closed block is
    the identity; also every checkpoint that does not say) or {"closed": "reuse", "max_reuse": K,
    "order": 0 or 1} (`edit_jax.elastic.block_cache.LearnedReuse`). CheckpointError if it says
    something else."""
    mode = read_metadata(path).get(ROUTER_MODE_KEY, {"closed": "skip"})
    if not isinstance(mode, dict) or mode.get("closed") not in ROUTER_MODES or (
            mode["closed"] == "reuse" and not {"max_reuse", "order"} <= set(mode)):
        raise CheckpointError(f"{resolve(path)}: its {ROUTER_MODE_KEY} {mode!r} is not {{'closed': 'skip'}} or "
                              "{'closed': 'reuse', 'max_reuse': K, 'order': 0 or 1}")
    return mode


STEP_SCHEDULE_KEY = "step_schedule"


def step_schedule(path: str | Path) -> dict[str, Any] | None:
    """A learned step schedule the checkpoint holds (`edit-jax train trainable=schedule`), or None:
    {"p": [S][L] the probability that block l computes at step s, the same for every sample; "tau":
    the threshold; "closed": "reuse" or "skip" (what a block below it does); "max_reuse": K; "order":
    0 or 1}. CheckpointError if it says something else."""
    schedule = read_metadata(path).get(STEP_SCHEDULE_KEY)
    if schedule is None:
        return None
    p = np.asarray(schedule.get("p", []), np.float64) if isinstance(schedule, dict) else np.zeros(0)
    if (not isinstance(schedule, dict) or p.ndim != 2 or not ((p >= 0) & (p <= 1)).all()
            or schedule.get("closed") not in ROUTER_MODES or not {"tau", "max_reuse", "order"} <= set(schedule)):
        raise CheckpointError(f"{resolve(path)}: its {STEP_SCHEDULE_KEY} is not {{'p': [steps][blocks] in [0, 1], "
                              "'tau', 'closed': 'skip' or 'reuse', 'max_reuse', 'order'}")
    return schedule


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking the folder is an edit-jax checkpoint."""
    path = resolve(path)
    meta_file = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if not meta_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not an edit-jax checkpoint (no {PARAMS_DIR}/ beside an edit-jax {CONFIG_FILE})"
                              + (run_dir_hint(path) or diffusers_hint(path)))
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file} is not readable JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_file} is not an edit-jax checkpoint config")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} is not one this edit-jax reads "
                              f"{READABLE_VERSIONS}")
    return meta


def load_config(path: str | Path):
    return model_config(read_metadata(path))


def model_config(meta: dict):
    """The model config of a checkpoint's config.json (before format 3: hidden channels in order)."""
    config = dict(meta["config"])
    if meta["version"] < 3:
        config.setdefault("width_groups", 1)
    return config_from_dict(meta["family"], config)


def tree_names(path: str | Path) -> list[str]:
    """The pytrees a checkpoint holds: "params", and "routers" and "shape_vae" when it has them."""
    return [n for n in (PARAMS_DIR, ROUTERS_DIR, SHAPE_VAE_DIR) if (resolve(path) / n).is_dir()]


def format_1_joined(config) -> dict[str, list[tuple[str, int]]]:
    """{format-1 kernel: [(format-2 kernel, rows), ...] in row order} for a model config."""
    if config.family != "flux" or not config.num_single_layers:
        return {}
    stem = "single_transformer_blocks/proj_out"
    return {f"{stem}/kernel": [(f"{stem}/{name}", rows) for name, _, rows in proj_out_parts(config)]}


def joined_kernels(path: Path, tree: str) -> dict[str, list[tuple[str, int]]]:
    """The kernels a params tree stores whole that the current format splits (format 1 only)."""
    meta = read_metadata(path)
    if meta["version"] != 1 or tree != PARAMS_DIR:
        return {}
    return format_1_joined(model_config(meta))
