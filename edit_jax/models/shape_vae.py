"""Hunyuan3D-2's ShapeVAE decoder (hy3dgen `ShapeVAE`) in Flax: shape latents -> an occupancy
field (logits) queried at 3D points, and the mesh of its level set.

    vae = ShapeVAE(config)
    latents = vae.apply({"params": params}, x, method=ShapeVAE.decode)        # x [B, N, embed_dim] -> [B, N, width]
    grid = decode_volume(config, params, latents, bounds, octree_resolution)   # [B, R + 1, R + 1, R + 1] logits
    vertices, faces = extract_surface(grid[0], mc_level, bounds)

`ShapeVAE.decode` is hy3dgen's `ShapeVAE.forward` on latents / scale_factor (post_kl, then the
self-attention transformer); the geometry decoder (`ShapeVAE.occupancy`) embeds each point with
Fourier features and cross-attends to the latents. Param names follow hy3dgen's modules with "_N"
for its one list (`transformer/resblocks_3/attn/c_qkv`), so the conversion table is a renaming
(`edit_jax.checkpoints_convert.hunyuan3d.shape_vae_table`). `decode_volume` decodes the grid in
chunks of fixed size; `extract_surface` is scikit-image's marching cubes on it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.layers import attention

LN_EPS = 1e-6  # hy3dgen's blocks; the decoder's ln_post takes PyTorch's default 1e-5


@dataclasses.dataclass(frozen=True)
class ShapeVAEConfig:
    """hy3dgen ShapeVAE's config.yaml `params` (the decoder's; Hunyuan3D-2's sizes by default)."""

    num_latents: int = 3072
    embed_dim: int = 64
    width: int = 1024
    heads: int = 16
    num_decoder_layers: int = 16
    geo_decoder_downsample_ratio: int = 1
    geo_decoder_mlp_expand_ratio: int = 4
    geo_decoder_ln_post: bool = True
    num_freqs: int = 8
    include_pi: bool = False
    qkv_bias: bool = False
    qk_norm: bool = True
    label_type: str = "binary"
    drop_path_rate: float = 0.0
    scale_factor: float = 0.9990943042622529

    def __post_init__(self):
        if self.geo_decoder_downsample_ratio != 1:
            raise ValueError("ShapeVAE geo_decoder_downsample_ratio != 1 is not implemented in edit-jax")
        if self.width % self.heads:
            raise ValueError(f"ShapeVAE width {self.width} must be a multiple of heads {self.heads}")

    @classmethod
    def from_hy3dgen(cls, params: dict[str, Any]) -> ShapeVAEConfig:
        """From the `params` of the release's vae config.yaml (unknown keys: a ValueError naming them)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"ShapeVAE config keys not known to edit-jax: {unknown}")
        return cls(**params)


def fourier_embed(points: jax.Array, num_freqs: int, include_pi: bool) -> jax.Array:
    """[..., 3] -> [..., 3 (2 num_freqs + 1)]: the points, then sin and cos of each coordinate
    times 2^j (times pi with include_pi), coordinate-major (hy3dgen's FourierEmbedder)."""
    freqs = 2.0 ** np.arange(num_freqs, dtype=np.float32)
    if include_pi:
        freqs = freqs * np.float32(np.pi)
    embed = (points[..., None] * jnp.asarray(freqs)).reshape(*points.shape[:-1], -1)
    return jnp.concatenate([points, jnp.sin(embed), jnp.cos(embed)], axis=-1)


class MLP(nn.Module):
    """c_proj(gelu(c_fc(x))), exact GELU."""

    expand_ratio: int = 4

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        return nn.Dense(width, name="c_proj")(nn.gelu(nn.Dense(width * self.expand_ratio, name="c_fc")(x), approximate=False))


def _heads(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:2], heads, -1)


class QKNorm(nn.Module):
    """The per-head LayerNorms of q and k (hy3dgen's `attention.q_norm`, `k_norm`), or nothing."""

    enabled: bool

    @nn.compact
    def __call__(self, q, k):
        if not self.enabled:
            return q, k
        return nn.LayerNorm(LN_EPS, name="q_norm")(q), nn.LayerNorm(LN_EPS, name="k_norm")(k)


class SelfAttention(nn.Module):
    """hy3dgen MultiheadAttention: c_qkv's output read per head as [q | k | v]."""

    heads: int
    qkv_bias: bool
    qk_norm: bool

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        q, k, v = jnp.split(_heads(nn.Dense(3 * width, use_bias=self.qkv_bias, name="c_qkv")(x), self.heads), 3, axis=-1)
        q, k = QKNorm(self.qk_norm, name="attention")(q, k)
        return nn.Dense(width, name="c_proj")(attention(q, k, v))


class ResidualAttentionBlock(nn.Module):
    heads: int
    qkv_bias: bool
    qk_norm: bool

    @nn.compact
    def __call__(self, x):
        x = x + SelfAttention(self.heads, self.qkv_bias, self.qk_norm, name="attn")(nn.LayerNorm(LN_EPS, name="ln_1")(x))
        return x + MLP(name="mlp")(nn.LayerNorm(LN_EPS, name="ln_2")(x))


class Transformer(nn.Module):
    config: ShapeVAEConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for i in range(cfg.num_decoder_layers):
            x = ResidualAttentionBlock(cfg.heads, cfg.qkv_bias, cfg.qk_norm, name=f"resblocks_{i}")(x)
        return x


class CrossAttention(nn.Module):
    """hy3dgen MultiheadCrossAttention: q from the queries, c_kv's output of the data read per head
    as [k | v] (`data_kv`, computed once for many query chunks)."""

    width: int
    heads: int
    qkv_bias: bool
    qk_norm: bool

    def setup(self):
        self.c_q = nn.Dense(self.width, use_bias=self.qkv_bias)
        self.c_kv = nn.Dense(2 * self.width, use_bias=self.qkv_bias)
        self.c_proj = nn.Dense(self.width)
        self.attention = QKNorm(self.qk_norm)

    def data_kv(self, data):
        return self.c_kv(data)

    def __call__(self, x, kv):
        q = _heads(self.c_q(x), self.heads)
        k, v = jnp.split(_heads(kv, self.heads), 2, axis=-1)
        q, k = self.attention(q, k)
        return self.c_proj(attention(q, k, v))


class ResidualCrossAttentionBlock(nn.Module):
    width: int
    heads: int
    qkv_bias: bool
    qk_norm: bool
    mlp_expand_ratio: int = 4

    def setup(self):
        self.attn = CrossAttention(self.width, self.heads, self.qkv_bias, self.qk_norm)
        self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(LN_EPS) for _ in range(3))
        self.mlp = MLP(self.mlp_expand_ratio)

    def data_kv(self, data):
        return self.attn.data_kv(self.ln_2(data))

    def __call__(self, x, kv):
        x = x + self.attn(self.ln_1(x), kv)
        return x + self.mlp(self.ln_3(x))


class CrossAttentionDecoder(nn.Module):
    """hy3dgen's geometry decoder: points [B, P, 3] and the latents' keys and values -> logits [B, P, 1]."""

    config: ShapeVAEConfig

    def setup(self):
        cfg = self.config
        self.query_proj = nn.Dense(cfg.width)
        self.cross_attn_decoder = ResidualCrossAttentionBlock(cfg.width, cfg.heads, cfg.qkv_bias,
                                                              cfg.qk_norm and cfg.geo_decoder_ln_post,
                                                              cfg.geo_decoder_mlp_expand_ratio)
        if cfg.geo_decoder_ln_post:
            self.ln_post = nn.LayerNorm(1e-5)
        self.output_proj = nn.Dense(1)

    def data_kv(self, latents):
        return self.cross_attn_decoder.data_kv(latents)

    def __call__(self, points, kv):
        cfg = self.config
        x = self.query_proj(fourier_embed(points, cfg.num_freqs, cfg.include_pi))
        x = self.cross_attn_decoder(x, kv)
        if cfg.geo_decoder_ln_post:
            x = self.ln_post(x)
        return self.output_proj(x)


class ShapeVAE(nn.Module):
    """The decoder half of hy3dgen's ShapeVAE. __call__(x, points) runs all of it (init)."""

    config: ShapeVAEConfig

    def setup(self):
        self.post_kl = nn.Dense(self.config.width)
        self.transformer = Transformer(self.config)
        self.geo_decoder = CrossAttentionDecoder(self.config)

    def decode(self, x):
        """x [B, N, embed_dim] (the DiT's latents) -> [B, N, width]: hy3dgen's vae(x / scale_factor)."""
        return self.transformer(self.post_kl(x * (1.0 / self.config.scale_factor)))

    def data_kv(self, latents):
        """latents [B, N, width] -> the geometry decoder's keys and values [B, N, 2 width]."""
        return self.geo_decoder.data_kv(latents)

    def occupancy(self, points, kv):
        """points [B, P, 3] in the bounding box -> logits [B, P, 1] (the surface at mc_level)."""
        return self.geo_decoder(points, kv)

    def __call__(self, x, points):
        return self.occupancy(points, self.data_kv(self.decode(x)))


def init_shape_vae(config: ShapeVAEConfig, seed: int = 0) -> dict:
    """Random params (float32) of the decoder."""
    x = jnp.zeros((1, config.num_latents, config.embed_dim))
    return ShapeVAE(config).init(jax.random.key(seed), x, jnp.zeros((1, 2, 3)))["params"]


def abstract_shape_vae(config: ShapeVAEConfig) -> dict:
    """The decoder's params as ShapeDtypeStructs (no weights)."""
    return jax.eval_shape(lambda: init_shape_vae(config))


def grid_axes(bounds: float | tuple[float, ...], octree_resolution: int) -> list[np.ndarray]:
    """Per axis the octree_resolution + 1 coordinates (float32) of hy3dgen's dense grid over the
    box `bounds` (a half-width b: [-b, b]^3; or (x0, y0, z0, x1, y1, z1))."""
    if isinstance(bounds, (int, float)):
        bounds = (-bounds, -bounds, -bounds, bounds, bounds, bounds)
    lo, hi = np.array(bounds[0:3]), np.array(bounds[3:6])
    return [np.linspace(lo[a], hi[a], int(octree_resolution) + 1, dtype=np.float32) for a in range(3)]


@functools.lru_cache(maxsize=8)
def chunk_decoder(config: ShapeVAEConfig, num_chunks: int):
    """The jitted chunk(params, kv, axes [3, R + 1], start) -> logits [B, num_chunks] that
    `decode_volume` calls per chunk (compiled once per config and chunk size)."""
    model = ShapeVAE(config)

    @jax.jit
    def chunk(params, kv, axes, start):
        """The logits [B, num_chunks] of grid points start ... start + num_chunks - 1 (ij order)."""
        n = axes.shape[1]
        p = jnp.minimum(start + jnp.arange(num_chunks), n**3 - 1)
        points = jnp.stack([axes[0][p // (n * n)], axes[1][(p // n) % n], axes[2][p % n]], axis=-1)
        points = jnp.broadcast_to(points, (kv.shape[0], *points.shape)).astype(kv.dtype)
        return model.apply({"params": params}, points, kv, method=ShapeVAE.occupancy)[..., 0]

    return chunk


def decode_volume(config: ShapeVAEConfig, params: dict, latents: jax.Array, bounds: float | tuple = 1.01,
                  octree_resolution: int = 384, num_chunks: int = 8000,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The occupancy logits [B, R + 1, R + 1, R + 1] (float32, on the host) of the decoded latents
    on hy3dgen's dense grid (R = octree_resolution), `num_chunks` points at a time: device memory
    holds one chunk's queries whatever R is (hy3dgen's VanillaVolumeDecoder).

    Args:
      config, params: the ShapeVAE's. latents: [B, N, width], `ShapeVAE.decode`'s output.
      bounds: the box (`grid_axes`). octree_resolution: R, cells per side. num_chunks: points per
        call (hy3dgen's name). progress: progress(done, total) after each chunk, or None.
    """
    if octree_resolution < 1 or num_chunks < 1:
        raise ValueError(f"octree_resolution {octree_resolution} and num_chunks {num_chunks} must be >= 1")
    kv = ShapeVAE(config).apply({"params": params}, latents, method=ShapeVAE.data_kv)
    axes = jnp.asarray(np.stack(grid_axes(bounds, octree_resolution)))
    n = octree_resolution + 1
    total = n**3
    out = np.empty((latents.shape[0], total), np.float32)
    chunk = chunk_decoder(config, num_chunks)
    for start in range(0, total, num_chunks):
        logits = np.asarray(chunk(params, kv, axes, start), np.float32)
        out[:, start : start + num_chunks] = logits[:, : total - start]
        if progress is not None:
            progress(min(start + num_chunks, total), total)
    return out.reshape(-1, n, n, n)


def extract_surface(grid: np.ndarray, mc_level: float = 0.0, bounds: float | tuple = 1.01) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3] float32 in the box, faces [F, 3]) of the level set `mc_level` of one grid
    [R + 1, R + 1, R + 1]: scikit-image's Lewiner marching cubes, placed in the box as hy3dgen's
    MCSurfaceExtractor places them (scaled by the box over R + 1 points). Faces keep
    scikit-image's winding; hy3dgen's trimesh export reverses it (`mesh_faces_outward`)."""
    from skimage import measure

    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"a volume grid is [R + 1, R + 1, R + 1], got {grid.shape}")
    if not grid.min() <= mc_level <= grid.max():
        raise ValueError(f"no surface: the grid's values lie in [{grid.min():.3g}, {grid.max():.3g}], "
                         f"not across mc_level {mc_level}")
    vertices, faces, _, _ = measure.marching_cubes(grid, mc_level, method="lewiner")
    if isinstance(bounds, (int, float)):
        bounds = (-bounds, -bounds, -bounds, bounds, bounds, bounds)
    lo, hi = np.array(bounds[0:3]), np.array(bounds[3:6])
    vertices = vertices / np.array([grid.shape[0]] * 3) * (hi - lo) + lo
    return vertices.astype(np.float32), np.ascontiguousarray(faces)


def mesh_faces_outward(faces: np.ndarray) -> np.ndarray:
    """Faces in the winding hy3dgen's meshes take (each triangle's vertex order reversed)."""
    return np.ascontiguousarray(faces[:, ::-1])
