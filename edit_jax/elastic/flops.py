"""Analytic FLOPs of a denoising step for any E-DiT decision pattern (2 FLOPs per multiply-add),
and a sampling run's cost and routing from the sampler's records (`routing_stats`).

Counted: every matmul (linears, attention scores and values, modulation, embedders, routers).
Not counted: elementwise work (norms, activations, softmax), a few percent at real sizes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from edit_jax.elastic.mechanism import bucket_widths


def _dual_block(d: int, m_img: int, m_txt: int, n: int, t: int) -> int:
    """MACs of a dual-stream block per sample: image MLP width m_img."""
    length = n + t
    return 4 * d * d * length + 2 * d * m_img * n + 2 * d * m_txt * t + 2 * length * length * d + 2 * 6 * d * d


def _single_block(d: int, m: int, length: int) -> int:
    """MACs of a FLUX single-stream block per sample: MLP width m."""
    return 3 * d * d * length + d * m * length + (d + m) * d * length + 2 * length * length * d + 3 * d * d


def router_flops(config, num_img: int, num_txt: int) -> int:
    """FLOPs of one block's router per sample and step: modulation (all three chunks, computed for
    every layer at once, and by `sample` for every step at once: `edit_jax.elastic.router.router_modulation`),
    proj, the token mean of h and the two heads."""
    d, h, k = config.inner_dim, config.router_hidden, len(config.width_buckets)
    return 2 * (3 * d * d + (d * h + h) * (num_img + num_txt) + h * (1 + k))


def base_flops(config, num_img: int, num_txt: int) -> int:
    """FLOPs per sample outside the blocks: embedders, final norm and projection. FLUX adds a
    guidance embedder (dev) and the pooled text embedder (pooled_projection_dim -> D -> D)."""
    d = config.inner_dim
    time = 256 * d + d * d
    out = 2 * d * d + d * config.output_channels * num_img
    macs = config.in_channels * d * num_img + config.joint_attention_dim * d * num_txt + time + out
    macs += time * config.guidance_embeds
    pooled = getattr(config, "pooled_projection_dim", 0)
    macs += pooled * d + d * d if pooled else 0
    return 2 * macs


BLOCK_MACS = {  # per block kind (`config.block_stacks`): MACs(d, width, m, num_img, num_txt) per sample
    "dual": _dual_block,
    "single": lambda d, w, m, n, t: _single_block(d, w, n + t),
}


def layer_flops(config, num_img: int, num_txt: int) -> np.ndarray:
    """[L, 1 + K] FLOPs per sample of each block (in scan order; FLUX: double then single
    blocks): column 0 a skipped block (0), column 1 + k the block at width bucket k."""
    d, m = config.inner_dim, config.mlp_hidden_dim
    widths = bucket_widths(m, config.width_buckets)
    rows = []
    for _, layers, kind in config.block_stacks:
        rows += [[0] + [2 * BLOCK_MACS[kind](d, w, m, num_img, num_txt) for w in widths]] * layers
    return np.asarray(rows, np.int64)


def dense_flops(config, num_img: int, num_txt: int) -> int:
    """FLOPs per sample of the dense forward (every block at full width, no routers)."""
    return int(base_flops(config, num_img, num_txt) + layer_flops(config, num_img, num_txt)[:, -1].sum())


def step_flops(config, num_img: int, num_txt: int, aux: dict, with_routers: bool = True) -> dict:
    """FLOPs of one elastic forward from its aux record (executed, bucket [B, L]; branch [L]).

    per_sample [B]: what each sample's own decisions need. total []: what the batch computed
    (a block runs for the whole batch when any row needs it, at the widest bucket needed).
    Both include the routers (every block's router runs, except in forced mode) when `with_routers`.

    Args:
      config: the model config. num_img, num_txt: image and text tokens per sample.
      aux: the forward's routing record. with_routers: count the routers' FLOPs.
    """
    table = jnp.asarray(layer_flops(config, num_img, num_txt), jnp.float32)
    layers = jnp.arange(table.shape[0])
    executed, bucket = aux["executed"], aux["bucket"]
    batch = executed.shape[0]
    # a Python float: at full size these counts pass 2**31 and would overflow as an int32 array
    fixed = float(base_flops(config, num_img, num_txt) + with_routers * table.shape[0] * router_flops(config, num_img, num_txt))
    per_sample = fixed + jnp.sum(jnp.where(executed, table[layers, 1 + bucket], 0.0), axis=1)
    total = batch * (fixed + jnp.sum(table[layers, aux["branch"]]))
    return {"per_sample": per_sample, "total": total, "dense_per_sample": float(dense_flops(config, num_img, num_txt))}


ROUTING_KEYS = ("flops_per_step", "flops_total", "flops_vs_dense", "blocks_executed", "mean_width", "cache_hit_rate",
                "step_reuse_rate")


def routing_stats(config, records: dict, num_img: int, num_txt: int, steps: int) -> dict:
    """Cost and routing of a run from the sampler's records (dense: records empty): FLOPs per step
    and in all (per sample), their share of dense's, the share of blocks executed, their mean MLP
    width, the block cache's hit rate and the share of steps a step cache reused.

    Args:
      config: the model config. records: `edit_jax.sampling.sampler.sample`'s per-step records.
      num_img, num_txt: image and text tokens per sample. steps: the run's denoising steps.
    """
    dense = float(dense_flops(config, num_img, num_txt))
    if not records:
        return {"flops_per_step": dense, "flops_total": dense * steps, "flops_vs_dense": 1.0,
                "blocks_executed": 1.0, "mean_width": 1.0, "cache_hit_rate": 0.0, "step_reuse_rate": 0.0}
    per_sample = np.asarray(records["flops_per_sample"], np.float64)  # [S, B]
    executed = np.asarray(records["executed"], bool)  # [S, B, L]
    widths = np.asarray(config.width_buckets, np.float64)[np.asarray(records["bucket"])]
    return {
        "flops_per_step": float(per_sample.mean()),
        "flops_total": float(per_sample.sum(axis=0).mean()),
        "flops_vs_dense": float(per_sample.mean() / dense),
        "blocks_executed": float(executed.mean()),
        "mean_width": float(widths[executed].mean()) if executed.any() else 0.0,
        "cache_hit_rate": float(np.asarray(records["cache_hit"]).mean()),
        "step_reuse_rate": 1.0 - float(np.asarray(records["step_computed"]).mean()) if "step_computed" in records else 0.0,
    }


def mean_routing(parts: list[tuple[int, dict]]) -> dict:
    """The routing stats of batches, given as (rows, stats), averaged over every row."""
    rows = sum(n for n, _ in parts)
    return {key: sum(n * stats[key] for n, stats in parts) / rows for key in ROUTING_KEYS}
