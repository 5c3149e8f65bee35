"""The run folder (RUN_DIR): where a run may write, and what a resumed run changed.

A run writes only into a new or empty folder, or into the folder of an earlier run (what it holds
is only what runs write, its config.json a training config), and never into, over or around the
checkpoint it starts from: so `run_dir` pointing at a checkpoint, a model folder or a source tree
is refused before anything is written, instead of its config.json being replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

from edit_jax.checkpoint import is_checkpoint, overlaps, resolve
from edit_jax.config import ConfigError
from edit_jax.train.config import TrainConfig

CONFIG_FILE = "config.json"
SHARDING_FILE = "sharding.txt"  # every param's shape, logical axes and mesh axes
RUN_FILES = frozenset({CONFIG_FILE, "checkpoints", "tb", "metrics.jsonl", "eval.jsonl", "edit-jax", "profile",
                       "metrics.jsonl.tmp", "eval.jsonl.tmp", SHARDING_FILE})
FINAL_SCRATCH = ".edit-jax."  # the hidden folders of the final checkpoint's write (edit_jax.checkpoint)


LOGS = ("metrics.jsonl", "eval.jsonl")  # a record per logged step, {"step": N, ...}


def drop_records_after(path: Path, step: int) -> None:
    """Rewrites the JSON-lines log `path` without its records after `step` (a resumed run logs
    those steps again), atomically; a missing log is left missing."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: never a whole record
        return float("inf")


def run_config(run_dir: Path) -> dict | None:
    """The settings an earlier run in `run_dir` was started with (its config.json), or None when
    the folder holds no training config."""
    try:
        stored = json.loads((run_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and {"run_dir", "trainable", "steps"} <= stored.keys() else None


def run_status(run_dir: Path) -> dict | None:
    """Where the run in `run_dir` stands, or None when the folder holds no training run: the steps
    saved and asked for, the last logged metrics (with the step time) and when they were logged
    (UTC), and the trained checkpoint (once written)."""
    stored = run_config(run_dir)
    if stored is None:
        return None
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    final = run_dir / "edit-jax"
    return {"run_dir": str(run_dir), "checkpoint": stored.get("checkpoint"), "data": stored.get("data"),
            "trainable": stored["trainable"], "steps": stored["steps"], "saved_steps": saved,
            "last_metrics": {k: last[k] for k in ("step", "loss", "flow_loss", "open_rate", "step_time_s") if k in last},
            "last_logged_at": logged_at(last["time"]) if "time" in last else None,
            "trained_checkpoint": str(final) if is_checkpoint(final) else None}


def logged_at(seconds: float) -> str:
    """A record's wall-clock `time` (seconds since the epoch) as UTC, to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def check_run_dir(config: TrainConfig) -> Path:
    """The resolved run folder; a ConfigError, before anything is written, unless the run may
    write there (see the module docstring)."""
    run_dir = resolve(config.run_dir)
    if config.checkpoint is not None and overlaps(run_dir, resolve(config.checkpoint)):
        raise ConfigError(f"run_dir {run_dir} and checkpoint {resolve(config.checkpoint)} overlap: the run would write "
                          "into (or at the end over) the checkpoint it starts from; use a folder of its own")
    if not run_dir.exists():
        return run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a folder")
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith(FINAL_SCRATCH))
    if others or (run_dir / CONFIG_FILE).exists() and run_config(run_dir) is None:
        found = f"holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others else \
            f"has a {CONFIG_FILE} that is not a training config"
        raise ConfigError(f"run_dir {run_dir} {found}: it is not a training run's folder, and a run writes only into "
                          "a new or empty folder or an earlier run's; choose another run_dir")
    return run_dir


def changed_settings(stored: dict | None, config: TrainConfig) -> dict[str, tuple]:
    """{field: (the earlier run's value, this config's)} for every field but run_dir that differs
    (JSON values, so a tuple and its list are equal); empty without a stored config. A field the
    earlier run's edit-jax did not have yet counts as changed only when it is not at its default."""
    if stored is None:
        return {}
    now, default = (json.loads(json.dumps(c.to_dict())) for c in (config, TrainConfig()))
    return {k: (stored.get(k), v) for k, v in now.items()
            if k != "run_dir" and stored.get(k, default[k]) != v}


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {before!r} -> {after!r}" for k, (before, after) in changes.items())
