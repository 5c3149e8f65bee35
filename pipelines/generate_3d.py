"""`edit-jax generate-3d`: images to meshes with a converted Hunyuan3D-2 checkpoint.

    edit-jax convert hunyuan3d /models/Hunyuan3D-2/hunyuan3d-dit-v2-0 ckpt/hunyuan3d-2
    edit-jax generate-3d chair.png --model ckpt/hunyuan3d-2 \\
        --image-encoder /models/Hunyuan3D-2/hunyuan3d-dit-v2-0 --out meshes/

Stages, each timed: prepare (the object recentred on white, 512 x 512, as hy3dgen's
ImageProcessorV2 lays it out; resampled with PIL's filters where hy3dgen uses OpenCV's), encode
(DINOv2 through transformers, at the edge as the text encoders are: the release folder's
conditioner tensors or a transformers Dinov2 folder), denoise (JAX: dense, E-DiT, the caches),
decode (the ShapeVAE), volume (its logits on the octree grid, in chunks of fixed size), surface
(marching cubes) and export (a .glb or .obj per image, and a preview PNG of it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import edit_jax
from edit_jax.checkpoint import ROUTERS_DIR, SHAPE_VAE_DIR, resolve, router_mode, tree_names
from edit_jax.elastic.flops import routing_stats
from edit_jax.elastic.mechanism import ElasticConfig, with_router_mode
from edit_jax.elastic.step_cache import describe
from edit_jax.eval.pictures import block_groups, plot_mesh_preview, plot_router_map
from edit_jax.models.shape_vae import ShapeVAE, decode_volume, extract_surface, mesh_faces_outward
from edit_jax.sampling.sampler import SamplerConfig, sample

IMAGE_SIZE = 512  # hy3dgen's ImageProcessorV2
BORDER_RATIO = 0.15
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)  # DINOv2's
MESH_FORMATS = ("glb", "obj")


def prepare_image(path: str | Path, size: int = IMAGE_SIZE, border_ratio: float = BORDER_RATIO) -> np.ndarray:
    """[size, size, 3] uint8: the image's object (its alpha, or the whole image) scaled to
    1 - border_ratio of the square and centred on white. A ValueError names a file that is not an
    image or holds nothing opaque."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgba = np.asarray(image.convert("RGBA"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image PIL can read: {e}") from e
    rows, cols = np.nonzero(rgba[..., 3])
    if len(rows) == 0 or rows.max() == rows.min() or cols.max() == cols.min():
        raise ValueError(f"{path}: the image is empty (nothing opaque in its alpha channel)")
    side = max(rgba.shape[:2])
    h, w = rows.max() - rows.min(), cols.max() - cols.min()
    scale = int(side * (1 - border_ratio)) / max(h, w)
    h2, w2 = int(h * scale), int(w * scale)
    crop = Image.fromarray(rgba[rows.min() : rows.max(), cols.min() : cols.max()]).resize((w2, h2), Image.Resampling.BOX)
    canvas = np.zeros((side, side, 4), np.uint8)
    top, left = (side - h2) // 2, (side - w2) // 2
    canvas[top : top + h2, left : left + w2] = np.asarray(crop)
    alpha = canvas[..., 3:].astype(np.float32) / 255
    white = (canvas[..., :3] * alpha + 255 * (1 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(white).resize((size, size), Image.Resampling.BICUBIC))


def encoder_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """[B, 3, S, S] float32 DINOv2 pixel values of uint8 images [B, H, W, 3]: bilinear to S,
    centre crop, normalised (hy3dgen's DinoImageEncoder transform)."""
    from PIL import Image

    out = []
    for image in images:
        resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
        out.append(((np.asarray(resized, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out)


def load_image_encoder(path: str | Path):
    """(transformers Dinov2Model, its image size, whether the CLS token is kept) from a Hunyuan3D-2
    release folder (config.yaml's conditioner and the weight file's conditioner.* tensors) or a
    transformers Dinov2 folder (config.json and weights; 518 pixels, CLS kept)."""
    import yaml
    from transformers import Dinov2Config, Dinov2Model

    path = resolve(path)
    if (path / "config.yaml").is_file():
        encoder = yaml.safe_load((path / "config.yaml").read_text())["conditioner"]["params"]["main_image_encoder"]
        kwargs = encoder.get("kwargs", {})
        if "config" not in kwargs:
            raise ValueError(f"{path / 'config.yaml'}: the image encoder names a hub model ({kwargs.get('version')}); "
                             "pass its downloaded transformers folder as --image-encoder")
        model = Dinov2Model(Dinov2Config.from_dict(kwargs["config"]))
        prefix = "conditioner.main_image_encoder.model."
        state = _release_tensors(path, prefix)
        if not state:
            raise ValueError(f"{path} holds no {prefix}* tensors (the image encoder's weights)")
        model.load_state_dict(state)
        return model.eval(), kwargs.get("image_size", 518), kwargs.get("use_cls_token", True)
    if (path / "config.json").is_file():
        return Dinov2Model.from_pretrained(path, local_files_only=True).eval(), 518, True
    raise ValueError(f"--image-encoder {path}: neither a Hunyuan3D-2 release folder (config.yaml) nor a transformers "
                     "Dinov2 folder (config.json)")


def _release_tensors(folder: Path, prefix: str) -> dict:
    """The tensors under `prefix` of a release folder's weight file, prefix stripped."""
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = load_file(files[0])
    else:
        state = torch.load(sorted(folder.glob("*.ckpt"))[0], map_location="cpu", weights_only=True)
        state = {f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encode_images(images: np.ndarray, image_encoder: str | Path) -> np.ndarray:
    """DINOv2's last hidden states [B, T, C] (float32) of prepared images [B, 512, 512, 3]."""
    import torch

    model, image_size, cls_token = load_image_encoder(image_encoder)
    with torch.no_grad():
        states = model(pixel_values=torch.from_numpy(encoder_inputs(images, image_size))).last_hidden_state
    states = states.float().numpy()
    return states if cls_token else states[:, 1:]


def check_request(ckpt: Path, vae: Path, images: list, features, image_encoder, mesh_format: str,
                  octree_resolution: int, num_chunks: int) -> None:
    """One clear error for the first thing wrong with a request, before any work.

    Args:
      ckpt: --model. vae: the checkpoint holding the ShapeVAE. images: the image files. features: given image features or None.
      image_encoder: --image-encoder or None. mesh_format, octree_resolution, num_chunks: as
        `generate_3d`'s.
    """
    if SHAPE_VAE_DIR not in tree_names(vae):
        raise ValueError(f"{vae} holds no ShapeVAE: convert a Hunyuan3D-2 release folder (edit-jax convert hunyuan3d "
                         "RELEASE CKPT); for a training run's checkpoint, name the converted one with --shape-vae")
    if (features is None) == (image_encoder is None):
        raise ValueError("give the images' encoder (--image-encoder) or their features (--features), one of them")
    if features is None and not images:
        raise ValueError("no images given")
    if mesh_format not in MESH_FORMATS:
        raise ValueError(f"mesh format {mesh_format!r}: choose one of {', '.join(MESH_FORMATS)}")
    if octree_resolution < 2 or num_chunks < 1:
        raise ValueError(f"--octree-resolution {octree_resolution} must be >= 2 and --num-chunks {num_chunks} >= 1")


def generate_3d(ckpt, images: list, out, *, shape_vae=None, image_encoder=None, features: np.ndarray | None = None,
                sampler: SamplerConfig = SamplerConfig(num_steps=50, true_cfg_scale=5.0),
                elastic: ElasticConfig | None = None, seed: int = 0, octree_resolution: int = 384,
                num_chunks: int = 8000, box_v: float = 1.01, mc_level: float = 0.0, mesh_format: str = "glb",
                progress: bool = True) -> dict:
    """Meshes of `images` (or of given image `features`), written into `out` as mesh-N.glb (or
    .obj), mesh-N.png (a preview) and generate_3d.json (settings, FLOPs, timings by stage, mesh
    sizes); returns that record.

    Args:
      ckpt: a converted Hunyuan3D-2 checkpoint (the DiT, its routers for E-DiT, the ShapeVAE).
      images: image files. out: the folder to write. shape_vae: the checkpoint holding the
        ShapeVAE when `ckpt` has none (a training run's), else None. image_encoder: a release folder or a
        transformers Dinov2 folder. features: [B, T, C] image features instead of images.
      sampler: steps and guidance (true_cfg_scale: hy3dgen's guidance_scale; guidance_scale for a
        guidance-distilled DiT). elastic: E-DiT and caches (None: dense). seed: of the noise.
      octree_resolution, num_chunks, box_v, mc_level: hy3dgen's volume and surface settings.
      mesh_format: "glb" or "obj". progress: show progress.
    """
    import trimesh
    from tqdm.auto import tqdm

    ckpt, out = resolve(ckpt), resolve(out)
    vae = ckpt if shape_vae is None else resolve(shape_vae)
    check_request(ckpt, vae, images, features, image_encoder, mesh_format, octree_resolution, num_chunks)
    timings, start = {}, time.perf_counter()

    def lap(stage):
        nonlocal start
        timings[stage] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()

    if features is None:
        prepared = np.stack([prepare_image(p) for p in images])
        lap("prepare_s")
        features = encode_images(prepared, image_encoder)
        lap("encode_s")
    model, params = edit_jax.load(ckpt)
    config = model.config
    if config.guidance_embeds:  # a guidance-distilled DiT embeds the scale and runs no CFG, as hy3dgen does
        sampler = dataclasses.replace(sampler, true_cfg_scale=1.0)
    features = np.asarray(features, np.float32)
    if features.ndim != 3 or features.shape[-1] != config.joint_attention_dim:
        raise ValueError(f"image features of shape {features.shape}; this DiT reads [B, T, {config.joint_attention_dim}]")
    vae_config, vae_params = edit_jax.load_shape_vae(vae)
    routers = None
    if elastic is not None and elastic.mode == "infer":
        if ROUTERS_DIR not in tree_names(ckpt):
            raise ValueError(f"--elastic infer needs routers: {ckpt} has none (train them with `edit-jax train`)")
        routers = edit_jax.load_routers(ckpt)
        elastic = with_router_mode(elastic, router_mode(ckpt))
    batch = len(features)
    noise = jax.random.normal(jax.random.key(seed), (batch, vae_config.num_latents, vae_config.embed_dim))
    cond = {"encoder_hidden_states": jnp.asarray(features)}
    negative = {"encoder_hidden_states": jnp.zeros_like(cond["encoder_hidden_states"])} if sampler.true_cfg_scale > 1 else None
    bar = tqdm(total=sampler.num_steps, desc="denoise", disable=not progress)
    latents, records = sample(model, params, noise, cond, sampler, routers=routers, elastic=elastic,
                              negative_cond=negative, progress=lambda i: bar.update(1))
    latents = jax.block_until_ready(latents)
    bar.close()
    lap("denoise_s")
    decoded = jax.block_until_ready(ShapeVAE(vae_config).apply({"params": vae_params}, latents, method=ShapeVAE.decode))
    lap("decode_s")
    volume_bar = tqdm(total=(octree_resolution + 1) ** 3, desc="volume", unit="pt", disable=not progress)
    grids = decode_volume(vae_config, vae_params, decoded, box_v, octree_resolution, num_chunks,
                          progress=lambda done, total: volume_bar.update(done - volume_bar.n))
    volume_bar.close()
    lap("volume_s")
    surfaces = [extract_surface(grid, mc_level, box_v) for grid in grids]
    lap("surface_s")
    out.mkdir(parents=True, exist_ok=True)
    meshes = []
    for i, (vertices, faces) in enumerate(surfaces):
        mesh_file, preview = out / f"mesh-{i}.{mesh_format}", out / f"mesh-{i}.png"
        trimesh.Trimesh(vertices, mesh_faces_outward(faces), process=False).export(mesh_file)
        source = Path(images[i]).name if i < len(images) else f"features row {i}"
        plot_mesh_preview(preview, vertices, faces, title=f"mesh {i} of {source}")
        meshes.append({"image": str(images[i]) if i < len(images) else None, "mesh": mesh_file.name,
                       "preview": preview.name, "vertices": len(vertices), "faces": len(faces)})
    lap("export_s")
    stats = routing_stats(config, records, vae_config.num_latents, features.shape[1], sampler.num_steps)
    record = {"model": str(ckpt), "meshes": meshes, "steps": sampler.num_steps, "guidance_scale": sampler.true_cfg_scale,
              "seed": seed, "octree_resolution": octree_resolution, "num_chunks": num_chunks, "box_v": box_v,
              "mc_level": mc_level, "elastic": "dense" if elastic is None else elastic.mode,
              "step_cache": describe(elastic.step_cache) if elastic is not None and elastic.step_cache else None,
              **stats, "timings_s": timings}
    if "executed" in records:
        first = {k: np.asarray(records[k])[:, 0] for k in ("executed", "bucket", "cache_hit") if k in records}
        record["router_map"] = str(plot_router_map(
            out / "router_map.png", first["executed"], first["bucket"], first.get("cache_hit"),
            title=f"E-DiT routing of mesh 0, {sampler.num_steps} steps", block_groups=block_groups(config)))
    (out / "generate_3d.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

