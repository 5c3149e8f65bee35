"""Shared fixtures. The suite runs on the CPU: with libtpu installed (for compile-only runs),
JAX would otherwise try to start a TPU runtime in every process."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def save_diffusers(tmp_path):
    """Saves a diffusers model as a `transformer/` folder; returns the folder."""

    def save(model, name="transformer", **kwargs):
        path = tmp_path / "src" / name
        model.save_pretrained(path, **kwargs)
        return path

    return save
