"""Choosing the model config of a conversion: the source's own config.json, a given one, or both
(which must then agree)."""

from __future__ import annotations


import dataclasses

from edit_jax.config import ACTIVATIONS, ConfigError, from_diffusers_config, read_json_object


def reconcile_config(source, config, family: str):
    """The config for a diffusers-format source; raises ConfigError when none is known or when
    the given one disagrees with the source's config.json (listing the differing fields)."""
    found, stated = None, set()
    if source.folder is not None and (source.folder / "config.json").is_file():
        found = from_diffusers_config(source.folder / "config.json", family)
        stated = set(read_json_object(source.folder / "config.json"))
    if config is None:
        if found is None:
            raise ConfigError(
                f"{source.description} has no config.json beside its weights: pass a config "
                "(--config PRESET or a config.json path)"
            )
        return found
    a, b = (found.architecture(), config.architecture()) if found is not None else ({}, {})
    # only what the source's config.json states is compared (it says nothing of e.g. activation)
    diffs = [f"{k}: source {a[k]!r} vs given {b[k]!r}" for k in a if k in stated and a[k] != b[k]]
    if diffs:
        raise ConfigError(f"the given config disagrees with {source.folder / 'config.json'}: " + "; ".join(diffs))
    return config


def with_recorded_activation(config, source, default: str | None = None):
    """`config` with the MLP activation the source's files record (`edit-jax export` writes it in
    their metadata), else `default` (a format's own: the Qwen-Image release's), else as it is."""
    activation = source.metadata.get("activation", default)
    if activation is None:
        return config
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{source.description} records the MLP activation {activation!r}; edit-jax knows "
                          f"{', '.join(ACTIVATIONS)}")
    return dataclasses.replace(config, activation=activation)
