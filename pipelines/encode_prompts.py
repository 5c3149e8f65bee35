"""`edit-jax encode-prompts`: prompts to the embeddings file that `sample` and `eval` read.

    edit-jax encode-prompts --model /models/FLUX.1-dev --prompts prompts.txt --out prompts.npz
    edit-jax eval runs/flux-edit/edit-jax --embeddings prompts.npz --steps 28 --out eval-flux

The pipeline folder's own text encoders (pipelines/text_encoders.py: exactly the pipeline's
encode_prompt) run in batches, through the per-prompt cache. The .npz holds prompt_embeds
[B, T, D_txt] and FLUX's pooled_prompt_embeds [B, 768] or Qwen-Image's prompt_embeds_mask [B, T]
(T: the longest prompt's tokens, the others padded with mask 0), the same arrays prefixed
negative_ for --negative-prompt (one negative prompt, repeated for every prompt), and prompts [B],
the texts. It is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edit_jax.checkpoint import atomic_file, resolve
from edit_jax.pipelines.generate import MODEL_COMPONENTS, pipeline_family
from edit_jax.pipelines.text_encoders import EmbeddingCache, TEXT_ENCODERS


def check_embeddings_destination(out: Path, overwrite: bool) -> None:
    """An .npz path that is new, or with `overwrite` an earlier embeddings file (never another file)."""
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: give a .npz file name")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a .npz file name")
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"--out {out} already exists (--overwrite replaces an earlier embeddings file)")
    try:
        with np.load(out) as data:
            ours = "prompt_embeds" in data.files
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"--out {out} exists and is not an embeddings file (no prompt_embeds): not replacing it")


def encode_prompts(model_dir, prompts: list[str], out, *, negative_prompt: str | None = None,
                   max_sequence_length: int = 512, batch_size: int = 8, embeddings_cache=None,
                   overwrite: bool = False, progress: bool = True, dtype: str = "auto") -> dict:
    """Writes the embeddings of `prompts` (and of `negative_prompt`) to the .npz `out`; returns a
    summary: the file, the family, the encoders' dtype and each array's shape. dtype: the text
    encoders' on a CUDA device ("auto": bfloat16; float32 elsewhere).

    Args:
      model_dir: the pipeline folder. prompts: the texts. out: the .npz to write.
      negative_prompt: true CFG's, or None. max_sequence_length: text tokens. batch_size: prompts
        encoded at once. embeddings_cache: a folder of cached embeddings, or None. overwrite: replace
        an earlier file at `out`. progress: show progress. dtype: above.
    """
    folder, out = resolve(model_dir), resolve(out)
    family = pipeline_family(folder, unused=MODEL_COMPONENTS)
    check_embeddings_destination(out, overwrite)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts FILE")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: give at least 1")
    encoder = TEXT_ENCODERS[family](folder, max_sequence_length, progress=progress, dtype=dtype)
    store = EmbeddingCache(embeddings_cache) if embeddings_cache else None
    arrays = encoder.stack(encoder.encode_rows(prompts, store, batch_size, progress))
    if negative_prompt is not None:
        negative = encoder([negative_prompt], store)
        arrays |= {f"negative_{k}": np.repeat(v, len(prompts), axis=0) for k, v in negative.items()}
    arrays["prompts"] = np.array(prompts)
    with atomic_file(out) as tmp:
        np.savez(tmp, **arrays)
    return {"embeddings": str(out), "family": family, "prompts": len(prompts), "encoders_dtype": encoder.dtype,
            "negative_prompt": negative_prompt, "arrays": {k: list(v.shape) for k, v in arrays.items()}}
