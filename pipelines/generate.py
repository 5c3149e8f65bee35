"""`edit-jax generate`: prompts to PNGs with a FLUX.1 or Qwen-Image pipeline folder.

    edit-jax generate --model /models/FLUX.1-dev --prompt "a red fox in snow" --out out/
    edit-jax generate --model /models/Qwen-Image --prompt "..." --negative-prompt " " --true-cfg 4 --out out/

The folder is diffusers' pipeline layout (model_index.json names the pipeline): transformer/
(diffusers weights, or an edit-jax checkpoint, e.g. one with trained routers), vae/, scheduler/,
and the text encoders with their tokenizers (FLUX: CLIP in text_encoder/, T5 in text_encoder_2/;
Qwen-Image: Qwen2.5-VL in text_encoder/). Stages: encode (PyTorch, cached per prompt), denoise
(JAX, dense or E-DiT with the cache), decode (the Flax VAE, tiled). Same components, seed and
initial noise give FluxPipeline's or QwenImagePipeline's image.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

import edit_jax
from edit_jax.sampling.batches import sample_in_batches
from edit_jax.checkpoints_convert.convert import FAMILIES
from edit_jax.checkpoints_convert.engine import build_params
from edit_jax.checkpoints_convert.sources import open_source
from edit_jax.checkpoints_convert.vae import load_vae
from edit_jax.checkpoint import ROUTERS_DIR, is_checkpoint, load_config, resolve, router_mode, run_dir_hint, tree_names
from edit_jax.config import read_json_object, resolve_attention, resolve_dtype
from edit_jax.elastic.mechanism import ElasticConfig, with_router_mode
from edit_jax.elastic.step_cache import describe
from edit_jax.sampling.embeddings import embedding_conditions
from edit_jax.elastic.flops import mean_routing, routing_stats
from edit_jax.sampling.latents import initial_noise, packed_grid, unpack_latents
from edit_jax.models.registry import abstract_params, abstract_routers
from edit_jax.placement import mesh_shardings
from edit_jax.sampling.sampler import SamplerConfig
from edit_jax.sampling.schedules import SchedulerConfig
from edit_jax.models.vae import check_tile_size, check_vae_fits, decode_tiled, to_uint8
from edit_jax.eval.pictures import block_groups, plot_router_map
from edit_jax.pipelines.text_encoders import EmbeddingCache, TEXT_ENCODERS, missing_components

MODEL_COMPONENTS = ("transformer", "vae", "scheduler")  # beside each family's text encoders and tokenizers


def pipeline_family(folder: Path, role: str = "--model", unused: tuple[str, ...] = ()) -> str:
    """The model family of a diffusers pipeline folder, from its model_index.json; every missing
    component (but the `unused` ones) named in one error."""
    pipelines = {encoder.pipeline_class: encoder for encoder in TEXT_ENCODERS.values()}
    if not folder.is_dir():
        raise ValueError(f"{role} {folder}: no such folder")
    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{role} {folder} is not a diffusers pipeline folder (no readable model_index.json "
                         f"with a _class_name: {e})") from e
    if name not in pipelines:
        raise ValueError(f"{role} {folder} holds a {name}; supported: {', '.join(pipelines)}")
    components = tuple(c for c in MODEL_COMPONENTS + pipelines[name].components if c not in unused)
    missing = missing_components(folder, components)
    if missing:
        raise ValueError(f"{role} {folder} is not a complete {name} folder: no {', '.join(m + '/' for m in missing)} "
                         f"(it needs {', '.join(components)})")
    return pipelines[name].family


def check_transformer(path: Path, family: str, elastic: ElasticConfig | None) -> None:
    """The transformer's weights are there, of `family`, and with routers when `elastic` needs them
    (read from headers and metadata only, before the text encoders run)."""
    if not path.exists():
        raise ValueError(f"--transformer {path}: no such file or folder")
    if is_checkpoint(path):
        if load_config(path).family != family:
            raise ValueError(f"{path} is a {load_config(path).family} checkpoint for a {family} pipeline")
        routers = ROUTERS_DIR in tree_names(path)
    elif run_dir_hint(path):
        raise ValueError(f"--transformer {path}" + run_dir_hint(path))
    else:
        routers = FAMILIES[family].prepare(open_source(path))[3] is not None
    if elastic is not None and elastic.mode == "infer" and not routers:
        raise ValueError(f"--elastic infer: {path} has no routers (train them with `edit-jax train`, then give "
                         "--transformer RUN_DIR/edit-jax)")


def load_transformer(folder: Path, family: str, mesh=None, dtype: str = "float32", attention: str = "auto"):
    """(model, params, routers or None) from an edit-jax checkpoint or diffusers weights (converted in
    memory), params and compute in `dtype` (routers as stored, converted ones float32), softmax
    attention by `attention`; with a device `mesh`, every array placed on it as the logical-axis
    rules table says.

    Args:
      folder: the checkpoint or diffusers weights. family: the pipeline's model family.
      mesh, dtype, attention: above.
    """
    if is_checkpoint(folder):
        model, params = edit_jax.load(folder, mesh=mesh, param_dtype=dtype, dtype=dtype, attention=attention)
        if model.config.family != family:
            raise ValueError(f"{folder} is a {model.config.family} checkpoint in a {family} pipeline folder")
        return model, params, edit_jax.load_routers(folder, mesh=mesh)
    source = open_source(folder)
    config, table, _, router_table = FAMILIES[family].prepare(source)
    config = config.with_runtime(param_dtype=dtype, dtype=dtype, router_dtype="float32", attention=attention)
    params = build_params(table, source, abstract_params(config))
    routers = build_params(router_table, source, abstract_routers(config)) if router_table is not None else None
    if mesh is not None:
        params = jax.device_put(params, mesh_shardings(config, mesh))
        routers = None if routers is None else jax.device_put(routers, mesh_shardings(config, mesh, collection="routers"))
    return edit_jax.build_model(config), params, routers


SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# its settings that change the sigmas or the step, which edit_jax.sampling.schedules does not reproduce
UNSUPPORTED_SCHEDULER_SETTINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                                  "stochastic_sampling")


def load_scheduler(folder: Path):
    """The flow-matching fields of scheduler/scheduler_config.json; a ValueError for another
    scheduler class or a setting `sample` does not reproduce (never a silently different schedule)."""
    path = folder / "scheduler_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no scheduler_config.json")
    values = read_json_object(path)
    if values.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        raise ValueError(f"{path}: the scheduler is {values['_class_name']}, and edit-jax samples as {SCHEDULER_CLASS} "
                         "only")
    unsupported = [k for k in UNSUPPORTED_SCHEDULER_SETTINGS if values.get(k)]
    if unsupported:
        raise ValueError(f"{path} turns on {', '.join(unsupported)}: edit-jax samples as {SCHEDULER_CLASS} without "
                         "them, so its images would not be this pipeline's")
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    return SchedulerConfig(**{k: v for k, v in values.items() if k in names})


TEXT_MULTIPLE = 64  # text lengths rounded up to a multiple: a prompts file compiles a few shapes, not one per batch


def text_length(rows: list[dict]) -> int:
    """The text length a batch of embedding rows is padded to (masked: the result is the same)."""
    longest = max(len(row["prompt_embeds"]) for row in rows)
    return -(-longest // TEXT_MULTIPLE) * TEXT_MULTIPLE


def check_guidance(true_cfg: float, negative_prompt: str | None) -> None:
    """diffusers' pipelines silently skip true CFG without a negative prompt; here it is an error."""
    if true_cfg > 1 and negative_prompt is None:
        raise ValueError(f"--true-cfg {true_cfg} needs --negative-prompt (use --negative-prompt ' ' for an empty one)")
    if true_cfg <= 1 and negative_prompt is not None:
        raise ValueError(f"--negative-prompt is only used with --true-cfg > 1 (got {true_cfg})")


def check_request(out: Path, prompts: list[str], sampler: SamplerConfig, negative_prompt: str | None, height: int,
                  width: int, elastic: ElasticConfig | None, batch_size: int, tile_size: int = 1024) -> None:
    """Every flag that cannot work, found before the text encoders run.

    Args:
      the arguments of `generate` of the same names.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder")
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    check_guidance(sampler.true_cfg_scale, negative_prompt)
    if sampler.scheduler is not None:
        raise ValueError("generate samples with the pipeline folder's scheduler/: give a SamplerConfig without a scheduler")
    packed_grid(height, width)
    if elastic is not None and elastic.mode not in ("infer", "dense"):
        raise ValueError(f"generate runs E-DiT's routers in mode 'infer', or mode 'dense' under a step cache "
                         f"(elastic=None: dense), not {elastic.mode!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: give at least 1")
    check_tile_size(tile_size)


def generate(model_dir, prompts: list[str], out, *, sampler: SamplerConfig = SamplerConfig(),
             negative_prompt: str | None = None, height: int = 1024, width: int = 1024, seed: int = 0,
             elastic: ElasticConfig | None = None, tile_size: int = 1024, max_sequence_length: int = 512,
             embeddings_cache=None, noise=None, progress: bool = True, mesh=None, dtype: str = "auto",
             batch_size: int = 4, transformer=None, attention: str = "auto") -> dict:
    """Runs the three stages and writes OUT/image-N.png and OUT/generate.json; returns
    {"images": [B, 3, H, W] float in [-1, 1], "summary": ...}. sampler: steps, FLUX.1-dev's
    embedded guidance (ignored by models without one) and true CFG (true_cfg_scale > 1 with a
    negative prompt; Qwen-Image's usual 4.0), sampled with the folder's scheduler. noise: packed initial latents (None: drawn
    from the seed). mesh: a device mesh (`edit_jax.sharding.make_mesh`) for the transformer's
    params, routers and denoising (the text encoders and the VAE run as without one). dtype: the
    transformer's params and compute, and on a CUDA device the text encoders' ("auto": bfloat16 on
    a GPU or TPU, float32 on CPU); the VAE decodes in float32. batch_size: prompts encoded,
    denoised and decoded together (each batch's images are written as it finishes; an image does
    not depend on it, unless E-DiT takes one decision for the whole batch, decision="batch").
    elastic: E-DiT's routers in mode "infer", with the router-guided cache or not, or mode "dense"
    with a step cache (`edit_jax.elastic.step_cache`; None: dense); decision="sample" keeps each
    image's own decisions. transformer: weights to use instead of the folder's transformer/ (an edit-jax
    checkpoint such as a training run's RUN_DIR/edit-jax, or diffusers, BFL or E-DiT release
    weights). attention: the transformer's (`edit_jax.config.resolve_attention`).

    Args:
      model_dir: the pipeline folder. prompts: the texts. out: the folder to write.
      height, width: pixels, multiples of 16. seed: of the noise.
      tile_size: the VAE's decode tile, pixels. max_sequence_length: text tokens.
      embeddings_cache: a folder of cached prompt embeddings, or None. progress: show progress.
      the others: above.
    """
    from tqdm.auto import tqdm

    folder, out = resolve(model_dir), resolve(out)
    family = pipeline_family(folder, unused=("transformer",) if transformer is not None else ())
    check_request(out, prompts, sampler, negative_prompt, height, width, elastic, batch_size, tile_size)
    steps, settings = sampler.num_steps, elastic
    cache = elastic is not None and elastic.cache
    if dtype != "auto":  # "auto" asks JAX for its backend: only once the text encoders are done
        resolve_dtype(dtype)
    transformer = folder / "transformer" if transformer is None else resolve(transformer)
    check_transformer(transformer, family, elastic)
    if is_checkpoint(transformer):  # routers trained to reuse run with their reuse
        elastic = settings = with_router_mode(elastic, router_mode(transformer))
    scheduler = load_scheduler(folder / "scheduler")
    timings = {"encode_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0}

    t0 = time.perf_counter()
    encoder = TEXT_ENCODERS[family](folder, max_sequence_length, progress=progress, dtype=dtype)
    store = EmbeddingCache(embeddings_cache) if embeddings_cache else None
    rows = encoder.encode_rows(prompts, store, batch_size, progress, keep=store is None)  # cached: read per batch
    negative_row = encoder.encode_rows([negative_prompt], store)[0] if negative_prompt is not None else None
    encoder.release()  # the accelerator's memory goes to the transformer
    timings["encode_s"] = time.perf_counter() - t0

    dtype = resolve_dtype(dtype)
    model, params, routers = load_transformer(transformer, family, mesh, dtype, attention)
    config = model.config
    vae_config, vae_params = load_vae(folder / "vae")
    check_vae_fits(vae_config, config, folder / "vae")
    sampler = dataclasses.replace(sampler, scheduler=scheduler)
    if noise is None:  # every prompt's noise drawn up front: the images do not depend on batch_size
        noise = initial_noise(jax.random.key(seed), len(prompts), vae_config.latent_channels, height, width)
    if noise.shape[0] != len(prompts):
        raise ValueError(f"noise has {noise.shape[0]} rows for {len(prompts)} prompts")

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    images, paths, routing, first_records = [], [], [], None
    exact = settings is None or settings.decision == "sample"  # an image does not depend on the other rows
    routed = settings is not None and settings.mode == "infer"
    step_cache = None if settings is None else settings.step_cache

    def conditions(ids):
        part = [rows[i] for i in ids] if store is None else encoder.cached_rows([prompts[i] for i in ids], store)
        cond = embedding_conditions(config, encoder.stack(part, text_length(part)), height, width)
        negative = (embedding_conditions(config, encoder.stack([negative_row] * len(ids), text_length([negative_row])),
                                         height, width) if negative_row is not None else None)
        return cond, negative

    with tqdm(total=steps * -(-len(prompts) // batch_size), desc="denoise", unit="step", disable=not progress) as bar:
        # the last batch padded to the compiled size where the images do not depend on it, its extra rows dropped
        for batch in sample_in_batches(model, params, noise, conditions, sampler, batch_size,
                                       routers=routers if routed else None, elastic=settings, pad_last=exact,
                                       progress=(lambda i: bar.update(1)) if progress else None, mesh=mesh):
            timings["denoise_s"] += batch.seconds
            t0 = time.perf_counter()
            z = vae_config.from_model_latents(np.asarray(unpack_latents(batch.latents, height, width)))
            images.append(decode_tiled(vae_config, vae_params, z, tile_size)[: len(batch.ids)])
            timings["decode_s"] += time.perf_counter() - t0
            for i, image in zip(batch.ids, to_uint8(images[-1])):
                paths.append(out / f"image-{i}.png")
                Image.fromarray(image).save(paths[-1])
            first_records = batch.records if first_records is None else first_records
            routing.append((len(batch.ids), routing_stats(config, batch.records, noise.shape[1],
                                                          batch.cond["encoder_hidden_states"].shape[1], steps)))

    summary = {"model": str(folder), "transformer": str(transformer), "family": family, "prompts": prompts, "negative_prompt": negative_prompt,
               "height": height, "width": width, "steps": steps, "guidance": sampler.guidance_scale,
               "true_cfg": sampler.true_cfg_scale, "seed": seed, "elastic": "dense" if settings is None else settings.mode,
               "step_cache": None if step_cache is None else describe(step_cache),
               "block_cache": None if settings is None or settings.cache_method is None else settings.cache_method.name,
               "cache": cache, "dtype": dtype,
               "attention": resolve_attention(attention, dtype), "batch_size": batch_size,
               "forward_passes_per_step": 2 if sampler.true_cfg_scale > 1 else 1,
               "e_dit": None if not routed else {"decision": settings.decision, "tau": settings.tau,
                                                       "cache_start": settings.cache_start,
                                                       "delta_margin": settings.delta_margin,
                                                       "max_reuse": settings.max_reuse},
               "timings_s": {k: round(v, 3) for k, v in timings.items()}, "images": [str(p) for p in paths],
               "backend": jax.default_backend(), "mesh": None if mesh is None else dict(mesh.shape),
               "routing": mean_routing(routing)}
    if first_records:
        summary["router_map"] = str(plot_router_map(
            out / "router_map.png", first_records["executed"][:, 0], first_records["bucket"][:, 0],
            first_records["cache_hit"][:, 0],
            title=f"{'E-DiT' if routed else 'dense'}{' + cache' if cache else ''}"
                  f"{f' + {step_cache.name}' if step_cache else ''} routing of prompt 0, {height}x{width}, {steps} steps",
            block_groups=block_groups(config)))
    (out / "generate.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"images": np.concatenate(images), "summary": summary}
