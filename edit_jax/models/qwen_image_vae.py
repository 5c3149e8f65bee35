"""Qwen-Image's VAE (diffusers `AutoencoderKLQwenImage`, the Wan 2.1 causal video VAE) in Flax,
run on single frames: images <-> the latents the transformer reads.

    encode(images [B, 3, H, W] in [-1, 1]) -> (mean, logvar) [B, z_dim, H/8, W/8]
    decode(z [B, z_dim, H/8, W/8]) -> images [B, 3, H, W], clamped to [-1, 1]
    config.to_model_latents(mean) = (mean - latents_mean) / latents_std   (per channel, as the pipeline)
    config.from_model_latents(x) = x * latents_std + latents_mean

diffusers' tensors carry a frame axis ([B, C, 1, H, W]); ours drop it. On one frame (the first
chunk of a video) every causal 3D convolution sees two zero frames of padding before the input, so
it is the 2D convolution with its kernel's last time slice, and the temporal resamplers are skipped
(diffusers runs `time_conv` only from a video's second chunk). The params hold diffusers' full 3D
kernels and the unused `time_conv`s anyway, so a converted VAE reads back to the same state dict.
Module and param names follow diffusers (`down_blocks_3/resample_1/kernel`, `norm1/gamma`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


@dataclasses.dataclass(frozen=True)
class AutoencoderKLQwenImageConfig:
    """diffusers' AutoencoderKLQwenImage config fields (Qwen-Image's values by default)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    input_channels: int = 3
    latents_mean: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"vae temperal_downsample {self.temperal_downsample} needs {len(self.dim_mult) - 1} "
                             f"entries (one per downsampling of dim_mult {self.dim_mult})")
        if self.attn_scales:  # diffusers' encoder cannot run them either (its attention takes no frame cache)
            raise ValueError(f"vae attn_scales {self.attn_scales}: only [] (Qwen-Image's) is supported")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"vae {name} has {len(getattr(self, name))} entries for z_dim {self.z_dim}")

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def in_channels(self) -> int:
        return self.input_channels

    clamps_output = True  # decode clamps to [-1, 1] (tiled decode: after blending, as the pipeline does)

    @property
    def downscale(self) -> int:
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> AutoencoderKLQwenImageConfig:
        """From a diffusers vae/config.json dict (unknown fields ignored)."""
        if config.get("dropout", 0.0) != 0.0:
            raise ValueError(f"vae dropout {config['dropout']}: only inference (0.0) is supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})

    def module(self) -> AutoencoderKLQwenImage:
        return AutoencoderKLQwenImage(self)

    def _stats(self, latents):
        shape = (1, self.z_dim) + (1,) * (jnp.ndim(latents) - 2)
        return np.reshape(self.latents_mean, shape).astype(np.float32), np.reshape(self.latents_std, shape).astype(np.float32)

    def to_model_latents(self, mean):
        """The VAE's latents [B, z_dim, h, w] as the transformer reads them (before 2x2 packing)."""
        mu, std = self._stats(mean)
        return (mean - mu) / std

    def from_model_latents(self, latents):
        """The transformer's latents (unpacked) as the VAE decodes them."""
        mu, std = self._stats(latents)
        return latents * std + mu


class CausalConv3d(nn.Module):
    """diffusers QwenImageCausalConv3d on one frame [B, H, W, C]: the 2D convolution with the
    kernel's last time slice (the other slices meet the causal zero padding). kernel [kt, kh, kw, in, out]."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        pad = [(k // 2, k // 2) for k in self.kernel_size[1:]]
        y = jax.lax.conv_general_dilated(x, kernel[-1].astype(x.dtype), (1, 1), pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(x.dtype)


class TimeConv(nn.Module):
    """A temporal resampler's causal conv (kernel [3, 1, 1, in, out]): declared, never run on one frame."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self):
        self.param("kernel", nn.initializers.lecun_normal(), (3, 1, 1, self.in_features, self.features))
        self.param("bias", nn.initializers.zeros, (self.features,))


class RMSNorm(nn.Module):
    """diffusers QwenImageRMS_norm: x / ||x|| over channels * sqrt(channels) * gamma [C]."""

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.ones, (x.shape[-1],))
        norm = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORMALIZE_EPS)
        return x / norm * np.sqrt(x.shape[-1]).astype(x.dtype) * gamma.astype(x.dtype)


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    out_dim: int

    @nn.compact
    def __call__(self, x):
        h = x if x.shape[-1] == self.out_dim else CausalConv3d(self.out_dim, (1, 1, 1), name="conv_shortcut")(x)
        x = CausalConv3d(self.out_dim, name="conv1")(nn.silu(RMSNorm(name="norm1")(x)))
        x = CausalConv3d(self.out_dim, name="conv2")(nn.silu(RMSNorm(name="norm2")(x)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels: 1x1 conv to q, k, v; 1x1 projection; residual."""

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = nn.Conv(3 * c, (1, 1), name="to_qkv")(RMSNorm(name="norm")(x)).reshape(b, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c).astype(x.dtype), axis=-1)
        out = nn.Conv(c, (1, 1), name="proj")(jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c))
        return x + out


class MidBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResidualBlock(c, name="resnets_0")(x)
        x = AttentionBlock(name="attentions_0")(x)
        return ResidualBlock(c, name="resnets_1")(x)


class Resample(nn.Module):
    """diffusers QwenImageResample on one frame. Down: pad right and bottom by one, 3x3 conv of
    stride 2. Up: nearest 2x (nearest-exact at an integer scale), 3x3 conv to half the channels.
    `temporal`: the 3D variants, whose time_conv is held but skipped."""

    dim: int
    up: bool
    temporal: bool

    @nn.compact
    def __call__(self, x):
        if self.temporal:
            TimeConv(self.dim, 2 * self.dim if self.up else self.dim, name="time_conv")()
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return nn.Conv(self.dim // 2, (3, 3), padding=((1, 1), (1, 1)), name="resample_1")(x)
        return nn.Conv(self.dim, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="resample_1")(x)


class Encoder(nn.Module):
    """diffusers QwenImageEncoder3d: its flat `down_blocks` list holds residual blocks and
    downsamplers in order."""

    config: AutoencoderKLQwenImageConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dims = [cfg.base_dim * m for m in (1,) + cfg.dim_mult]
        x = CausalConv3d(dims[0], name="conv_in")(x)
        index = 0
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, name=f"down_blocks_{index}")(x)
                index += 1
            if i != len(cfg.dim_mult) - 1:
                x = Resample(out_dim, up=False, temporal=cfg.temperal_downsample[i], name=f"down_blocks_{index}")(x)
                index += 1
        x = MidBlock(name="mid_block")(x)
        return CausalConv3d(2 * cfg.z_dim, name="conv_out")(nn.silu(RMSNorm(name="norm_out")(x)))


class UpBlock(nn.Module):
    """diffusers QwenImageUpBlock: num_res_blocks + 1 residual blocks, then the upsampler unless last."""

    out_dim: int
    num_res_blocks: int
    upsample: bool
    temporal: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Resample(self.out_dim, up=True, temporal=self.temporal, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    """diffusers QwenImageDecoder3d: mid block, then up blocks whose upsamplers halve the channels."""

    config: AutoencoderKLQwenImageConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        temperal_upsample = cfg.temperal_downsample[::-1] + (False,)
        x = CausalConv3d(dims[0], name="conv_in")(z)
        x = MidBlock(name="mid_block")(x)
        for i, out_dim in enumerate(dims[1:]):
            x = UpBlock(out_dim, cfg.num_res_blocks, upsample=i != len(cfg.dim_mult) - 1,
                        temporal=temperal_upsample[i], name=f"up_blocks_{i}")(x)
        return CausalConv3d(cfg.input_channels, name="conv_out")(nn.silu(RMSNorm(name="norm_out")(x)))


class AutoencoderKLQwenImage(nn.Module):
    """`encode` -> (mean, logvar) of the latent distribution; `decode` -> images (channels-first)."""

    config: AutoencoderKLQwenImageConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1))

    def encode(self, images):
        """images [B, input_channels, H, W] -> (mean, logvar) [B, z_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(jnp.moveaxis(images, 1, -1)))
        mean, logvar = jnp.split(jnp.moveaxis(moments, -1, 1), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z, clamp: bool = True):
        """z [B, z_dim, h, w] -> images [B, input_channels, f h, f w], clamped to [-1, 1]."""
        x = jnp.moveaxis(self.decoder(self.post_quant_conv(jnp.moveaxis(z, 1, -1))), -1, 1)
        return jnp.clip(x, -1.0, 1.0) if clamp else x

    def __call__(self, images):
        return self.decode(self.encode(images)[0])
