"""The vocabulary of conversion tables.

A table maps each of our param paths ("transformer_blocks/attn/to_q/kernel") to a `Src`: the
source tensor key and the transforms that turn it into our layout. A key holding "{i}" names one
tensor per layer; those are stacked along a new leading axis (the `nn.scan` layer axis), as many
as our param's leading dimension says, numbered from `offset`.

Tables read both ways: a transform that has an inverse carries it (`transform.inverse`), and
`Src.unapply` runs the inverses in reverse order, so export is the import table read backward.
Transforms that pick a part of a fused tensor (`rows`) have none: such tables import only.
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
    offset: int = 0  # the source number of our layer 0 ("{i}" keys)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def keys(self, num_layers: int | None) -> list[str]:
        return [self.key.format(i=self.offset + i) for i in range(num_layers)] if self.stacked else [self.key]

    def apply(self, tensor: np.ndarray) -> np.ndarray:
        for t in self.transforms:
            tensor = t(tensor)
        return tensor

    @property
    def invertible(self) -> bool:
        return all(hasattr(t, "inverse") for t in self.transforms)

    def unapply(self, tensor: np.ndarray) -> np.ndarray:
        """Our layout -> the source's: the inverse transforms in reverse order."""
        for t in reversed(self.transforms):
            if not hasattr(t, "inverse"):
                raise ValueError(f"{self.key}: transform {getattr(t, '__name__', t)} has no inverse (a fused source tensor)")
            tensor = t.inverse(tensor)
        return tensor


def transpose(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> our kernel [in, out] (its own inverse)."""
    return w.T


transpose.inverse = transpose


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


swap_halves.inverse = swap_halves


def linear(ours: str, theirs: str, *pre: Transform, offset: int = 0) -> dict[str, Src]:
    """A Linear layer: kernel <- weight (transposed), bias <- bias; `pre` runs on both first."""
    return {
        f"{ours}/kernel": Src(f"{theirs}.weight", pre + (transpose,), offset),
        f"{ours}/bias": Src(f"{theirs}.bias", pre, offset),
    }


def scale(ours: str, theirs_key: str) -> dict[str, Src]:
    """An RMSNorm scale."""
    return {f"{ours}/scale": Src(theirs_key)}


def router_table(stacks: tuple[tuple[str, int], ...]) -> dict[str, Src]:
    """Our router tree <- the E-DiT release's gate_mlps.{i}.* (SPEC section 6), for block stacks
    given as (our stack name, the release index of its first block): one numbering over all
    blocks in scan order (FLUX: the double blocks, then the single ones)."""
    table = {}
    for stack, offset in stacks:
        g, r = "gate_mlps.{i}", f"{stack}/router"
        table.update({
            **linear(f"{r}/img_mod/linear", f"{g}.img_mod.1", offset=offset),
            **linear(f"{r}/proj", f"{g}.out.0", offset=offset),
            **linear(f"{r}/gate_head", f"{g}.out.2", offset=offset),
            **linear(f"{r}/width_head", f"{g}.width_head", offset=offset),
        })
    return table
