"""The vocabulary of conversion tables.

A table maps each of our param paths ("transformer_blocks/attn/to_q/kernel") to a `Src`: the
source tensor key and the transforms that turn it into our layout. A key holding "{i}" names one
tensor per layer; those are stacked along a new leading axis (the `nn.scan` layer axis), as many
as our param's leading dimension says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Src:
    key: str
    transforms: tuple[Transform, ...] = ()

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def keys(self, num_layers: int | None) -> list[str]:
        return [self.key.format(i=i) for i in range(num_layers)] if self.stacked else [self.key]

    def apply(self, tensor: np.ndarray) -> np.ndarray:
        for t in self.transforms:
            tensor = t(tensor)
        return tensor


def transpose(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> our kernel [in, out]."""
    return w.T


def rows(sizes: tuple[int, ...], index: int) -> Transform:
    """Part `index` of a tensor split along axis 0 into parts of the given sizes (fused qkv)."""
    bounds = np.cumsum((0,) + tuple(sizes))

    def take(w: np.ndarray) -> np.ndarray:
        if w.shape[0] != bounds[-1]:
            raise ValueError(f"cannot split axis 0 of size {w.shape[0]} into {tuple(sizes)}")
        return w[bounds[index] : bounds[index + 1]]

    take.__name__ = f"rows{tuple(sizes)}[{index}]"
    return take


def swap_halves(w: np.ndarray) -> np.ndarray:
    """(shift, scale) -> (scale, shift) along axis 0 (BFL's final adaLN order -> diffusers')."""
    shift, scale = np.split(w, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def linear(ours: str, theirs: str, *pre: Transform) -> dict[str, Src]:
    """A Linear layer: kernel <- weight (transposed), bias <- bias; `pre` runs on both first."""
    return {
        f"{ours}/kernel": Src(f"{theirs}.weight", pre + (transpose,)),
        f"{ours}/bias": Src(f"{theirs}.bias", pre),
    }


def scale(ours: str, theirs_key: str) -> dict[str, Src]:
    """An RMSNorm scale."""
    return {f"{ours}/scale": Src(theirs_key)}
