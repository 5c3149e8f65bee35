"""`convert_checkpoint`: any supported source of a model family -> an edit-jax checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edit_jax.models import abstract_params
from checkpoints_convert import flux
from checkpoints_convert.engine import convert_source
from checkpoints_convert.sources import open_source

FAMILIES = {"flux": flux}
FORMATS = {"flux": ("auto", "diffusers", "bfl")}


def convert_checkpoint(
    family: str,
    src: str | Path,
    dst: str | Path,
    *,
    fmt: str = "auto",
    dtype: str = "bfloat16",
    config=None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts `src` (a weight file or folder) into the checkpoint `dst`; params stored in `dtype`.

    Returns the checkpoint path. Nothing is left at `dst` when anything goes wrong."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    source = open_source(src)
    config, table, fmt = FAMILIES[family].prepare(source, fmt, config)
    config = config.with_runtime(param_dtype=dtype)
    return convert_source(
        table,
        source,
        config,
        abstract_params(config),
        dst,
        overwrite=overwrite,
        progress=progress,
        extra={"converted_from": {"path": str(Path(src).absolute()), "format": fmt}},
    )
