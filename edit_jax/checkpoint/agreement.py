"""Multi-host agreement for checkpoint writes: every process of a multi-process run takes process
0's decision and waits at the same barriers (a no-op in a single process)."""

from __future__ import annotations

import os
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils


def agreed(decision: bool) -> bool:
    """Process 0's decision, in every process of a multi-process run."""
    if jax.process_count() > 1:
        decision = bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    return decision


def shared_token() -> str:
    """PID-uuid naming this write's temporary folder: process 0's, in a multi-process run."""
    token = np.frombuffer(f"{os.getpid():010d}{uuid.uuid4().hex[:8]}".encode(), np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    text = token.tobytes().decode()
    return f"{int(text[:10])}-{text[10:]}"


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
