"""Text encoders at the edge, run with PyTorch through transformers from a local pipeline folder,
exactly as the diffusers pipeline's own encode_prompt computes them (its code does the tokenising
and encoding): FLUX.1's CLIP-L (the pooled vector) and T5 (the token states); Qwen-Image's
Qwen2.5-VL text path (prompt template, dropped template prefix, last hidden states, mask).

    encoder = FluxTextEncoder("/models/FLUX.1-dev")
    embeds = encoder(["a cat"], cache=EmbeddingCache("~/.cache/edit-jax/prompt-embeddings"))
    embeds["prompt_embeds"] [B, 512, 4096], embeds["pooled_prompt_embeds"] [B, 768]
    QwenImageTextEncoder("/models/Qwen-Image")(["a cat"]) -> prompt_embeds [B, T, 3584], prompt_embeds_mask [B, T]

The cache keeps one .npz per (prompt, encoder weights and tokenizers, settings), so a prompt is
encoded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np

from edit_jax.checkpoint import atomic_file, resolve


@contextlib.contextmanager
def loading_bars(shown: bool):
    """diffusers' and transformers' loading progress bars shown or not inside (as they were after)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    before = [m.is_progress_bar_enabled() for m in modules]
    for m in modules:
        m.enable_progress_bar() if shown else m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in zip(modules, before):
            m.enable_progress_bar() if enabled else m.disable_progress_bar()


def device_and_dtype(device: str | None = None, dtype: str = "float32") -> tuple[str, str]:
    """Where the text encoders run (CUDA when torch sees it, unless `device` says) and their torch
    dtype there: "auto" is bfloat16 on CUDA; off CUDA they always run in float32."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (("bfloat16" if dtype == "auto" else dtype) if device.startswith("cuda") else "float32")


def missing_components(folder: Path, names) -> list[str]:
    return [name for name in names if not (folder / name).is_dir()]


def fingerprint(folder: Path, names) -> str:
    """What identifies the components' weights and vocabularies: every file's name, size and mtime."""
    items = []
    for name in names:
        for f in sorted((folder / name).rglob("*")):
            if f.is_file():
                stat = f.stat()
                items.append([str(f.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


class EmbeddingCache:
    """Prompt embeddings on disk, one .npz per key (written atomically)."""

    def __init__(self, folder: str | Path):
        self.folder = resolve(Path(folder).expanduser())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def get(self, key: str) -> dict | None:
        try:
            with np.load(self.path(key)) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):
            return None

    def put(self, key: str, arrays: dict) -> None:
        with atomic_file(self.path(key)) as tmp:
            np.savez(tmp, **arrays)


class TextEncoder:
    """A pipeline's text encoding through its own `encode_prompt`, with the per-prompt cache.
    Subclasses load the pipeline (`pipeline_class`, `components`) and define `encode` (a batch)
    and `rows` (its per-prompt parts, as cached) and `stack` (rows back into a batch)."""

    family: str
    pipeline_class: str
    components: tuple[str, ...]

    def __init__(self, folder: str | Path, max_sequence_length: int, device: str | None = None, progress: bool = True,
                 dtype: str = "float32"):
        """device and dtype: as `device_and_dtype` resolves them."""
        import diffusers
        import torch
        from diffusers.utils import is_accelerate_available

        self.folder = resolve(folder)
        missing = missing_components(self.folder, self.components)
        if missing:
            raise ValueError(f"{self.folder} is not a {self.family} pipeline folder with text encoders: "
                             f"no {', '.join(missing)}")
        self.device, self.dtype = device, dtype = device_and_dtype(device, dtype)
        self.max_sequence_length = max_sequence_length
        pipeline = getattr(diffusers, self.pipeline_class)
        with loading_bars(progress):  # accelerate only saves memory: no warning without it
            self.pipe = pipeline.from_pretrained(self.folder, transformer=None, vae=None, scheduler=None,
                                                 dtype=getattr(torch, dtype), local_files_only=True,
                                                 low_cpu_mem_usage=is_accelerate_available()).to(self.device)
        self.identity = fingerprint(self.folder, self.components)

    def key(self, prompt: str) -> str:
        settings = {"prompt": prompt, "encoders": self.identity, "max_sequence_length": self.max_sequence_length,
                    "family": self.family}
        if self.dtype != "float32":  # float32 keys stay those of caches written before encoders had a dtype
            settings["dtype"] = self.dtype
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def release(self) -> None:
        """Frees the encoders and the device memory they held (the cache stays usable)."""
        import torch

        self.pipe = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def encode(self, prompts: list[str]) -> dict:
        raise NotImplementedError

    def rows(self, batch: dict) -> list[dict]:
        count = len(next(iter(batch.values())))
        return [{k: v[n] for k, v in batch.items()} for n in range(count)]

    def stack(self, rows: list[dict], pad_to: int | None = None) -> dict:
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def encode_rows(self, prompts: list[str], cache: EmbeddingCache | None = None, batch_size: int = 8,
                    progress: bool = False, keep: bool = True) -> list[dict]:
        """Each prompt's embeddings (`rows`), encoded `batch_size` prompts at a time (each once
        with a cache). keep=False, with a cache: only fills it and returns [] (`cached_rows` reads
        them back a batch at a time, so a long list of prompts never sits in memory).

        Args:
          prompts: the texts. cache: an EmbeddingCache, or None. batch_size: above.
          progress: show progress. keep: above.
        """
        from tqdm.auto import tqdm

        rows = []
        with tqdm(total=len(prompts), desc="encode", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                if keep or cache is None:
                    rows += self.rows(self(batch, cache))
                elif missing := [p for p in batch if not cache.path(self.key(p)).is_file()]:
                    self(missing, cache)
                bar.update(len(batch))
        return rows

    def cached_rows(self, prompts: list[str], cache: EmbeddingCache) -> list[dict]:
        """The rows of prompts that `encode_rows` put in `cache`."""
        rows = [cache.get(self.key(p)) for p in prompts]
        for prompt, row in zip(prompts, rows):
            if row is None:
                raise ValueError(f"the embedding cache {cache.folder} lost the embeddings of {prompt!r} during this run "
                                 "(was it cleared meanwhile?)")
        return rows

    def __call__(self, prompts: list[str], cache: EmbeddingCache | None = None, pad_to: int | None = None) -> dict:
        """The batch of embeddings (float32 NumPy), each prompt encoded once with a cache."""
        rows: dict[int, dict] = {}
        if cache is not None:
            for i, prompt in enumerate(prompts):
                hit = cache.get(self.key(prompt))
                if hit is not None:
                    rows[i] = hit
        todo = [i for i in range(len(prompts)) if i not in rows]
        if todo:
            for i, row in zip(todo, self.rows(self.encode([prompts[i] for i in todo]))):
                rows[i] = row
                if cache is not None:
                    cache.put(self.key(prompts[i]), row)
        return self.stack([rows[i] for i in range(len(prompts))], pad_to)


class FluxTextEncoder(TextEncoder):
    """CLIP + T5 of a FLUX pipeline folder: {"prompt_embeds" [B, T, 4096] (T = max_sequence_length),
    "pooled_prompt_embeds" [B, 768]}."""

    family, pipeline_class = "flux", "FluxPipeline"
    components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def __init__(self, folder: str | Path, max_sequence_length: int = 512, **kwargs):
        if not 1 <= max_sequence_length <= 512:  # as FluxPipeline checks it
            raise ValueError(f"max_sequence_length {max_sequence_length}: FLUX's T5 reads 1 to 512 tokens")
        super().__init__(folder, max_sequence_length, **kwargs)

    def encode(self, prompts: list[str]) -> dict:
        import torch

        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float().cpu().numpy(), "pooled_prompt_embeds": pooled.float().cpu().numpy()}


class QwenImageTextEncoder(TextEncoder):
    """Qwen2.5-VL's text path of a Qwen-Image pipeline folder: the prompt in the pipeline's
    template, the last hidden states with the template's prefix dropped. {"prompt_embeds" [B, T, 3584],
    "prompt_embeds_mask" [B, T]}: T is the batch's longest prompt (at most max_sequence_length, or
    pad_to), shorter ones padded with zeros and mask 0, as the pipeline pads them."""

    family, pipeline_class = "qwen-image", "QwenImagePipeline"
    components = ("text_encoder", "tokenizer")

    def __init__(self, folder: str | Path, max_sequence_length: int = 512, **kwargs):
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length {max_sequence_length}: Qwen-Image reads 1 to 1024 tokens")
        super().__init__(folder, max_sequence_length, **kwargs)

    def encode(self, prompts: list[str]) -> dict:
        import torch

        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompts, device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        embeds = embeds.float().cpu().numpy()
        mask = np.ones(embeds.shape[:2], np.int64) if mask is None else mask.cpu().numpy().astype(np.int64)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def rows(self, batch: dict) -> list[dict]:
        """Each prompt's valid tokens only (the pipeline's padding is at the end)."""
        lengths = batch["prompt_embeds_mask"].sum(axis=1)
        return [{"prompt_embeds": e[:n], "prompt_embeds_mask": m[:n]}
                for e, m, n in zip(batch["prompt_embeds"], batch["prompt_embeds_mask"], lengths)]

    def stack(self, rows: list[dict], pad_to: int | None = None) -> dict:
        length = pad_to or max(len(row["prompt_embeds_mask"]) for row in rows)
        embeds = np.zeros((len(rows), length, rows[0]["prompt_embeds"].shape[-1]), np.float32)
        mask = np.zeros((len(rows), length), np.int64)
        for n, row in enumerate(rows):
            embeds[n, : len(row["prompt_embeds"])] = row["prompt_embeds"]
            mask[n, : len(row["prompt_embeds_mask"])] = row["prompt_embeds_mask"]
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


TEXT_ENCODERS = {cls.family: cls for cls in (FluxTextEncoder, QwenImageTextEncoder)}
