"""What a sampling run costs and how close it stays to dense: `edit-jax eval`.

    edit-jax eval ckpt/flux-edit --embeddings prompts.npz --height 512 --width 512

`run_method` samples one way (dense, E-DiT routers, with the cache, or forced decisions) and
measures it: analytic FLOPs per step and in total per sample (routers counted where they run),
blocks executed, mean MLP width of executed blocks, cache hit rate, and the warm wall-clock
(median of repeats). `fidelity` compares its latents with dense ones from the same noise (PSNR,
SSIM), and with the pipeline's VAE (`--vae`) the decoded images too. `evaluate_checkpoint` runs
dense, E-DiT and E-DiT + cache on a checkpoint with routers and the user's prompt embeddings and
writes OUT/eval.json, OUT/router_map.png and OUT/fidelity_vs_flops.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from edit_jax.checkpoints_convert.vae import load_vae
from edit_jax import load, load_routers
from edit_jax.sampling.batches import rows_conditions, rows_of, sample_in_batches
from edit_jax.checkpoint import CheckpointError, router_mode
from edit_jax.config import resolve_attention
from edit_jax.elastic.mechanism import ElasticConfig, with_router_mode
from edit_jax.elastic.step_cache import describe
from edit_jax.sampling.embeddings import check_embeddings, embedding_conditions, read_embeddings
from edit_jax.elastic.flops import mean_routing, routing_stats
from edit_jax.sampling.latents import initial_noise, unpack_latents
from edit_jax.sampling.sampler import SamplerConfig, check_sampling_inputs, sample
from edit_jax.models.vae import check_vae_fits, decode_tiled, to_uint8
from edit_jax.eval.metrics import json_number, psnr, ssim
from edit_jax.eval.pictures import block_groups, plot_quality_vs_flops, plot_router_map

def num_txt_of(cond: dict) -> int:
    return int(cond["encoder_hidden_states"].shape[1])


def time_method(model, params: dict, noise, cond: dict, sampler: SamplerConfig, routers: dict | None = None,
                elastic: ElasticConfig | None = None, decisions=None, repeats: int = 3,
                negative_cond: dict | None = None, compiled: bool = False) -> float:
    """The warm wall-clock (median of `repeats`, seconds) of sampling these rows once; unless
    `compiled` (this very call has run before), a first call compiles.

    Args:
      model, params, noise, cond, sampler, routers, elastic, decisions, negative_cond: as
        `edit_jax.sampling.sampler.sample`'s. repeats: timed runs. compiled: above.
    """
    def once():
        return jax.block_until_ready(sample(model, params, noise, cond, sampler, routers=routers, elastic=elastic,
                                            decisions=decisions, negative_cond=negative_cond)[0])

    if not compiled:
        once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_method(model, params: dict, noise, cond: dict, sampler: SamplerConfig, routers: dict | None = None,
               elastic: ElasticConfig | None = None, decisions=None, timing_rows: int = 1,
               repeats: int = 3, negative_cond: dict | None = None) -> tuple[np.ndarray, dict, dict]:
    """Samples the whole batch once, then times `timing_rows` rows `repeats` times (warm);
    returns (latents [B, N, C], stats, records). negative_cond: true CFG's negative prompt.

    Args:
      model, params, noise, cond, sampler, routers, elastic, decisions, negative_cond: as
        `edit_jax.sampling.sampler.sample`'s. timing_rows: rows timed (0: none). repeats: timed runs.
    """
    return run_in_batches(model, params, noise, cond, sampler, noise.shape[0], negative_cond, repeats, timing_rows,
                          routers=routers, elastic=elastic, decisions=decisions)


def run_in_batches(model, params: dict, noise, cond: dict, sampler: SamplerConfig, batch_size: int,
                   negative_cond: dict | None = None, repeats: int = 3, timing_rows: int | None = None,
                   **method) -> tuple[np.ndarray, dict, dict]:
    """Samples the rows `batch_size` at a time (`edit_jax.sampling.batches.sample_in_batches`), then times
    `timing_rows` rows of the first batch (default: all of them) `repeats` times, warm: (latents
    [B, N, C], stats, records of the first batch). The routing stats are averaged over every row.

    Args:
      model, params, noise, cond, sampler, negative_cond: as `edit_jax.sampling.sampler.sample`'s.
      batch_size: rows per batch. repeats: timed runs. timing_rows: above.
      **method: routers, elastic, decisions.
    """
    parts = list(sample_in_batches(model, params, noise, rows_conditions(cond, negative_cond), sampler, batch_size,
                                   **method))
    routing = [(len(p.ids), routing_stats(model.config, p.records, noise.shape[1], num_txt_of(cond), sampler.num_steps))
               for p in parts]
    stats = {**routing[0][1], **mean_routing(routing)}
    rows = len(parts[0].ids) if timing_rows is None else min(timing_rows, len(parts[0].ids))
    if rows:
        negative = None if negative_cond is None else rows_of(negative_cond, rows)
        stats["wall_clock_s"] = time_method(model, params, noise[:rows], rows_of(cond, rows), sampler, repeats=repeats,
                                            negative_cond=negative, compiled=rows == len(parts[0].ids), **method)
        stats["timing_rows"] = rows
    return np.concatenate([np.asarray(p.latents[: len(p.ids)]) for p in parts]), stats, parts[0].records


def fidelity(reference: np.ndarray, test: np.ndarray) -> dict:
    """PSNR (dB) and SSIM of a set against the reference set, both [N, C, H, W]."""
    return {"psnr_db": json_number(psnr(reference, test)), "ssim": ssim(reference, test)}


def evaluate_checkpoint(ckpt, embeddings: str, out: Path, height: int, width: int, steps: int, seed: int = 0,
                        elastic: ElasticConfig | None = None, guidance: float = 3.5, repeats: int = 3,
                        vae: str | None = None, tile_size: int = 1024, mesh=None, dtype: str = "float32",
                        true_cfg: float = 1.0, batch_size: int | None = None, attention: str = "auto",
                        step_cache=None) -> dict:
    """Dense vs E-DiT vs E-DiT + cache (and, given `step_cache`, the dense model under that per-step
    cache, `edit_jax.elastic.step_cache`) on a checkpoint with routers, from the same noise; with a
    VAE folder (`vae`: FLUX.1's or Qwen-Image's), the decoded images are compared too and written
    as PNGs. mesh: the transformer's params and routers placed on it by the rules table, and
    sampled under it. dtype: the transformer's params and compute; attention: its softmax
    attention (`edit_jax.config.resolve_attention`). true_cfg > 1: true
    classifier-free guidance with the file's negative_* embeddings. batch_size: prompts sampled
    together (None: all; E-DiT's batch decisions are per batch, and the wall-clock is one batch's).

    Args:
      ckpt: the checkpoint with routers. embeddings: the prompt embeddings file. out: the folder
        to write. height, width: pixels. steps: denoising steps. seed: of the noise. elastic: E-DiT's
        settings. guidance: FLUX.1-dev's embedded guidance. repeats: timed runs per method.
      vae, tile_size, mesh, dtype, true_cfg, batch_size, attention, step_cache: above.
    """
    import contextlib
    import dataclasses

    data = read_embeddings(embeddings)
    if true_cfg > 1 and "negative_prompt_embeds" not in data:
        raise ValueError(f"--true-cfg {true_cfg} needs negative_prompt_embeds in {embeddings} (edit-jax encode-prompts "
                         "--negative-prompt TEXT writes them)")
    model, params = load(ckpt, mesh=mesh, param_dtype=dtype, dtype=dtype, attention=attention)
    config = model.config
    check_embeddings(config, data, embeddings)
    routers = load_routers(ckpt, mesh=mesh)
    if routers is None:
        raise CheckpointError(f"{ckpt} has no routers to evaluate: train them (`edit-jax train`) or convert an E-DiT release")
    cond = embedding_conditions(config, data, height, width)
    negative = embedding_conditions(config, data, height, width, "negative_") if true_cfg > 1 else None
    batch = cond["encoder_hidden_states"].shape[0]
    noise = initial_noise(jax.random.key(seed), batch, config.in_channels // 4, height, width)
    sampler = SamplerConfig(num_steps=steps, guidance_scale=guidance, true_cfg_scale=true_cfg)
    check_sampling_inputs(config, noise, cond, negative, sampler)  # every prompt, before they are cut into batches
    elastic = elastic or ElasticConfig(mode="infer", cache_start=steps // 3)
    edit = with_router_mode(dataclasses.replace(elastic, cache=False), router_mode(ckpt))  # reuse-trained: their reuse
    methods = {"dense": dict(elastic=None),
               "E-DiT": dict(elastic=edit, routers=routers),
               "E-DiT + cache": dict(elastic=dataclasses.replace(elastic, cache=True), routers=routers)}
    if step_cache is not None:
        methods[f"dense + {step_cache.name}"] = dict(elastic=ElasticConfig(mode="dense", step_cache=step_cache))
    decoder = None
    if vae is not None:
        decoder = load_vae(vae)
        check_vae_fits(decoder[0], config, vae)
    results, latents, images, edit_records = {}, {}, {}, None
    for name, kwargs in methods.items():
        print(f"eval: {name}", flush=True)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            x, stats, records = run_in_batches(model, params, noise, cond, sampler, batch_size or batch,
                                               negative_cond=negative, repeats=repeats, **kwargs)
        latents[name] = np.asarray(unpack_latents(x, height, width))
        results[name] = {**stats, **fidelity(latents["dense"], latents[name])}
        if decoder is not None:
            images[name] = np.clip(decode_tiled(decoder[0], decoder[1], decoder[0].from_model_latents(latents[name]),
                                                tile_size), -1.0, 1.0)
            results[name]["images"] = {f"{k}": v for k, v in fidelity(images["dense"], images[name]).items()}
        if name == "E-DiT + cache":
            edit_records = records
    out.mkdir(parents=True, exist_ok=True)
    if images:
        from PIL import Image

        for name, batch_images in images.items():
            slug = name.replace(" + ", "-").replace(" ", "-").lower()
            for i, image in enumerate(to_uint8(batch_images)):
                Image.fromarray(image).save(out / f"{slug}-{i}.png")
    plot_router_map(out / "router_map.png", edit_records["executed"][:, 0], edit_records["bucket"][:, 0],
                    edit_records["cache_hit"][:, 0], block_groups=block_groups(config),
                    title=f"E-DiT + cache routing of prompt 0: {config.family}, {height}x{width}, {steps} steps")
    plot_quality_vs_flops(out / "fidelity_vs_flops.png",
                          {name: [(r["flops_vs_dense"], _finite(r["psnr_db"]))] for name, r in results.items() if name != "dense"},
                          ylabel="PSNR of the final latents vs dense (dB)",
                          title=f"Fidelity to dense sampling from the same noise ({batch} prompts, {steps} steps)",
                          notes={name: "every block ran: its gap to dense is float rounding" for name, r in results.items()
                                 if r["blocks_executed"] == 1.0 and r["cache_hit_rate"] == 0.0 and r["mean_width"] == 1.0})
    summary = {"checkpoint": str(ckpt), "embeddings": str(embeddings), "height": height, "width": width,
               "steps": steps, "seed": seed, "true_cfg": true_cfg, "forward_passes_per_step": 2 if true_cfg > 1 else 1,
               "prompts": batch, "batch_size": min(batch_size or batch, batch), "tau": elastic.tau, "decision": elastic.decision,
               "cache": {"cache_start": elastic.cache_start, "delta_margin": elastic.delta_margin,
                         "max_reuse": elastic.max_reuse},
               "step_cache": None if step_cache is None else describe(step_cache),
               "router_mode": router_mode(ckpt),
               "backend": jax.default_backend(), "mesh": None if mesh is None else dict(mesh.shape), "dtype": dtype,
               "attention": resolve_attention(attention, dtype), "methods": results,
               "pictures": [str(out / "router_map.png"), str(out / "fidelity_vs_flops.png")]}
    if "prompts" in data:  # the texts, in an `edit-jax encode-prompts` file
        summary["prompt_texts"] = [str(t) for t in data["prompts"]]
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _finite(x) -> float:
    return float(x) if not isinstance(x, str) else float("nan")
