"""Latent layout helpers shared by the FLUX and Qwen-Image samplers.

The VAE downsamples 8x; transformers read latents packed into 2x2 patches:
[B, C, H, W] (H = 2 * (height // 16)) <-> [B, (H/2)(W/2), 4C].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VAE_SCALE = 8


PIXEL_MULTIPLE = 2 * VAE_SCALE  # the VAE's 8x downsampling, then the transformer's 2x2 packing


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the unpacked latents for an image of height x width pixels (multiples of 16)."""
    for name, size in (("height", height), ("width", width)):
        if size < PIXEL_MULTIPLE or size % PIXEL_MULTIPLE:
            lower = max(PIXEL_MULTIPLE, size // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            raise ValueError(
                f"{name} {size} is not a multiple of {PIXEL_MULTIPLE} pixels (the VAE's 8x times the 2x2 latent "
                f"packing): use {lower} or {lower + PIXEL_MULTIPLE}"
            )
    return height // VAE_SCALE, width // VAE_SCALE


def packed_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of packed tokens for an image of height x width pixels."""
    h, w = latent_size(height, width)
    return h // 2, w // 2


def pack_latents(latents: jax.Array) -> jax.Array:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], diffusers' _pack_latents."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, height: int, width: int) -> jax.Array:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for an image of height x width pixels."""
    b, n, ch = packed.shape
    h, w = latent_size(height, width)
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} packed tokens do not fit a {height}x{width} image ({(h // 2) * (w // 2)} tokens)")
    x = packed.reshape(b, h // 2, w // 2, ch // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def flux_img_ids(height: int, width: int, index: int = 0) -> np.ndarray:
    """FLUX RoPE positions [N, 3] of the packed image tokens: (index, row, column). index 1 marks
    a reference image's tokens (FLUX.1 Kontext: its ids follow the generated image's)."""
    return grid_img_ids(*packed_grid(height, width), index)


def grid_img_ids(rows: int, cols: int, index: int = 0) -> np.ndarray:
    """FLUX RoPE positions [rows * cols, 3] of a rows x cols grid of packed tokens (float32)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([np.full(rows * cols, index), r.ravel(), c.ravel()], axis=-1).astype(np.float32)


def flux_txt_ids(num_txt: int) -> np.ndarray:
    """FLUX RoPE positions [T, 3] of the text tokens: all zero."""
    return np.zeros((num_txt, 3), np.float32)


def qwen_img_shapes(height: int, width: int) -> tuple[int, int, int]:
    """Qwen-Image's static img_shapes (frames, rows, columns) in packed tokens."""
    return (1, *packed_grid(height, width))


def initial_noise(key: jax.Array, batch: int, latent_channels: int, height: int, width: int) -> jax.Array:
    """Standard normal latents drawn in the VAE layout [B, C, H, W], then packed (float32).

    Args:
      key: a jax.random key. batch: B. latent_channels: C, the VAE's (16 for FLUX.1 and Qwen-Image).
      height, width: the image's pixels, multiples of 16.
    Returns: [B, (H/2)(W/2), 4C] with H = height / 8, W = width / 8.
    """
    h, w = latent_size(height, width)
    return pack_latents(jax.random.normal(key, (batch, latent_channels, h, w), jnp.float32))
