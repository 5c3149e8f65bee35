"""FLUX.1's VAE (diffusers `AutoencoderKL`) in Flax: images <-> the latents the transformer reads.

    encode(images [B, 3, H, W] in [-1, 1]) -> the latent distribution's mean [B, C, H/f, W/f]
    decode(z [B, C, H/f, W/f]) -> images [B, 3, H, W]
    config.to_model_latents(mean) = (mean - shift_factor) * scaling_factor    (what FluxPipeline feeds)
    config.from_model_latents(x) = x / scaling_factor + shift_factor          (what it decodes)
    decode_tiled(...)  decodes large images in overlapping, blended tiles (bounded memory; either VAE)

f = 2^(number of blocks - 1) (8 for FLUX.1). Arrays are channels-first at the interface, as in
diffusers, and channels-last inside. Param names follow diffusers' modules (`down_blocks_0/
resnets_1/conv1`), so the conversion table (`checkpoints_convert/vae.py`) is a renaming.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers' AutoencoderKL config fields (FLUX.1's values by default)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> AutoencoderKLConfig:
        """From a diffusers vae/config.json dict (unknown fields ignored; the block types must be
        the plain encoder and decoder blocks FLUX uses)."""
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != kind for t in config.get(key, [kind])):
                raise ValueError(f"vae {key} {config[key]}: only {kind} is supported")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae act_fn {config['act_fn']!r}: only silu is supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        return cls(**values)

    clamps_output = False

    def module(self) -> AutoencoderKL:
        return AutoencoderKL(self)

    def to_model_latents(self, mean):
        """The VAE's latents as the transformer reads them (before 2x2 packing)."""
        return (mean - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_model_latents(self, latents):
        """The transformer's latents (unpacked) as the VAE decodes them."""
        return latents / self.scaling_factor + (self.shift_factor or 0.0)


EPS = 1e-6


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, padding="SAME") -> nn.Conv:
    pad = padding if padding != "SAME" else ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without a time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, name="norm1")(x))
        h = _conv(self.out_channels, "conv1")(h)
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=EPS, name="norm2")(h))
        h = _conv(self.out_channels, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding="VALID")(x)
        return x + h


class AttentionBlock(nn.Module):
    """The mid block's single-head self-attention over all pixels, with group norm and residual."""

    groups: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = nn.GroupNorm(self.groups, epsilon=EPS, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n)(tokens) for n in ("to_q", "to_k", "to_v"))
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(jnp.float32(c)), axis=-1)
        out = nn.Dense(c, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    attention: bool

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, name="resnets_0")(x)
        if self.attention:
            x = AttentionBlock(self.groups, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Resample(nn.Module):
    """diffusers Downsample2D (pad right and bottom by one, 3x3 conv of stride 2) or Upsample2D
    (nearest-neighbour 2x, 3x3 conv)."""

    channels: int
    up: bool

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return _conv(self.channels, "conv")(x)
        return _conv(self.channels, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class ResampleBlock(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `layers` resnets, then a resampler unless last."""

    channels: int
    layers: int
    groups: int
    up: bool
    resample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}")(x)
        if self.resample:
            x = Resample(self.channels, self.up, name="upsamplers_0" if self.up else "downsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _conv(cfg.block_out_channels[0], "conv_in")(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = ResampleBlock(channels, cfg.layers_per_block, cfg.norm_num_groups, up=False, resample=i < last,
                              name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=EPS, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        x = _conv(channels[0], "conv_in")(z)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block")(x)
        for i, out in enumerate(channels):
            x = ResampleBlock(out, cfg.layers_per_block + 1, cfg.norm_num_groups, up=True,
                              resample=i < len(channels) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=EPS, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """`encode` -> (mean, logvar) of the latent distribution; `decode` -> images (channels-first)."""

    config: AutoencoderKLConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, "quant_conv", kernel=1, padding="VALID")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, "post_quant_conv", kernel=1, padding="VALID")

    def encode(self, images):
        """images [B, in_channels, H, W] -> (mean, logvar) [B, latent_channels, H/f, W/f]."""
        moments = self.encoder(jnp.moveaxis(images, 1, -1))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(jnp.moveaxis(moments, -1, 1), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """z [B, latent_channels, h, w] -> images [B, out_channels, f h, f w]."""
        z = jnp.moveaxis(z, 1, -1)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return jnp.moveaxis(self.decoder(z), -1, 1)

    def __call__(self, images):
        return self.decode(self.encode(images)[0])


def abstract_vae(config) -> dict:
    """The param tree's shapes (float32) of either VAE (AutoencoderKLConfig or
    AutoencoderKLQwenImageConfig), traced without allocating."""
    size = 2 * config.downscale
    images = jax.ShapeDtypeStruct((1, 3, size, size), jnp.float32)
    return jax.eval_shape(lambda x: config.module().init(jax.random.key(0), x), images)["params"]


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """b's first `extent` rows (along axis) fade in over a's last ones, in place (diffusers' blend_v/h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return
    shape = [1] * b.ndim
    shape[axis] = extent
    w = (np.arange(extent, dtype=np.float32) / extent).reshape(shape)
    head = [slice(None)] * b.ndim
    head[axis] = slice(0, extent)
    tail = list(head)
    tail[axis] = slice(a.shape[axis] - extent, a.shape[axis])
    b[tuple(head)] = a[tuple(tail)] * (1 - w) + b[tuple(head)] * w


def check_vae_fits(vae_config, config, path) -> None:
    """The VAE at `path` decodes what the transformer of `config` denoises (2x2-packed latents of an 8x VAE)."""
    if 4 * vae_config.latent_channels != config.in_channels or vae_config.downscale != 8:
        raise ValueError(f"the VAE {path} ({vae_config.latent_channels} latent channels, {vae_config.downscale}x) does "
                         f"not fit the transformer ({config.in_channels} packed channels, a 8x VAE)")


TILE_OVERLAP = 0.25  # of a tile, on each side that meets another (diffusers' tiled decoders)


def check_tile_size(tile_size: int, downscale: int = 8, flag: str = "--tile-size") -> None:
    """Raises ValueError unless tiles of `tile_size` pixels step and overlap by whole latents: a
    positive multiple of 4 x the VAE's scale (32 px for FLUX.1's and Qwen-Image's 8x VAEs)."""
    unit = round(downscale / TILE_OVERLAP)
    if tile_size < unit or tile_size % unit:
        below, above = max(unit, tile_size // unit * unit), (tile_size // unit + 1) * unit
        raise ValueError(f"{flag} {tile_size}: give a multiple of {unit} px (4 x the VAE's {downscale}x scale, so "
                         f"that tiles overlap by whole latents), e.g. {below if below != tile_size else above}; "
                         f"1024 is the pipelines' own")


def decode_tiled(config, params: dict, z, tile_size: int = 1024, overlap: float = TILE_OVERLAP,
                 progress=None) -> np.ndarray:
    """decode() of either VAE in overlapping tiles of tile_size x tile_size image pixels, blended
    linearly across the overlaps, as diffusers' tiled_decode (AutoencoderKL's tile_sample_min_size,
    FLUX.1's sample_size 1024; AutoencoderKLQwenImage's tile_sample_min_height/width with a stride
    of 3/4 tile): memory is bounded by one tile whatever the image size. Latents no larger than a
    tile are decoded whole. A VAE that clamps its output is clamped after blending.
    progress(n): called after each tile.

    Args:
      config, params: the VAE's (`edit_jax.checkpoints_convert.vae.load_vae`).
      z: [B, C, H, W] latents in the VAE's own scale (`config.from_model_latents`).
      tile_size: the tile's side, image pixels (a multiple of 32). overlap: the tiles' overlap, a
        fraction of the tile (default: the VAE's own). progress: above.
    Returns: [B, 3, 8H, 8W] images in [-1, 1].
    """
    check_tile_size(tile_size, config.downscale)
    latent_tile = tile_size // config.downscale
    z = np.asarray(z, np.float32)
    if z.shape[-2] <= latent_tile and z.shape[-1] <= latent_tile:
        return np.asarray(_tile_decoder(config, clamp=True)(params, z))
    decode = _tile_decoder(config, clamp=False)
    step = int(latent_tile * (1 - overlap))
    extent = int(tile_size * overlap)
    limit = tile_size - extent
    rows = []
    for i in range(0, z.shape[2], step):
        row = []
        for j in range(0, z.shape[3], step):
            row.append(np.array(decode(params, z[:, :, i : i + latent_tile, j : j + latent_tile])))
            if progress is not None:
                progress(1)
        rows.append(row)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, extent, axis=2)
            if j > 0:
                _blend(row[j - 1], tile, extent, axis=3)
    images = np.concatenate([np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3) for row in rows], axis=2)
    return np.clip(images, -1.0, 1.0) if config.clamps_output else images


@functools.lru_cache(maxsize=8)
def _tile_decoder(config, clamp: bool):
    kwargs = {"clamp": clamp} if config.clamps_output else {}
    return jax.jit(lambda params, z: config.module().apply({"params": params}, z, method="decode", **kwargs))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' image processor."""
    x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)
