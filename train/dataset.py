"""The training dataset: precomputed examples in ArrayRecord files with a manifest, read by a
grain pipeline whose iterator state goes into the training checkpoint.

    DATASET/
      manifest.json        {"format": "edit-jax-dataset", "version": 1, "family": "flux",
                            "count": N, "fields": {name: {"shape", "dtype"}}, "captions": bool,
                            "buckets": [{"latent_shape": [C, H, W], "count": n, "files": [...],
                                         "sources": [the first few source images, when known]}]}
      bucket-CxHxW-00000.array_record ...

One record is one example, msgpack-serialised (flax.serialization) as a dict of arrays:
  latents [C, H, W]            the VAE latents as the transformer reads them before 2x2 packing
                               (FLUX: (z - shift) * scale; Qwen-Image: (z - mean) / std), float
  prompt_embeds [T, D]         text encoder states (FLUX: T5; Qwen-Image: Qwen2.5-VL)
  pooled_prompt_embeds [P]     FLUX only: the pooled CLIP vector
  prompt_embeds_mask [T]       Qwen-Image only: 1 for valid tokens
  caption (optional)           the text, as UTF-8 bytes
Images of several sizes go to one bucket per latent shape; a batch is always drawn from one
bucket (latents are never padded). Text fields have one shape across the dataset.

A Hunyuan3D-2 dataset (family "hunyuan3d") holds shapes instead of images:
  latents [N, C]               the ShapeVAE's latents as the DiT reads them (3072 x 64 for the
                               release; hy3dgen's encoder output times its scale_factor), float
  image_features [T, D]        DINOv2's last hidden states of a rendered view (1370 x 1536)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edit_jax.checkpoint import atomic_folder, resolve
from edit_jax.config import ConfigError

FORMAT = "edit-jax-dataset"
VERSION = 1
MANIFEST = "manifest.json"
MAX_SOURCES = 5  # source images named per bucket in the manifest (for messages about the bucket)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what `edit-jax prepare-data` reads
TEXT_FIELDS = {"flux": ("prompt_embeds", "pooled_prompt_embeds"), "qwen-image": ("prompt_embeds", "prompt_embeds_mask"),
               "hunyuan3d": ("image_features",)}  # the conditions beside the latents, the first read as encoder_hidden_states
TOKEN_LATENTS = ("hunyuan3d",)  # families whose latents are tokens [N, C] as the model reads them (not packed 2x2)


def _serialize(example: dict) -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize(example)


def _deserialize(record: bytes) -> dict:
    from flax import serialization

    return serialization.msgpack_restore(record)


def write_dataset(out: str | Path, family: str, examples: Iterable[dict], records_per_file: int = 4096,
                  overwrite: bool = False) -> Path:
    """Writes examples (dicts of the fields above, NumPy arrays, and optionally "source": the
    image's name, kept in the manifest for the first few of each bucket) as a dataset folder,
    atomically: into a hidden sibling folder renamed into place when complete. Returns the folder.

    Args:
      out: the dataset folder to create. family: the model family the latents are for.
      examples: an iterable of example dicts. records_per_file: ArrayRecord records per shard.
      overwrite: replace `out` if it is an edit-jax dataset.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if family not in TEXT_FIELDS:
        raise ConfigError(f"unknown model family {family!r}; choose from {', '.join(TEXT_FIELDS)}")
    out = resolve(out)
    if out.exists() and not (overwrite and (out / MANIFEST).is_file()):
        raise ConfigError(f"{out} already exists" + (" and is not an edit-jax dataset" if overwrite else ""))
    fields: dict | None = None
    buckets: dict[tuple, dict] = {}
    writers: dict[tuple, tuple] = {}
    with atomic_folder(out) as tmp:
        for index, example in enumerate(examples):
            arrays = {k: np.asarray(v) for k, v in example.items() if k not in ("caption", "source")}
            expected = {"latents", *TEXT_FIELDS[family]}
            if set(arrays) != expected:
                raise ConfigError(f"example {index} has fields {sorted(arrays)}; a {family} dataset needs {sorted(expected)}")
            tokens = family in TOKEN_LATENTS
            if arrays["latents"].ndim != (2 if tokens else 3):
                raise ConfigError(f"example {index}: latents have shape {arrays['latents'].shape}, expected "
                                  f"{'[N, C]' if tokens else '[C, H, W]'}")
            shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items() if k != "latents"}
            latent_shape = [None, arrays["latents"].shape[1]] if tokens else [arrays["latents"].shape[0], None, None]
            shapes["latents"] = {"shape": latent_shape, "dtype": str(arrays["latents"].dtype)}
            if fields is None:
                fields = shapes
            elif shapes != fields:
                raise ConfigError(f"example {index} has fields {shapes}, the first example {fields}")
            key = tuple(arrays["latents"].shape)
            bucket = buckets.setdefault(key, {"latent_shape": list(key), "count": 0, "files": []})
            if key not in writers or writers[key][1] >= records_per_file:
                if key in writers:
                    writers[key][0].close()
                name = f"bucket-{'x'.join(map(str, key))}-{len(bucket['files']):05d}.array_record"
                bucket["files"].append(name)
                writers[key] = (ArrayRecordWriter(str(tmp / name), "group_size:1"), 0)
            record = dict(arrays)
            if "caption" in example:
                record["caption"] = np.frombuffer(str(example["caption"]).encode(), np.uint8)
            writers[key][0].write(_serialize(record))
            writers[key] = (writers[key][0], writers[key][1] + 1)
            bucket["count"] += 1
            if "source" in example and len(bucket.setdefault("sources", [])) < MAX_SOURCES:
                bucket["sources"].append(str(example["source"]))
        for writer, _ in writers.values():
            writer.close()
        if fields is None:
            raise ConfigError("no examples to write")
        manifest = {"format": FORMAT, "version": VERSION, "family": family,
                    "count": sum(b["count"] for b in buckets.values()), "fields": fields,
                    "buckets": sorted(buckets.values(), key=lambda b: b["latent_shape"])}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_manifest(path: str | Path) -> dict:
    path = resolve(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        if not path.exists():
            raise ConfigError(f"dataset {path}: no such folder") from e
        images = sorted(p.name for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
        if images:
            raise ConfigError(
                f"{path} is a folder of images ({len(images)}, e.g. {images[0]}), not a dataset: encode them first with "
                f"`edit-jax prepare-data {path} data/{path.name} --model PIPELINE_DIR` (captions in NAME.txt beside each "
                f"image or a metadata.jsonl), then train with data=data/{path.name}") from e
        raise ConfigError(f"{path} is not an edit-jax dataset (no readable {MANIFEST}: {e}); `edit-jax prepare-data` "
                          "makes one from captioned images") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{path / MANIFEST} is not an edit-jax dataset manifest of version {VERSION}")
    return manifest


def check_fits(manifest: dict, model_config, path) -> None:
    """Raises ConfigError when the dataset is of another family or its shapes do not fit the model."""
    family = manifest["family"]
    if family != model_config.family:
        raise ConfigError(f"dataset {path} is for {family}, the checkpoint is {model_config.family}")
    if family in TOKEN_LATENTS:
        channels = manifest["fields"]["latents"]["shape"][-1]
        if channels != model_config.in_channels:
            raise ConfigError(f"dataset {path} has latents of {channels} channels; the model reads {model_config.in_channels}")
    else:
        channels = manifest["fields"]["latents"]["shape"][0]
        if 4 * channels != model_config.in_channels:  # the image families read latents packed 2x2
            raise ConfigError(f"dataset {path} has {channels} latent channels; the model reads {model_config.in_channels} "
                              "packed channels (4 x the latent channels)")
    condition = TEXT_FIELDS[family][0]
    width = manifest["fields"][condition]["shape"][-1]
    if width != model_config.joint_attention_dim:
        raise ConfigError(f"dataset {path} has {condition} {width} wide; the model expects {model_config.joint_attention_dim}")
    if family in TOKEN_LATENTS:
        return
    for bucket in manifest["buckets"]:
        _, h, w = bucket["latent_shape"]
        if h % 2 or w % 2:
            raise ConfigError(f"dataset {path}: latents {bucket['latent_shape']} are not a whole number of 2x2 patches")


def pack(latents: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (diffusers' _pack_latents, in NumPy)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def model_batch(family: str, records: dict) -> dict:
    """A batch of stacked records -> the per-sample model inputs the train step reads, and
    "grid": the packed token grid (rows, columns), the same for the whole batch."""
    latents = np.asarray(records["latents"], np.float32)
    if family in TOKEN_LATENTS:  # one row of N tokens
        return {"latents": latents, "grid": np.asarray([1, latents.shape[1]]),
                "encoder_hidden_states": np.asarray(records[TEXT_FIELDS[family][0]], np.float32)}
    batch = {"latents": pack(latents), "grid": np.asarray(latents.shape[2:]) // 2,
             "encoder_hidden_states": np.asarray(records["prompt_embeds"], np.float32)}
    if family == "flux":
        batch["pooled_projections"] = np.asarray(records["pooled_prompt_embeds"], np.float32)
    else:
        batch["encoder_hidden_states_mask"] = np.asarray(records["prompt_embeds_mask"], np.int32)
    return batch


def _training_fields(record: bytes) -> dict:
    """One record's arrays without its caption (text of any length: kept for people, not batched)."""
    return {k: v for k, v in _deserialize(record).items() if k != "caption"}


def batch_iterator(pipeline, prefetch: int):
    """The pipeline's checkpointable iterator, reading `prefetch` batches ahead on as many threads
    (0: none). grain's default, 500 elements on 16 threads, would be 500 batches here: tens of GB
    of host memory at full size."""
    import grain

    return iter(pipeline.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))


def describe_buckets(buckets: list[dict], shown: int = 3) -> str:
    """Each bucket's image size (latents x 8 px), its count and a few of its source images."""
    parts = []
    for b in buckets:
        sources = b.get("sources", [])
        size = (f"{b['latent_shape'][0]} tokens" if len(b["latent_shape"]) == 2
                else f"{b['latent_shape'][2] * 8}x{b['latent_shape'][1] * 8} px")
        parts.append(f"{size}: {b['count']}" + (f" ({', '.join(sources[:shown])}"
                                                           f"{', ...' if b['count'] > shown else ''})" if sources else ""))
    return "; ".join(parts)


def make_pipeline(path: str | Path, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """The grain dataset of this process's batches, forever: per bucket a seeded global shuffle,
    this process's slice (disjoint from the others', together covering the data), repeated with a
    new order each epoch, batched; buckets mixed in proportion to their sizes. batch_size is the
    per-process batch. Buckets smaller than one global batch are left out, with a warning naming
    them; none large enough is an error. `batch_iterator` gives the checkpointable iterator.

    Args:
      path: the dataset folder. batch_size: examples per batch in this process. seed: of the
        shuffles. process_index, process_count: this process and how many read the dataset.
    """
    import grain

    path = resolve(path)
    manifest = read_manifest(path)
    family = manifest["family"]
    global_batch = batch_size * process_count
    full = [b for b in manifest["buckets"] if b["count"] >= global_batch]
    small = [b for b in manifest["buckets"] if b["count"] < global_batch]
    if not full:
        raise ConfigError(f"dataset {path}: no aspect bucket holds one global batch of {global_batch} examples "
                          f"({describe_buckets(small)}): lower batch_size to at most "
                          f"{max(b['count'] for b in small)}, or add images (prepare-data puts each in the bucket "
                          "nearest its aspect ratio)")
    if small and process_index == 0:
        import sys

        print(f"dataset {path}: training on {sum(b['count'] for b in full)} of {manifest['count']} examples; "
              f"{len(small)} aspect bucket(s) hold fewer than one global batch of {global_batch} and are left out: "
              f"{describe_buckets(small)}", file=sys.stderr)
    datasets, weights = [], []
    for bucket in full:
        files = [str(path / f) for f in bucket["files"]]
        try:
            source = grain.sources.ArrayRecordDataSource(files)
        except (RuntimeError, OSError, ValueError) as e:  # array_record says little (often nothing) itself
            raise ConfigError(f"dataset {path}: cannot read the ArrayRecord files of bucket {bucket['latent_shape']} "
                              f"({', '.join(bucket['files'])}): truncated or not ArrayRecord? {e}") from e
        if len(source) != bucket["count"]:
            raise ConfigError(f"dataset {path}: bucket {bucket['latent_shape']} should hold {bucket['count']} examples "
                              f"(manifest.json), its files hold {len(source)}: an incomplete copy?")
        ds = (grain.MapDataset.source(source).shuffle(seed=seed)[process_index::process_count]
              .map(_training_fields).repeat().batch(batch_size, drop_remainder=True)
              .map(lambda records: model_batch(family, records)))
        datasets.append(ds)
        weights.append(bucket["count"])
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
