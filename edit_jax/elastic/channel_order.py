"""MLP channel ordering (beyond the paper, SPEC section 3): permute each elastic MLP's hidden
channels so the most important come first, where the width buckets' prefixes keep them.

The permutation is function-preserving (fc1 columns and bias, fc2 rows move together), so the
dense model is unchanged. Importance of channel j in a block: mean |act(fc1 x)_j| on calibration
inputs times the norm of fc2 row j, the expected size of its contribution to the output. Apply it
before router training, never to a checkpoint with trained routers: they learned the original
order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from edit_jax.models.family import ElasticMLP
from edit_jax.layers import channel_ranks
from edit_jax.models.registry import build_model, family_of, split_static


def elastic_mlps(config) -> tuple[ElasticMLP, ...]:
    """Where each block stack's elastic MLP lives (`edit_jax.models.family.ElasticMLP`)."""
    return family_of(config).elastic_mlps


def _node(tree: dict, path) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def channel_importance(config, params: dict, calibration: list[dict]) -> list[np.ndarray]:
    """[L_i, M] importance per stack of elastic MLPs, averaged over the calibration batches."""
    model = build_model(config)
    static = split_static(calibration[0])[1]
    record = jax.jit(lambda p, x: model.apply({"params": p}, **x, **static, mutable=["intermediates"])[1])
    totals = None
    for inputs in calibration:
        arrays, batch_static = split_static(inputs)
        if batch_static != static:
            raise ValueError(f"calibration batches must share their static inputs: {batch_static} vs {static}")
        state = record(params, arrays)
        sown = [np.asarray(_node(state["intermediates"][m.stack], m.sown)["hidden_magnitude"][0])
                for m in elastic_mlps(config)]
        totals = sown if totals is None else [t + s for t, s in zip(totals, sown)]
    scores = []
    for magnitude, m in zip(totals, elastic_mlps(config)):
        fc2 = np.asarray(_node(params[m.stack], m.fc2)[m.fc2_kernel], np.float32)
        scores.append(magnitude / len(calibration) * np.linalg.norm(fc2, axis=-1))
    return scores


def permute_mlp_channels(config, params: dict, orders: list[np.ndarray]) -> dict:
    """Reorders each elastic MLP's hidden channels; orders: [L_i, M] permutation per stack."""
    params = jax.tree.map(lambda x: x, params)  # fresh dicts, shared arrays
    for order, m in zip(orders, elastic_mlps(config)):
        stack = params[m.stack]
        fc1, fc2 = _node(stack, m.fc1), _node(stack, m.fc2)
        idx = jnp.asarray(order)
        fc1["kernel"] = jnp.take_along_axis(fc1["kernel"], idx[:, None, :], axis=2)
        fc1["bias"] = jnp.take_along_axis(fc1["bias"], idx, axis=1)
        fc2[m.fc2_kernel] = jnp.take_along_axis(fc2[m.fc2_kernel], idx[:, :, None], axis=1)
    return params


def order_mlp_channels(config, params: dict, calibration: list[dict], routers: dict | None = None):
    """Returns (params with every elastic MLP's channels sorted by importance, scores): the most
    important channel becomes channel 0, stored where the config's `width_groups` puts it
    (`layers.channel_ranks`).

    Refuses when trained routers are given: they learned the original channel order.

    Args:
      config: the model config. params: its base params.
      calibration: model input dicts (keyword arguments of the model, `example_inputs`' layout).
      routers: the checkpoint's routers, if any (refused when given).
    """
    if routers is not None:
        raise ValueError(
            "refusing to reorder MLP channels under trained routers: they learned the original "
            "channel order (SPEC section 3). Reorder before router training."
        )
    scores = channel_importance(config, params, calibration)
    ranks = channel_ranks(config.mlp_hidden_dim, config.width_groups)
    orders = [np.argsort(-s, axis=-1, kind="stable")[:, ranks] for s in scores]
    return permute_mlp_channels(config, params, orders), scores


