"""The vocabulary of conversion tables.

A table maps each of our param paths ("transformer_blocks/attn/to_q/kernel") to a `Src`: the
source tensor key and the transforms that turn it into our layout. A key holding "{i}" names one
tensor per layer; those are stacked along a new leading axis (the `nn.scan` layer axis), as many
as our param's leading dimension says, numbered from `offset`.

Tables read both ways: a transform that has an inverse carries it (`transform.inverse`), and
`Src.unapply` runs the inverses in reverse order, so export is the import table read backward.
Several params may be cut from one fused source tensor (`rows`: BFL's qkv; `cols`: the input
features of FLUX's proj_out, which we store as two kernels); read backward, `join` puts their
parts side by side again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from edit_jax.layers import channel_ranks

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
    def part(self) -> tuple[int, int, int] | None:
        """(axis, index, count) when this param is one of `count` parts of its source tensor,
        cut along `axis` (the first transform, `part`); None when it is the whole tensor."""
        return getattr(self.transforms[0], "part", None) if self.transforms else None

    @property
    def _inverted(self) -> tuple[Transform, ...]:
        return self.transforms[1:] if self.part else self.transforms

    @property
    def invertible(self) -> bool:
        return all(hasattr(t, "inverse") for t in self._inverted)

    def unapply(self, tensor: np.ndarray) -> np.ndarray:
        """Our layout -> the source's: the inverse transforms in reverse order (for a part: the
        part, which `join` puts in its place)."""
        for t in reversed(self._inverted):
            if not hasattr(t, "inverse"):
                raise ValueError(f"{self.key}: transform {getattr(t, '__name__', t)} has no inverse")
            tensor = t.inverse(tensor)
        return tensor


def join(parts: list[tuple[Src, np.ndarray]]) -> np.ndarray:
    """One source tensor from the `unapply`d arrays of the Srcs that read it: the array itself, or
    every part in order along its axis."""
    if len(parts) == 1 and parts[0][0].part is None:
        return parts[0][1]
    cuts = [src.part for src, _ in parts]
    if None in cuts or len({(axis, count) for axis, _, count in cuts}) != 1 or \
            sorted(index for _, index, _ in cuts) != list(range(cuts[0][2])):
        raise ValueError(f"{parts[0][0].key}: read by {len(parts)} params that are not its parts {cuts}")
    ordered = sorted(zip(cuts, (tensor for _, tensor in parts)), key=lambda c: c[0][1])
    return np.concatenate([tensor for _, tensor in ordered], axis=cuts[0][0])


def transpose(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> our kernel [in, out] (its own inverse)."""
    return w.T


transpose.inverse = transpose


def part(axis: int, sizes: tuple[int, ...], index: int) -> Transform:
    """Part `index` of a tensor split along `axis` into parts of the given sizes; the first
    transform of its Src (see `Src.part`)."""
    bounds = np.cumsum((0,) + tuple(sizes))

    def take(w: np.ndarray) -> np.ndarray:
        if w.ndim <= axis or w.shape[axis] != bounds[-1]:
            raise ValueError(f"cannot split axis {axis} of shape {w.shape} into {tuple(sizes)}")
        return w[(slice(None),) * axis + (slice(bounds[index], bounds[index + 1]),)]

    take.__name__ = f"part{axis}{tuple(sizes)}[{index}]"
    take.part = (axis, index, len(sizes))
    return take


def rows(sizes: tuple[int, ...], index: int) -> Transform:
    """Part `index` of a tensor split along axis 0 (a fused qkv weight or bias)."""
    return part(0, sizes, index)


def cols(sizes: tuple[int, ...], index: int) -> Transform:
    """Part `index` of a PyTorch Linear weight [out, in] split along its input features."""
    return part(1, sizes, index)


def stored_order(hidden_dim: int, groups: int, axis: int) -> tuple[Transform, ...]:
    """An elastic MLP's hidden channels along `axis`, from PyTorch's order to ours: G groups, with
    channel j at position (j mod G) * M / G + j // G (`edit_jax.layers.channel_ranks`); no
    transform when G is 1. Read backward, the inverse permutation."""
    if groups == 1:
        return ()

    ranks = channel_ranks(hidden_dim, groups)
    back = np.argsort(ranks)

    def reorder(w: np.ndarray, order: np.ndarray) -> np.ndarray:
        if w.ndim <= axis or w.shape[axis] != hidden_dim:
            raise ValueError(f"axis {axis} of shape {w.shape} is not the {hidden_dim} hidden channels")
        return w if not any(w.strides) else np.take(w, order, axis=axis)  # a broadcast constant reorders to itself

    def to_ours(w: np.ndarray) -> np.ndarray:
        return reorder(w, ranks)

    to_ours.__name__ = f"stored_order{axis}(G={groups})"
    to_ours.inverse = lambda w: reorder(w, back)
    return (to_ours,)


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


def input_linear(ours: str, theirs: str, *pre: Transform) -> dict[str, Src]:
    """A Linear whose `pre` transforms act on the weight only (its input features, axis 1 of
    PyTorch's [out, in]): an elastic fc2."""
    return {f"{ours}/kernel": Src(f"{theirs}.weight", pre + (transpose,)), f"{ours}/bias": Src(f"{theirs}.bias")}


def joint_linear(ours: str, theirs: str, parts: tuple[tuple[str, str, int], ...],
                 then: dict[str, tuple[Transform, ...]] | None = None) -> dict[str, Src]:
    """A Linear whose input features we store as one kernel per part (`JointLinear.parts`: kernel
    name, logical axis, features): each kernel <- its columns of the weight (then `then[name]`,
    transposed), bias <- bias.

    Args:
      ours: our module's path. theirs: PyTorch's. parts: `JointLinear.parts`. then: per kernel
        a transform after the column split, or None.
    """
    sizes, then = tuple(size for _, _, size in parts), then or {}
    kernels = {f"{ours}/{name}": Src(f"{theirs}.weight", (cols(sizes, i), *then.get(name, ()), transpose))
               for i, (name, _, _) in enumerate(parts)}
    return {**kernels, f"{ours}/bias": Src(f"{theirs}.bias")}


def scale(ours: str, theirs_key: str) -> dict[str, Src]:
    """An RMSNorm scale."""
    return {f"{ours}/scale": Src(theirs_key)}


def stacked_router_table(stacks: tuple[tuple[str, int], ...]) -> dict[str, Src]:
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
