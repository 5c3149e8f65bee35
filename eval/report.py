"""What every benchmark records beside its figures, how it hands them out, and how it runs as a program."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path


def environment() -> dict:
    """Date, machine, device and JAX version of this run."""
    import jax  # here, not at the top: the scripts that measure memory import JAX late or not at all

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


def run_script(main: Callable) -> None:
    """Runs an eval script's main() as a program: bad input (an unknown preset or config field, a
    size the model cannot take, a missing file) is one line on stderr and exit status 2."""
    try:
        main()
    except (ValueError, OSError) as e:  # edit_jax's ConfigError is a ValueError
        spec = getattr(sys.modules.get(main.__module__), "__spec__", None)  # run with -m: __main__ is eval.<name>
        print(f"{spec.name if spec is not None else main.__module__}: error: {e}", file=sys.stderr)
        sys.exit(2)
