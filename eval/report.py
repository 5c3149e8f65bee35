"""What every benchmark records beside its figures, and how it hands them out."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import jax


def environment() -> dict:
    """Date, machine, device and JAX version of this run."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


def emit(result: dict, out: str | None) -> dict:
    """Prints the result as JSON and writes it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return result
