"""FLUX.1's text encoders at the edge: CLIP-L (the pooled vector) and T5 (the token states), run
with PyTorch through transformers from a local pipeline folder, exactly as diffusers'
FluxPipeline.encode_prompt computes them (its own code does the tokenising and encoding).

    encoder = FluxTextEncoder("/models/FLUX.1-dev")
    embeds = encoder(["a cat"], cache=EmbeddingCache("~/.cache/edit-jax/prompt-embeddings"))
    embeds["prompt_embeds"] [B, 512, 4096], embeds["pooled_prompt_embeds"] [B, 768]

The cache keeps one .npz per (prompt, encoder weights and tokenizers, settings), so a prompt is
encoded once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edit_jax.checkpoint import resolve

COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


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
        import os

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        tmp.replace(self.path(key))


class FluxTextEncoder:
    """CLIP + T5 of a FLUX pipeline folder (its text_encoder, tokenizer, text_encoder_2, tokenizer_2)."""

    def __init__(self, folder: str | Path, max_sequence_length: int = 512, device: str | None = None):
        import torch
        from diffusers import FluxPipeline

        self.folder = resolve(folder)
        missing = missing_components(self.folder, COMPONENTS)
        if missing:
            raise ValueError(f"{self.folder} is not a FLUX pipeline folder with text encoders: no {', '.join(missing)}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_sequence_length = max_sequence_length
        self.pipe = FluxPipeline.from_pretrained(self.folder, transformer=None, vae=None, scheduler=None,
                                                 dtype=torch.float32, local_files_only=True).to(self.device)
        self.identity = fingerprint(self.folder, COMPONENTS)

    def key(self, prompt: str) -> str:
        settings = {"prompt": prompt, "encoders": self.identity, "max_sequence_length": self.max_sequence_length,
                    "family": "flux"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]

    def encode(self, prompts: list[str]) -> dict:
        import torch

        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.float().cpu().numpy(), "pooled_prompt_embeds": pooled.float().cpu().numpy()}

    def __call__(self, prompts: list[str], cache: EmbeddingCache | None = None) -> dict:
        """{"prompt_embeds" [B, T, D], "pooled_prompt_embeds" [B, P]} float32, cached per prompt."""
        rows: dict[int, dict] = {}
        if cache is not None:
            for i, prompt in enumerate(prompts):
                hit = cache.get(self.key(prompt))
                if hit is not None:
                    rows[i] = hit
        todo = [i for i in range(len(prompts)) if i not in rows]
        if todo:
            fresh = self.encode([prompts[i] for i in todo])
            for n, i in enumerate(todo):
                rows[i] = {k: v[n] for k, v in fresh.items()}
                if cache is not None:
                    cache.put(self.key(prompts[i]), rows[i])
        return {k: np.stack([rows[i][k] for i in range(len(prompts))]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
