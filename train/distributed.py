"""Multi-process setup: `jax.distributed.initialize` when a run is launched as several processes.

TPU pod slices and clusters JAX knows (SLURM, Open MPI, Kubernetes) set it up themselves:
`--distributed` lets JAX detect them. GPU nodes started by hand give the coordinator address, the
process count and this process's id, as flags or as EDIT_JAX_COORDINATOR, EDIT_JAX_NUM_PROCESSES,
EDIT_JAX_PROCESS_ID. Call before anything touches a device.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from edit_jax.config import ConfigError

ENV = ("EDIT_JAX_COORDINATOR", "EDIT_JAX_NUM_PROCESSES", "EDIT_JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> bool:
    """Joins the processes of one run; returns whether this is a multi-process run. Flags win over
    the environment; with neither (and not `auto`) the run is one process.

    Args:
      coordinator: HOST:PORT of process 0, or None. num_processes, process_id: or None.
      auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI, Kubernetes).
    """
    import jax

    coordinator = coordinator or os.environ.get(ENV[0])
    num_processes = num_processes if num_processes is not None else _int_env(ENV[1])
    process_id = process_id if process_id is not None else _int_env(ENV[2])
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("a multi-process run needs all three of the coordinator address, the number of processes "
                          f"and this process's id (flags --coordinator --num-processes --process-id, or {', '.join(ENV)})")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if auto:
        try:
            jax.distributed.initialize()
        except ValueError as e:  # JAX's own words name its argument, not the situation
            raise ConfigError(f"--distributed: JAX found no cluster to join ({e}): it detects TPU pod slices, SLURM, "
                              "Open MPI and Kubernetes jobs; elsewhere give every process --coordinator, "
                              "--num-processes and --process-id, or leave --distributed out for one process") from e
        return jax.process_count() > 1
    return False


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"{name}={value!r} is not an integer") from e


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM (preemption)", signal.SIGINT: "SIGINT (Ctrl-C)"}


class Preemption:
    """A stop request (SIGTERM, a preemption notice; or SIGINT, Ctrl-C) as one decision of every
    process: `reached(step)` is True at the step where all of them save and stop. One process:
    handlers inside the `with` block (in the main thread; elsewhere none), and the step after the
    signal. Several: JAX's preemption service, which catches SIGTERM itself (so no Python handler
    replaces its own), tells every process and picks the step after the furthest one; a SIGINT is
    passed on to it as a SIGTERM to the same process; `reached` must then be called by every
    process at every step. Where that service is off (`jax_enable_preemption_service`), a
    multi-process run keeps the signals' defaults: it stops without a checkpoint, and says so first."""

    def __init__(self):
        import jax

        several = jax.process_count() > 1
        self.shared = several and jax.config.jax_enable_preemption_service
        self.signal = None
        self._received = None
        main_thread = threading.current_thread() is threading.main_thread()
        self._handled = {}
        if main_thread and not several:
            self._handled = {signal.SIGTERM: self._record, signal.SIGINT: self._record}
        elif main_thread and self.shared:
            self._handled = {signal.SIGINT: self._pass_on}
        self._previous = {}
        if several and not self.shared and jax.process_index() == 0:
            print("preemption: JAX's preemption service is off (jax_enable_preemption_service), so a SIGTERM or "
                  "Ctrl-C stops this multi-process run without a checkpoint; a rerun resumes from the last one saved "
                  "(save_every)", file=sys.stderr)

    def _record(self, signum, frame):
        self.signal = self.signal or signum

    def _pass_on(self, signum, frame):  # the service decides the step; the signal is remembered for the exit
        self._received = self._received or signum
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, handler) for signum, handler in self._handled.items()}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def reached(self, step: int) -> bool:
        if self.shared:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self._received or signal.SIGTERM
        return self.signal is not None

    def describe(self) -> str:
        return STOP_SIGNALS.get(self.signal, f"signal {self.signal}")
