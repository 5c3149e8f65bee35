"""Atomic filesystem writes: a folder or file is written beside its destination under a hidden
name and renamed into place only when complete, so a failed or killed write never leaves
something that looks finished; what earlier killed writes left is removed by the next write."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path


def resolve(path: str | Path) -> Path:
    """An absolute, normalised path (`~` expanded): what every library call here receives."""
    return Path(path).expanduser().resolve()


def overlaps(a: Path, b: Path) -> bool:
    """Whether a is b, lies inside b, or holds b."""
    return a == b or a in b.parents or b in a.parents


_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?:incomplete|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(path: Path) -> list[Path]:
    """Removes the hidden folders that earlier writes of `path` left when they were killed (their
    process is gone; folders of older versions name no process); returns them."""
    removed = []
    for entry in path.parent.glob(f".{path.name}.*"):
        match = _SCRATCH.match(entry.name)
        if not match or match["name"] != path.name or not entry.is_dir():
            continue
        if match["pid"] is not None and _alive(int(match["pid"])):
            continue  # another write of the same path is under way
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def sigterm_raises():
    """Within the block a SIGTERM raises SystemExit (so `finally` and `except` clean up) instead
    of killing the process outright; only in the main thread, where signal handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yields a hidden temporary sibling folder to fill; when the block ends it replaces `path`
    (the old one goes only then), and on an error, SIGINT or SIGTERM it is removed. Folders that
    earlier, killed writes of `path` left are removed first. For single-process writers (exports,
    datasets); the caller has decided that `path` may be replaced."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_scratch(path):
        print(f"removed {stale}, left by an earlier write of {path} that did not finish", file=sys.stderr)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    with sigterm_raises():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        move_into_place(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yields a hidden temporary sibling path (with `path`'s suffix) to write one file to; when the
    block ends it replaces `path`, and on an error, SIGINT or SIGTERM it is removed."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    with sigterm_raises():
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def move_into_place(tmp: Path, path: Path) -> None:
    """Renames the finished `tmp` to `path`, replacing what is there; no signal lands between
    the two renames, so `path` is always either the old or the new checkpoint."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    trash = None
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if path.exists():
            trash = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
        os.rename(tmp, path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if trash is not None:
        shutil.rmtree(trash)
