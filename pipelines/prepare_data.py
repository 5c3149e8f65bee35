"""`edit-jax prepare-data`: a folder of captioned images -> the training dataset (train/dataset.py).

    edit-jax prepare-data photos/ data/photos --model /models/FLUX.1-dev --resolution 1024
    edit-jax prepare-data photos/ data/photos-qwen --model /models/Qwen-Image

Captions come from one captions file (--captions, or IMAGES/metadata.jsonl or metadata.csv as in
Hugging Face's `imagefolder` layout): JSONL lines {"file": PATH, "caption": TEXT} (or "file_name"
and "text", that layout's names), or a CSV with those columns, PATH relative to IMAGES and possibly
in a subfolder; or else from a sidecar `NAME.txt` beside each image in IMAGES. Each image goes to the resolution bucket (a
multiple of 16 px on each side, about resolution^2 pixels) nearest its aspect ratio, is resized to
cover it and center-cropped, encoded by the pipeline folder's Flax VAE (the latent mean, normalised
as the pipeline does: FLUX shift and scale, Qwen-Image per-channel mean and std) and its caption
by the text encoders (Qwen-Image's embeddings padded to --max-sequence-length, with the mask).
Work is staged in chunks under `OUT.partial/`, so an interrupted run resumes where it stopped; the dataset is written at the end,
atomically, and the staging folder removed. Images that cannot be used are reported with the
reason (unreadable, unusable pixels, too small, no caption, listed but missing) in OUT/skipped.json.
Every mode Pillow opens is read as a viewer shows it (`to_rgb`): EXIF orientation, 16-bit
grayscale scaled to 8 bits, palette and alpha over white, CMYK converted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edit_jax.checkpoints_convert.vae import load_vae
from edit_jax.checkpoint import resolve
from edit_jax.pipelines.generate import pipeline_family
from edit_jax.pipelines.text_encoders import TEXT_ENCODERS, device_and_dtype
from edit_jax.train.dataset import IMAGE_SUFFIXES, MANIFEST, TEXT_FIELDS, write_dataset

METADATA = ("metadata.jsonl", "metadata.csv")  # the captions files of Hugging Face's imagefolder layout
FILE_KEYS, CAPTION_KEYS = ("file", "file_name"), ("caption", "text")
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


def buckets(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution^2 pixels, multiples of 16, one per aspect ratio."""
    out = []
    for aspect in ASPECTS:  # aspect = width / height
        h = max(16, int(round(resolution / math.sqrt(aspect) / 16)) * 16)
        w = max(16, int(round(resolution * math.sqrt(aspect) / 16)) * 16)
        out.append((h, w))
    return out


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    return min(buckets(resolution), key=lambda b: abs(math.log((b[1] / b[0]) / (width / height))))


def fit(image, bucket: tuple[int, int]):
    """The PIL image resized to cover the bucket (Lanczos) and center-cropped to it; None when
    that would need upscaling (the image is too small)."""
    from PIL import Image

    h, w = bucket
    scale = max(h / image.height, w / image.width)
    if scale > 1.0:
        return None
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(size, Image.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # a 16-bit PNG opens as one of these
BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white


class UnusableImage(ValueError):
    """An image that opens but whose pixels cannot be read as RGB; the message is the reason."""


def to_rgb(image):
    """The PIL image as 8-bit RGB, as a viewer shows it: EXIF orientation applied, 16-bit
    grayscale scaled to 8 bits (not saturated, as Pillow's own convert does), palette and
    alpha images composited over white, CMYK and other colour modes converted. Raises
    UnusableImage for pixels that are not colours (float or 32-bit integer data)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise UnusableImage(f"{image.mode} pixels outside the 16-bit range")
        image = Image.fromarray(np.round(values.astype(np.float32) / 257.0).astype(np.uint8), "L")
    if image.mode == "F":
        raise UnusableImage("floating-point pixels (mode F)")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND + (255,)), image).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot turn into RGB (LAB, HSV)
        raise UnusableImage(f"colour mode {image.mode} cannot be read as RGB") from e


def captions_file(images: Path, captions: str | None) -> Path | None:
    """The captions file (JSONL, or CSV with a header): --captions, else IMAGES/metadata.jsonl or
    metadata.csv where there is one, else None (sidecar .txt files)."""
    if captions is None:
        return next((images / name for name in METADATA if (images / name).is_file()), None)
    path = resolve(captions)
    if not path.is_file():
        raise ValueError(f"--captions {captions}: no such file")
    return path


def _caption_rows(captions: Path):
    """(line number, row dict or None where the line is not one, the line) of a JSONL or CSV file."""
    import csv

    try:
        text = captions.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"captions file {captions} is not UTF-8 text: {e}") from e
    if captions.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            yield reader.line_num, row, str(row)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            yield number, row if isinstance(row, dict) else None, line


def read_captions(images: Path, captions: Path | None) -> dict[str, str | None]:
    """Image path relative to IMAGES (POSIX) -> caption, from the captions file or, without it,
    the sidecar .txt files (None: a sidecar that is not UTF-8 text, so that its image is skipped
    with that reason)."""
    out = {}
    if captions is not None:
        for number, row, line in _caption_rows(captions):
            file = next((row[k] for k in FILE_KEYS if k in row), None) if row is not None else None
            caption = next((row[k] for k in CAPTION_KEYS if k in row), None) if row is not None else None
            if not isinstance(file, str) or not file or not isinstance(caption, str):
                raise ValueError(f"{captions} line {number}: expected a file (\"file\" or \"file_name\") and a caption "
                                 f"(\"caption\" or \"text\"), got {line[:80]}")
            out[Path(file).as_posix()] = caption
        return out
    for txt in images.glob("*.txt"):
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            caption = None
        for suffix in IMAGE_SUFFIXES:
            out[txt.stem + suffix] = out[txt.stem + suffix.upper()] = caption
    return out


def prepare_data(images_dir, out, model_dir, *, captions: str | None = None, resolution: int = 1024,
                 max_sequence_length: int = 512, chunk: int = 16, overwrite: bool = False, progress: bool = True,
                 dtype: str = "auto") -> dict:
    """Writes the dataset; returns the report {"written", "skipped": [{"file", "reason"}], "buckets"}.
    dtype: the text encoders' on a CUDA device ("auto": bfloat16; float32 elsewhere).

    Args:
      images_dir: the folder of images. out: the dataset folder to create. model_dir: the pipeline
        folder (its VAE and text encoders). captions: a captions file, or None. resolution: the
        buckets' side, pixels. max_sequence_length: text tokens. chunk: images per chunk written.
      overwrite: replace `out` if it is an edit-jax dataset. progress: show progress. dtype: above.
    """
    import shutil

    import jax
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    images_dir, out, model_dir = resolve(images_dir), resolve(out), resolve(model_dir)
    if not images_dir.is_dir():
        raise ValueError(f"IMAGES {images_dir}: no such folder")
    if resolution % 16 or resolution < 16:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of 16")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (--overwrite replaces an edit-jax dataset)")
    if out.exists() and not (out / MANIFEST).is_file():  # known before hours of encoding, not after
        raise ValueError(f"{out} exists and is not an edit-jax dataset (no {MANIFEST}): --overwrite replaces only datasets")
    family = pipeline_family(model_dir, unused=("transformer", "scheduler"))
    captions_path = captions_file(images_dir, captions)
    texts = read_captions(images_dir, captions_path)
    names = {p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if captions_path is not None:
        names |= set(texts)  # what the captions file lists, in subfolders too
    files = sorted(names)
    if not files:
        raise ValueError(f"IMAGES {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    staging = out.with_name(out.name + ".partial")
    settings = {"images": str(images_dir), "model": str(model_dir), "resolution": resolution,
                "max_sequence_length": max_sequence_length, "chunk": chunk,
                "captions": None if captions_path is None else str(captions_path)}
    text_dtype = device_and_dtype(None, dtype)[1]
    if text_dtype != "float32":  # float32 settings stay those of runs interrupted before encoders had a dtype
        settings["text_dtype"] = text_dtype
    stamp = staging / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings:
        raise ValueError(f"{staging} holds an interrupted run of other settings; remove it or use the same ones")
    if not stamp.is_file() and staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise ValueError(f"{staging} holds other files, not an interrupted prepare-data run (no settings.json): "
                         "move it away or choose another OUT")

    vae_config, vae_params = load_vae(model_dir / "vae")
    encode = jax.jit(lambda p, x: vae_config.module().apply({"params": p}, x, method="encode")[0])
    encoder = TEXT_ENCODERS[family](model_dir, max_sequence_length, progress=progress, dtype=dtype)
    staging.mkdir(parents=True, exist_ok=True)  # only now: a refusal above leaves nothing behind
    stamp.write_text(json.dumps(settings))
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    with tqdm(total=len(files), desc="prepare-data", unit="image", disable=not progress) as bar:
        for index, group in enumerate(chunks):
            done = staging / f"chunk-{index:05d}.npz"
            if done.is_file():
                bar.update(len(group))
                continue
            rows, skipped = [], []
            for name in group:
                path = images_dir / name
                reason = None
                if name not in texts:
                    reason = "no caption"
                elif not path.is_file():
                    reason = f"listed in {captions_path.name}, no such file"
                elif texts[name] is None:
                    reason = f"its caption {path.stem}.txt is not UTF-8 text"
                if reason is not None:
                    skipped.append({"file": name, "reason": reason})
                    continue
                caption = texts[name]
                try:
                    with Image.open(path) as opened:
                        image = to_rgb(opened)
                except (UnidentifiedImageError, OSError) as e:
                    skipped.append({"file": name, "reason": f"unreadable ({e.__class__.__name__})"})
                    continue
                except UnusableImage as e:
                    skipped.append({"file": name, "reason": f"unusable: {e}"})
                    continue
                bucket = nearest_bucket(image.height, image.width, resolution)
                fitted = fit(image, bucket)
                if fitted is None:
                    skipped.append({"file": name, "reason": f"too small ({image.width}x{image.height} for the "
                                                                f"{bucket[1]}x{bucket[0]} bucket)"})
                    continue
                pixels = np.asarray(fitted, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
                latents = np.asarray(vae_config.to_model_latents(encode(vae_params, pixels)))[0]
                rows.append((name, caption, latents))
            arrays = {"skipped": np.frombuffer(json.dumps(skipped).encode(), np.uint8)}
            if rows:
                text = encoder([caption for _, caption, _ in rows], pad_to=max_sequence_length)
                for n, (name, caption, latents) in enumerate(rows):
                    arrays[f"{n}/latents"] = latents
                    arrays.update({f"{n}/{field}": text[field][n] for field in TEXT_FIELDS[family]})
                    arrays[f"{n}/caption"] = np.frombuffer(caption.encode(), np.uint8)
                    arrays[f"{n}/source"] = np.frombuffer(name.encode(), np.uint8)
            tmp = staging / f".chunk-{index:05d}.npz"
            np.savez(tmp, **arrays)
            tmp.replace(done)
            bar.update(len(group))

    skipped, shapes = [], {}

    def examples():
        for index in range(len(chunks)):
            with np.load(staging / f"chunk-{index:05d}.npz") as data:
                skipped.extend(json.loads(data["skipped"].tobytes()))
                count = len({k.split("/")[0] for k in data.files if "/" in k})
                for n in range(count):
                    latents = data[f"{n}/latents"]
                    key = "x".join(map(str, latents.shape))
                    shapes[key] = shapes.get(key, 0) + 1
                    yield {"latents": latents, **{field: data[f"{n}/{field}"] for field in TEXT_FIELDS[family]},
                           "caption": data[f"{n}/caption"].tobytes().decode(),
                           **({"source": data[f"{n}/source"].tobytes().decode()} if f"{n}/source" in data else {})}

    try:
        write_dataset(out, family, examples(), overwrite=overwrite)
    except ValueError as e:
        if "no examples" in str(e):
            shutil.rmtree(staging)  # every chunk was done: nothing to resume
            reasons = "; ".join(f"{r['file']}: {r['reason']}" for r in skipped[:5])
            raise ValueError(f"no usable images in {images_dir}: {len(skipped)} skipped ({reasons})") from e
        raise
    report = {"written": sum(shapes.values()), "skipped": skipped, "latent_shapes": shapes, "dataset": str(out)}
    (out / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
    shutil.rmtree(staging)
    return report
