"""`edit-jax sample`: a checkpoint's samples of the prompts of an embeddings file, written to a folder.

    summary = sample_embeddings("ckpt/flux-dev", "prompts.npz", Path("out"), elastic=ElasticConfig(mode="infer"))

Writes OUT/latents.npy [B, C, H, W] (unpacked, for the VAE), OUT/summary.json and, when E-DiT ran,
OUT/records.npz (the sampler's per-step records) and OUT/router_map.png (sample 0's routing).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from edit_jax import load, load_routers
from edit_jax.checkpoint import CheckpointError, router_mode, step_schedule
from edit_jax.config import resolve_attention, resolve_dtype
from edit_jax.elastic.mechanism import ElasticConfig, with_router_mode
from edit_jax.elastic.step_cache import describe
from edit_jax.eval.pictures import block_groups, plot_router_map
from edit_jax.models.registry import init_routers
from edit_jax.sampling.batches import rows_conditions, sample_in_batches
from edit_jax.sampling.embeddings import check_embeddings, embedding_conditions, read_embeddings
from edit_jax.sampling.latents import initial_noise, packed_grid, unpack_latents
from edit_jax.sampling.sampler import SamplerConfig, check_sampling_inputs, concat_records
from edit_jax.sampling.step_schedule import learned_schedule


def checkpoint_and_prompts(ckpt, embeddings, height: int, width: int, mesh=None, dtype: str = "float32",
                           attention: str = "auto") -> tuple:
    """(model, params, cond, negative cond or None) of a checkpoint and an embeddings file, the file
    checked against the model first.

    Args:
      ckpt: the checkpoint folder. embeddings: the prompt embeddings file. height, width: pixels.
      mesh, dtype, attention: as `edit_jax.load`'s (dtype resolved: params and compute).
    """
    data = read_embeddings(embeddings)
    model, params = load(ckpt, mesh=mesh, param_dtype=dtype, dtype=dtype, attention=attention)
    check_embeddings(model.config, data, embeddings)
    return (model, params, embedding_conditions(model.config, data, height, width),
            embedding_conditions(model.config, data, height, width, "negative_"))


def sample_embeddings(ckpt, embeddings, out: Path, *, height: int = 1024, width: int = 1024, sampler: SamplerConfig,
                      seed: int = 0, elastic: ElasticConfig | None = None, fresh_routers: bool = False,
                      batch_size: int | None = None, mesh=None, dtype: str = "auto", attention: str = "auto",
                      progress: bool = True, schedule: bool = False) -> dict:
    """Samples every prompt of `embeddings` from seeded noise and writes the folder `out`; returns
    the summary (also OUT/summary.json).

    Args:
      ckpt: the checkpoint folder. embeddings: the prompt embeddings file (`edit-jax encode-prompts`).
      out: the folder to write. height, width: pixels, multiples of 16. sampler: steps, guidance,
        true CFG (with the file's negative_* embeddings). seed: of the noise.
      elastic: E-DiT's settings, or mode "dense" with a step cache (None: dense). fresh_routers: with E-DiT on a checkpoint without
        routers, fresh full-capacity ones (their cost, not their savings).
      batch_size: prompts sampled together (None: all). mesh: a device mesh for the params,
        routers and sampling. dtype: the params' and compute's ("auto": bfloat16 on a GPU or TPU).
      attention: the softmax attention (`edit_jax.config.resolve_attention`). progress: a bar.
      schedule: sample with the checkpoint's learned step schedule (`edit-jax train trainable=schedule`)
        instead of `elastic`, which must then be None.
    """
    dtype = resolve_dtype(dtype)
    model, params, cond, negative = checkpoint_and_prompts(ckpt, embeddings, height, width, mesh, dtype, attention)
    config = model.config
    batch = cond["encoder_hidden_states"].shape[0]
    routers = None
    if elastic is not None and elastic.mode == "infer":
        routers = load_routers(ckpt, mesh=mesh)
        if routers is None and fresh_routers:
            print("sample: no routers in the checkpoint: fresh full-capacity routers (every block runs at full "
                  "width; this measures the routers' cost, not their savings)", file=sys.stderr)
            routers = init_routers(config, seed=seed)
        if routers is None:
            raise CheckpointError(
                f"{ckpt} has no routers: use --elastic dense, a checkpoint with trained routers "
                "(`edit-jax train`, or a converted E-DiT release), or --fresh-routers to run fresh full-capacity ones"
            )
        elastic = with_router_mode(elastic, router_mode(ckpt))  # routers trained to reuse run with their reuse
    decisions = None
    if schedule:
        if elastic is not None:
            raise ValueError("a learned step schedule decides which blocks run by itself: give no elastic settings with it")
        learned = step_schedule(ckpt)
        if learned is None:
            raise CheckpointError(f"{ckpt} holds no learned step schedule: train one with `edit-jax train "
                                  "trainable=schedule objective=rollout ...`, or sample with --elastic dense or infer")
        elastic, decisions = learned_schedule(learned, sampler.num_steps, len(config.width_buckets))
    noise = initial_noise(jax.random.key(seed), batch, config.in_channels // 4, height, width)
    rows, cols = packed_grid(height, width)
    cache = elastic is not None and elastic.cache
    step_cache = None if elastic is None else elastic.step_cache
    mode = "schedule" if schedule else "dense" if elastic is None else elastic.mode
    print(f"sampling {batch} x {height}x{width} ({rows * cols} tokens), {sampler.num_steps} steps, "
          f"elastic {mode}{' + cache' if cache else ''}{f' + {step_cache.name}' if step_cache else ''}", file=sys.stderr)
    check_sampling_inputs(config, noise, cond, negative, sampler)  # the whole file, before it is cut into batches
    size = batch_size or batch
    parts = []
    with (tqdm(total=sampler.num_steps * -(-batch // size), desc="sample", unit="step", disable=not progress) as bar,
          jax.set_mesh(mesh) if mesh else contextlib.nullcontext()):
        for part in sample_in_batches(model, params, noise, rows_conditions(cond, negative), sampler, size,
                                      routers=routers, elastic=elastic, decisions=decisions,
                                      progress=lambda i: bar.update(1)):
            parts.append((np.asarray(unpack_latents(part.latents[: len(part.ids)], height, width)), part.records,
                          len(part.ids)))
    out.mkdir(parents=True, exist_ok=True)
    unpacked = np.concatenate([latents for latents, _, _ in parts])
    np.save(out / "latents.npy", unpacked)
    summary = {"latents": str(out / "latents.npy"), "shape": list(unpacked.shape), "steps": sampler.num_steps,
               "elastic": mode, "step_cache": None if step_cache is None else describe(step_cache),
               "block_cache": None if elastic is None or elastic.cache_method is None else elastic.cache_method.name,
               "dtype": dtype,
               "attention": resolve_attention(attention, dtype),
               "batch_size": min(size, batch)}
    records = concat_records([(records, count) for _, records, count in parts])
    if records:  # dense sampling makes no routing decisions, so it has no records
        np.savez(out / "records.npz", **records)
        summary["records"] = str(out / "records.npz")
        summary["executed_fraction_per_step"] = records["executed"].mean(axis=(1, 2)).round(4).tolist()
        summary["cache_hit_rate"] = float(records["cache_hit"].mean())
        if step_cache is not None:
            summary["step_reuse_rate"] = 1.0 - float(records["step_computed"].mean())
        summary["tflops_total"] = float(records["flops_total"].sum() / 1e12)
        routing = {"infer": f"E-DiT routing (tau {elastic.tau})", "schedule": "learned step schedule"}.get(mode, "blocks run")
        summary["router_map"] = str(plot_router_map(
            out / "router_map.png", records["executed"][:, 0], records["bucket"][:, 0], records["cache_hit"][:, 0],
            title=f"{routing} of sample 0: {config.family}, {height}x{width}, {sampler.num_steps} steps"
                  f"{', cache from step %d' % elastic.cache_start if cache else ''}"
                  f"{f', {step_cache.name}' if step_cache else ''}",
            block_groups=block_groups(config)))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
