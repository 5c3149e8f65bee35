"""Fidelity of a sampling run to the dense model's from the same noise (scikit-image's metrics).

Both take a reference set and a test set of the same shape [N, C, H, W] (latents) or [N, H, W]
(images) and return the mean over the N samples. The data range is the reference's (max - min).
"""

from __future__ import annotations

import math

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole set (inf when identical)."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    _check(reference, test)
    mse = float(np.mean((reference - test) ** 2))
    if mse == 0.0:
        return math.inf
    span = float(reference.max() - reference.min()) or 1.0
    return 10.0 * math.log10(span**2 / mse)


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean structural similarity over the samples (1 when identical); channels first for [N, C, H, W]."""
    from skimage.metrics import structural_similarity

    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    _check(reference, test)
    span = float(reference.max() - reference.min()) or 1.0
    side = min(reference.shape[-2:])
    window = min(7, side if side % 2 else side - 1)  # the largest odd window that fits, at most 7
    channels = {"channel_axis": 0} if reference.ndim == 4 else {}
    return float(np.mean([structural_similarity(r, t, data_range=span, win_size=window, **channels)
                          for r, t in zip(reference, test)]))


def json_number(x: float) -> float | str:
    """inf as the string "inf" (JSON has no infinity)."""
    return x if math.isfinite(x) else str(x)


def _check(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape or reference.ndim not in (3, 4):
        raise ValueError(f"fidelity needs two sets of the same shape [N, H, W] or [N, C, H, W]; got "
                         f"{reference.shape} and {test.shape}")
