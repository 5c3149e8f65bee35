"""The arrays files a user gives the CLI: prompt embeddings (`encode-prompts` writes them;
`sample` and `eval` read them) and calibration inputs, as .npz or .safetensors, checked before
any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edit_jax.sampling.sampler import make_conditions


def read_arrays(path: str, flag: str, make_one: str = "") -> dict:
    """The named arrays of an .npz or .safetensors file; a ValueError naming the flag otherwise
    (`make_one`: how to make the right file, said then), or naming the array that holds NaN or
    infinite values (they would give NaN samples). Arrays of text (an embeddings file's prompts)
    are read as they are; pickled objects never."""
    existing_file(path, flag)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not path.endswith(".safetensors") and not head.startswith(b"PK"):  # an .npz is a zip archive
        kind = ("an .npy array" if head.startswith(b"\x93NUMPY") else
                "a text file" if b"\0" not in head and _decodes(head) else "not one")
        raise ValueError(f"{flag} {path} is not an .npz or .safetensors file of named arrays ({kind}){make_one}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            data = load_file(path)
        else:
            with np.load(path, allow_pickle=False) as file:
                data = dict(file)
    except Exception as e:  # numpy and safetensors raise many types for a file that is not theirs
        reason = "it holds pickled objects, which edit-jax never loads" if "pickle" in str(e) else str(e)
        raise ValueError(f"{flag} {path} is not a readable .npz or .safetensors file: {reason}{make_one}") from e
    for key, value in data.items():
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise ValueError(f"{flag} {path}: {key!r} holds NaN or infinite values")
    return data


def _decodes(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a character cut at the end of the bytes read
    return True


def existing_file(path: str, flag: str) -> str:
    """`path` when it is a file; otherwise a ValueError naming the flag."""
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    return path


MAKE_EMBEDDINGS = ("; make one from a prompts file with `edit-jax encode-prompts --model PIPELINE_DIR --prompts "
                   "prompts.txt --out prompts.npz`")


def read_embeddings(path: str) -> dict:
    """Prompt embeddings from .npz or .safetensors: prompt_embeds [B, T, D] and, as the model
    needs, pooled_prompt_embeds [B, P] (FLUX), prompt_embeds_mask [B, T] (Qwen-Image) and the
    negative_* counterparts for true CFG."""
    data = read_arrays(path, "--embeddings", MAKE_EMBEDDINGS)
    if "prompt_embeds" not in data:
        raise ValueError(f"{path} has no 'prompt_embeds' (found: {sorted(data)}){MAKE_EMBEDDINGS}")
    return data


EMBEDDING_KEYS = {
    "flux": "prompt_embeds [B, T, 4096] (T5) and pooled_prompt_embeds [B, 768] (CLIP)",
    "qwen-image": "prompt_embeds [B, T, 3584] and prompt_embeds_mask [B, T] (1 = valid token)",
}


def check_embeddings(config, data: dict, path: str) -> None:
    """Raises ValueError when the file lacks what the model family needs, naming it."""
    need = {"flux": "pooled_prompt_embeds", "qwen-image": None}[config.family]
    if need is not None and need not in data:
        raise ValueError(f"{path} has no {need!r}: a {config.family} model needs {EMBEDDING_KEYS[config.family]}")


def embedding_conditions(config, data: dict, height: int, width: int, prefix: str = "") -> dict | None:
    """The sampler's cond from an embeddings file ("negative_" prefix: the CFG negative); None
    when the file has no such prompt.

    Args:
      config: the model config. data: the file's arrays (`read_embeddings`).
      height, width: the image's pixels. prefix: "" for the prompt, "negative_" for true CFG's.
    """
    if f"{prefix}prompt_embeds" not in data:
        return None
    return make_conditions(config, data[f"{prefix}prompt_embeds"], height, width,
                           data.get(f"{prefix}pooled_prompt_embeds"), data.get(f"{prefix}prompt_embeds_mask"))
