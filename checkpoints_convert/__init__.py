"""Import PyTorch checkpoints (diffusers, original BFL FLUX) into edit-jax orbax checkpoints,
streaming one stacked tensor at a time."""

from edit_jax.checkpoints_convert.convert import convert_checkpoint
from edit_jax.checkpoints_convert.engine import ConversionError
from edit_jax.checkpoints_convert.sources import open_source

__all__ = ["ConversionError", "convert_checkpoint", "open_source"]
