"""`edit-jax generate`: prompts to PNGs with a FLUX pipeline folder.

    edit-jax generate --model /models/FLUX.1-dev --prompt "a red fox in snow" --out out/

The folder is diffusers' pipeline layout: transformer/ (diffusers weights, or an edit-jax
checkpoint, e.g. one with trained routers), vae/, text_encoder/ + tokenizer/ (CLIP),
text_encoder_2/ + tokenizer_2/ (T5), scheduler/. Stages: encode (PyTorch, cached per prompt),
denoise (JAX, dense or E-DiT with the cache), decode (the Flax VAE, tiled). Same components, seed
and initial noise give FluxPipeline's image.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from edit_jax.checkpoint import is_checkpoint, resolve

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def check_pipeline_folder(folder: Path) -> None:
    from pipelines.text_encoders import missing_components

    if not folder.is_dir():
        raise ValueError(f"--model {folder}: no such folder")
    missing = missing_components(folder, COMPONENTS)
    if missing:
        raise ValueError(f"--model {folder} is not a FLUX pipeline folder: no {', '.join(m + '/' for m in missing)} "
                         f"(it needs {', '.join(COMPONENTS)})")


def load_transformer(folder: Path):
    """(model, params, routers or None) from an edit-jax checkpoint or diffusers weights (converted in memory)."""
    import edit_jax
    from checkpoints_convert import flux
    from checkpoints_convert.engine import build_params
    from checkpoints_convert.sources import open_source
    from edit_jax.checkpoint import load_routers
    from edit_jax.models import abstract_params, abstract_routers

    if is_checkpoint(folder):
        model, params = edit_jax.load(folder)
        return model, params, load_routers(folder)
    source = open_source(folder)
    config, table, _, router_table = flux.prepare(source)
    config = config.with_runtime(param_dtype="float32")
    params = build_params(table, source, abstract_params(config))
    routers = build_params(router_table, source, abstract_routers(config)) if router_table is not None else None
    return edit_jax.build_model(config), params, routers


def load_scheduler(folder: Path):
    """The flow-matching fields of scheduler/scheduler_config.json."""
    from edit_jax.schedules import SchedulerConfig

    path = folder / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no scheduler_config.json")
    values = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    return SchedulerConfig(**{k: v for k, v in values.items() if k in names})


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' image processor."""
    x = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (x * 255).round().astype(np.uint8)


def generate(model_dir, prompts: list[str], out, *, steps: int = 28, guidance: float = 3.5, height: int = 1024,
             width: int = 1024, seed: int = 0, elastic: str = "dense", cache: bool = False, cache_start: int | None = None,
             tile_size: int = 1024, embeddings_cache=None, noise=None, progress: bool = True) -> dict:
    """Runs the three stages and writes OUT/image-N.png and OUT/generate.json; returns
    {"images": [B, 3, H, W] float in [-1, 1], "summary": ...}. noise: packed initial latents (None:
    drawn from the seed)."""
    from tqdm.auto import tqdm

    from checkpoints_convert.vae import load_vae
    from edit_jax.elastic import ElasticConfig
    from edit_jax.latents import initial_noise, unpack_latents
    from edit_jax.sampler import SamplerConfig, make_conditions, sample
    from edit_jax.vae import decode_tiled
    from pipelines.text_encoders import EmbeddingCache, FluxTextEncoder

    folder = resolve(model_dir)
    check_pipeline_folder(folder)
    out = resolve(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    timings = {}

    t0 = time.perf_counter()
    encoder = FluxTextEncoder(folder)
    embeds = encoder(prompts, EmbeddingCache(embeddings_cache) if embeddings_cache else None)
    timings["encode_s"] = time.perf_counter() - t0

    model, params, routers = load_transformer(folder / "transformer")
    config = model.config
    vae_config, vae_params = load_vae(folder / "vae")
    if 4 * vae_config.latent_channels != config.in_channels or vae_config.downscale != 8:
        raise ValueError(f"the VAE ({vae_config.latent_channels} latent channels, {vae_config.downscale}x) does not fit "
                         f"the transformer ({config.in_channels} packed channels, a 8x VAE)")
    sampler = SamplerConfig(num_steps=steps, guidance_scale=guidance, scheduler=load_scheduler(folder / "scheduler"))
    cond = make_conditions(config, embeds["prompt_embeds"], height, width, embeds["pooled_prompt_embeds"])
    if noise is None:
        noise = initial_noise(jax.random.key(seed), len(prompts), vae_config.latent_channels, height, width)
    settings = None
    if elastic != "dense":
        if routers is None:
            raise ValueError(f"--elastic {elastic}: {folder / 'transformer'} has no routers (train them with "
                             "`edit-jax train`, then point transformer/ at the run's edit-jax checkpoint)")
        settings = ElasticConfig(mode="infer", cache=cache, cache_start=steps // 3 if cache_start is None else cache_start)

    t0 = time.perf_counter()
    with tqdm(total=steps, desc="denoise", unit="step", disable=not progress) as bar:
        latents, records = sample(model, params, noise, cond, sampler, routers=routers if settings else None,
                                  elastic=settings, progress=(lambda i: bar.update(1)) if progress else None)
        latents = jax.block_until_ready(latents)
    timings["denoise_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    z = vae_config.from_model_latents(np.asarray(unpack_latents(latents, height, width)))
    images = decode_tiled(vae_config, vae_params, z, tile_size)
    timings["decode_s"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    paths = []
    for i, image in enumerate(to_uint8(images)):
        paths.append(out / f"image-{i}.png")
        Image.fromarray(image).save(paths[-1])
    summary = {"model": str(folder), "prompts": prompts, "height": height, "width": width, "steps": steps,
               "guidance": guidance, "seed": seed, "elastic": elastic, "cache": cache,
               "timings_s": {k: round(v, 3) for k, v in timings.items()}, "images": [str(p) for p in paths],
               "backend": jax.default_backend()}
    records = jax.tree.map(np.asarray, records)
    if records:
        from eval.pictures import block_groups, plot_router_map
        from eval.sampling_eval import routing_stats

        summary["routing"] = routing_stats(config, records, noise.shape[1], cond["encoder_hidden_states"].shape[1], steps)
        summary["router_map"] = str(plot_router_map(
            out / "router_map.png", records["executed"][:, 0], records["bucket"][:, 0], records["cache_hit"][:, 0],
            title=f"E-DiT routing of prompt 0, {height}x{width}, {steps} steps", block_groups=block_groups(config)))
    (out / "generate.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"images": images, "summary": summary}
