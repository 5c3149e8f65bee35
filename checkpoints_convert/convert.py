"""`convert_checkpoint`: any supported source of a model family -> an edit-jax checkpoint."""

from __future__ import annotations

from pathlib import Path

from edit_jax.models.registry import abstract_params, abstract_routers
from edit_jax.checkpoints_convert import flux, hunyuan3d, qwen_image
from edit_jax.checkpoints_convert.engine import convert_source
from edit_jax.checkpoints_convert.sources import open_source

FAMILIES = {"flux": flux, "qwen-image": qwen_image, "hunyuan3d": hunyuan3d}
FORMATS = {"flux": ("auto", "diffusers", "bfl", "edit-release"), "qwen-image": ("auto", "diffusers", "edit-release"),
           "hunyuan3d": ("auto", "release")}


def convert_checkpoint(
    family: str,
    src: str | Path,
    dst: str | Path,
    *,
    fmt: str = "auto",
    dtype: str = "bfloat16",
    config=None,
    width_groups: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts `src` (a weight file or folder) into the checkpoint `dst`; params stored in `dtype`,
    the elastic MLPs' hidden channels in `width_groups` groups (default: the config's).

    Returns the checkpoint path. Nothing is left at `dst` when anything goes wrong; `dst` never
    overlaps `src`, and an existing `dst` is replaced (with `overwrite`) only when it is an
    edit-jax checkpoint, and only once the new one is complete.

    Args:
      family: "flux", "qwen-image" or "hunyuan3d" (a Hunyuan3D-2 release folder: config.yaml and
        its one weight file; the DiT and the ShapeVAE decoder are converted, the image encoder left out).
        src: the weights. dst: the checkpoint to write.
      fmt: "auto", "diffusers", "bfl", "edit-release" or "release" (Hunyuan3D-2). dtype: above. config: the model config
        (None: the source's own). width_groups: above. overwrite: above. progress: show progress.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    source = open_source(src)
    if fmt not in FORMATS[family]:
        raise ValueError(f"unknown {family} format {fmt!r}; choose from {', '.join(FORMATS[family])}")
    config, table, fmt, router_table = FAMILIES[family].prepare(source, fmt, config)
    if width_groups is not None:
        config = config.replace(width_groups=width_groups)
        table = FAMILIES[family].TABLES[fmt](config)
    config = config.with_runtime(param_dtype=dtype)
    trees = {"params": (table, abstract_params(config))}
    if router_table is not None:
        trees["routers"] = (router_table, abstract_routers(config))
    more, more_config = FAMILIES[family].more_trees(source)
    trees.update(more)
    return convert_source(
        trees,
        source,
        config,
        dst,
        overwrite=overwrite,
        progress=progress,
        extra={**more_config, "converted_from": {"path": str(Path(src).absolute()), "format": fmt}},
        protect=[src],
    )
