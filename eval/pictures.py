"""Pictures without plotting libraries: a minimal PNG writer and router heatmaps."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Writes an [H, W, 3] uint8 image as PNG."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)
    return Path(path)


def router_map(p: np.ndarray, executed: np.ndarray, cache_hit: np.ndarray | None = None, cell: int = 12) -> np.ndarray:
    """An RGB heatmap of one sample's routing, steps down, blocks across ([S, L] inputs): blue
    shades for p of skipped blocks, orange to red for p of computed blocks, green for cache hits."""
    p = np.clip(np.asarray(p, np.float32), 0, 1)
    skipped = np.stack([40 + 60 * p, 60 + 80 * p, 120 + 135 * p], -1)
    computed = np.stack([200 + 55 * p, 160 - 140 * p, 40 - 20 * p], -1)
    img = np.where(np.asarray(executed)[..., None], computed, skipped)
    if cache_hit is not None:
        img = np.where(np.asarray(cache_hit)[..., None], np.array([60.0, 190.0, 90.0]), img)
    img = np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)
    img[::cell, :] = img[:, ::cell] = 255  # grid lines
    return img.clip(0, 255).astype(np.uint8)
