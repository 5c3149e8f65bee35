"""Import PyTorch checkpoints (diffusers, original BFL FLUX) into edit-jax orbax checkpoints,
streaming one stacked tensor at a time."""

from checkpoints_convert.convert import convert_checkpoint
from checkpoints_convert.engine import ConversionError
from checkpoints_convert.sources import open_source

__all__ = ["ConversionError", "convert_checkpoint", "open_source"]
