"""Shared fixtures."""

import pytest


@pytest.fixture
def save_diffusers(tmp_path):
    """Saves a diffusers model as a `transformer/` folder; returns the folder."""

    def save(model, name="transformer", **kwargs):
        path = tmp_path / "src" / name
        model.save_pretrained(path, **kwargs)
        return path

    return save
