"""Where a model's arrays go on a device mesh: every param and router array of a config placed
as its logical axes and the rules table (`edit_jax.sharding`) say, and that plan as text. Sits
above the models (it reads their logical axes); `edit_jax.sharding`, below them, holds the rules,
the mesh and the activation constraints."""

from __future__ import annotations

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edit_jax.models.registry import abstract_params, logical_axes
from edit_jax.sharding import check_auto_axes, logical_to_mesh


def param_shardings(config, mesh: Mesh, rules=None, collection: str = "params") -> dict:
    """NamedShardings for every param of `config`'s model (pass to `edit_jax.load`), or of its
    routers with collection="routers".

    Args:
      config: the model config. mesh: a (data, fsdp, tensor) mesh (`edit_jax.sharding.make_mesh`).
      rules: the logical-axis rules table (default: `edit_jax.sharding`'s). collection: "params" or "routers".
    """
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, mesh, rules)),
        logical_axes(config, collection),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def mesh_shardings(config, mesh: Mesh | None, shardings=None, collection: str = "params"):
    """`shardings` as given, or with a mesh those of `param_shardings` (a loader takes one or the other).

    Args:
      config: the model config. mesh: a mesh, or None. shardings: a loader's shardings, or None.
      collection: "params" or "routers".
    """
    if mesh is None:
        return shardings
    if shardings is not None:
        raise ValueError("give shardings or mesh, not both: a mesh places every array as the rules table says")
    check_auto_axes(mesh)
    return param_shardings(config, mesh, collection=collection)


def sharding_plan(config, mesh: Mesh) -> list[tuple[str, tuple, PartitionSpec, PartitionSpec, int]]:
    """(name, shape, logical spec, mesh spec, bytes) of every param and router array."""
    rows = []
    for collection in ("params", "routers"):
        shapes = _flat(abstract_params(config, collection))
        specs = _flat(logical_axes(config, collection))
        for path in sorted(shapes):
            shape = tuple(shapes[path].shape)
            rows.append((path if collection == "params" else f"routers/{path}", shape, specs[path],
                         logical_to_mesh(specs[path], mesh),  # as param_shardings places it
                         int(np.prod(shape)) * np.dtype(shapes[path].dtype).itemsize))
    return rows


def describe(config, mesh: Mesh) -> str:
    """The sharding plan as text, one line per param and router array (written into a run's folder)."""
    lines = [f"mesh {dict(mesh.shape)}"]
    for name, shape, logical, placed, _ in sharding_plan(config, mesh):
        lines.append(f"  {name}: {shape} {tuple(logical)} -> {tuple(placed)}")
    return "\n".join(lines)


def summarize(config, mesh: Mesh) -> str:
    """The sharding plan in a few lines (printed at start-up): per rule that splits some array, how
    many arrays it splits; the arrays kept whole; the bytes held in all and per device."""
    plan = sharding_plan(config, mesh)
    split: dict[str, int] = {}
    per_device = 0.0
    for _, _, logical, placed, size in plan:
        devices = 1
        for name, entry in zip(logical, placed):
            axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            if axes:
                rule = f"{name} -> {'+'.join(axes)}"
                split[rule] = split.get(rule, 0) + 1
                devices *= int(np.prod([mesh.shape[a] for a in axes]))
        per_device += size / devices
    whole = sum(1 for *_, placed, _ in plan if not any(placed))
    lines = [f"mesh {', '.join(f'{a}={n}' for a, n in mesh.shape.items())} ({mesh.devices.size} devices); "
             f"{len(plan)} param and router arrays, {_bytes(sum(r[-1] for r in plan))} in all, {_bytes(per_device)} per device"]
    lines += [f"  {rule}: {count} arrays" for rule, count in split.items()]
    lines.append(f"  kept whole on every device: {whole} arrays" + (" (every mesh axis has size 1)" if not split else ""))
    return "\n".join(lines)


def _bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def _flat(tree: dict) -> dict:
    """{"a/b": leaf} of a nested dict (PartitionSpecs are leaves)."""
    return flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, PartitionSpec))
