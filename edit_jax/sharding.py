"""Logical axis names -> mesh axes: the one table that decides how every param is sharded.

Mesh axes: "data" (pure data parallel: params replicated), "fsdp" (data parallel with params
sharded, gathered per layer), "tensor" (Megatron-style tensor parallel inside a layer).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or None). Read top to bottom; the first rule whose mesh axis is still
# free in a given array wins, so one array never uses a mesh axis twice.
LOGICAL_AXIS_RULES = (
    ("layers", None),        # the nn.scan axis: each step needs its whole layer
    ("embed", "fsdp"),       # model width D: FSDP shards it, gathered per layer
    ("mlp", "tensor"),       # MLP hidden M: column/row parallel fc1/fc2
    ("heads", "tensor"),     # H * K of q/k/v/out: head parallel
    ("modulation", "tensor"),  # the AdaLN (shift, scale, gate) outputs, 3D or 6D wide
    ("embed_in", None),      # the input side of the D x D timestep linears
    ("head_dim", None),      # QK-norm scales: tiny
    ("channels", None),      # latent channels in/out: tiny
    ("text_embed", None),    # the text encoder width (4096 / 3584) of the context embedder
    ("pooled", None),
    ("freq", None),          # the 256 sinusoid channels of timestep embeddings
    ("router", None),        # E-DiT router hidden (128): tiny, replicated
    ("gate", None),
    ("bucket", None),
    # activations: the batch is split over every data-parallel axis (else XLA may keep all of it
    # on every chip and split the model width instead); heads and MLP hidden follow the weights
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
)


_ACTIVE_RULES = contextvars.ContextVar("edit_jax_axis_rules", default=LOGICAL_AXIS_RULES)


def active_rules() -> tuple:
    """The rules table in force: LOGICAL_AXIS_RULES, or as `use_rules` changed it."""
    return _ACTIVE_RULES.get()


def rules_with(overrides: dict | None) -> tuple:
    """LOGICAL_AXIS_RULES with some logical axes mapped otherwise ({logical axis: mesh axis, a list
    of them, or None}); a ValueError names an unknown logical or mesh axis."""
    overrides = overrides or {}
    known = dict(LOGICAL_AXIS_RULES)
    for name, axes in overrides.items():
        if name not in known:
            raise ValueError(f"axis rule for unknown logical axis {name!r}; known: {', '.join(known)}")
        listed = [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
        if any(a not in MESH_AXES for a in listed):
            raise ValueError(f"axis rule {name!r}: {axes!r} names no mesh axes of {MESH_AXES}")
    table = ((name, overrides[name] if name in overrides else axes) for name, axes in LOGICAL_AXIS_RULES)
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in table)


@contextlib.contextmanager
def use_rules(overrides: dict | None):
    """Within the block, logical axes map by `rules_with(overrides)`: for params, routers,
    optimizer state and the activations the models constrain alike."""
    token = _ACTIVE_RULES.set(rules_with(overrides))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def mesh_sizes(shape: dict[str, int], num_devices: int) -> dict[str, int]:
    """{axis: size} over (data, fsdp, tensor) for `num_devices`, an axis of -1 given the devices the
    others leave; a ValueError naming the problem when the sizes cannot make such a mesh."""
    if set(shape) - set(MESH_AXES):
        raise ValueError(f"mesh {shape}: the axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    if list(sizes.values()).count(-1) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
        raise ValueError(f"mesh {shape}: sizes are >= 1, and at most one of them -1 (the rest of the devices)")
    rest = int(np.prod([s for s in sizes.values() if s != -1]))
    if -1 in sizes.values():
        if num_devices % rest:
            raise ValueError(f"mesh {shape} does not divide the {num_devices} devices (its other axes span {rest}, "
                             f"which do not divide the {num_devices} devices)")
        sizes = {a: num_devices // rest if s == -1 else s for a, s in sizes.items()}
    spans = int(np.prod(list(sizes.values())))
    if spans != num_devices:
        why = "" if spans > num_devices else " (a mesh spans every device: set one axis to -1 for the rest)"
        raise ValueError(f"mesh {sizes} needs {spans} devices, have {num_devices}{why}")
    return sizes


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over (data, fsdp, tensor) with Auto axis types; default: every device on fsdp. One
    axis may be -1: the devices the others leave, e.g. {"data": -1, "tensor": 2}."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(shape or {"fsdp": devices.size}, devices.size)
    return Mesh(devices.reshape(tuple(sizes.values())), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_auto_axes(mesh: Mesh) -> None:
    """Raises ValueError for a mesh with Explicit (or Manual) axis types: the models rely on XLA's
    sharding propagation (Auto axes); jax.make_mesh builds Explicit axes unless told otherwise."""
    kinds = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    other = {name: str(kind) for name, kind in kinds.items() if kind != AxisType.Auto}
    if other:
        raise ValueError(
            f"mesh axes {other} are not Auto: edit-jax models need Auto axes; build the mesh with "
            "edit_jax.sharding.make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)"
        )


def logical_to_mesh(spec: PartitionSpec, mesh: Mesh, rules=None, shape=None) -> PartitionSpec:
    """Maps one logical PartitionSpec onto mesh axes (a rule may name several); a mesh axis of
    size 1, already used in this array, or (given the array's `shape`) not dividing its
    dimension is left out. A logical name None leaves its dimension unsplit.

    Args:
      spec: a PartitionSpec of logical axis names. mesh: the device mesh. rules: the logical-axis
        rules table. shape: the array's shape, or None (then no divisibility check).
    """
    check_auto_axes(mesh)
    table = {None: None, **dict(active_rules() if rules is None else rules)}
    used, out = set(), []
    for dim, name in enumerate(spec):
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_AXIS_RULES")
        wanted = table[name]
        axes = [] if wanted is None else [wanted] if isinstance(wanted, str) else list(wanted)
        axes = [a for a in axes if a not in used and mesh.shape[a] > 1]
        if shape is not None and axes and shape[dim] % int(np.prod([mesh.shape[a] for a in axes])):
            axes = []
        used.update(axes)
        out.append(_entry_of(axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """x constrained to the mesh axes the rules give its logical axis `names`, when a mesh is set
    (`with jax.set_mesh(mesh)` around tracing); unchanged when none is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(PartitionSpec(*names), mesh, shape=x.shape))


BATCH_AXES = ("data", "fsdp")  # a batch is split over every data-parallel axis


def gathered(param: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """A param with logical axes `names` where it is used, under a set mesh whose batch is split
    over two or more mesh axes and where the param is also split over another one: constrained to
    its sharding less the batch's axes (FSDP's gather, written out). There, left to itself, XLA's
    SPMD partitioner (jax 0.10) computes a matmul whose input is split over data x fsdp and tensor,
    and whose kernel's output axis is split over fsdp, with two batch shards swapped: a silent
    wrong answer (tests/sharded_elastic.py and tests/sharded_train.py run that mesh). Unchanged
    otherwise, so that the partitioner keeps its own plan (pure FSDP, data x fsdp) and memory."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return param
    batch = _axes_of(logical_to_mesh(PartitionSpec("activation_batch"), mesh)[0])
    if len(batch) < 2:
        return param
    kept = [tuple(a for a in _axes_of(axes) if a not in batch)
            for axes in logical_to_mesh(PartitionSpec(*names), mesh, shape=param.shape)]
    if not any(kept):
        return param
    return jax.lax.with_sharding_constraint(param, PartitionSpec(*(_entry_of(axes) for axes in kept)))


def _axes_of(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry_of(axes) -> str | tuple[str, ...] | None:
    """The PartitionSpec entry of a sequence of mesh axes (the inverse of `_axes_of`)."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
