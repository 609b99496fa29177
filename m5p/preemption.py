"""SIGTERM / SIGINT as a request to stop after the current step, not a crash.

Schedulers (Kubernetes, SLURM, TPU maintenance) send SIGTERM some seconds
before SIGKILL. The trainer asks `should_stop(step)` after each step; when it
says yes the trainer checkpoints that step, flushes its writers, stops the
input workers and exits with code 75 (m5p.failures).

- One process: a Python handler records the signal; the trainer stops after
  the step in flight.
- Several processes: the signal may reach one host only, and every host must
  checkpoint the same step. JAX's preemption service (on by default in
  `jax.distributed`) catches SIGTERM and agrees on a step; `should_stop`
  asks it through `multihost_utils.reached_preemption_sync_point`. SIGINT is
  forwarded to it as SIGTERM.

Bounded exit: once the stop is known, a watchdog ends the process with code
75 if it has not exited within `grace_s` (a hung save or worker); a second
signal ends it at once (code 128 + signal), which may leave a half-written
checkpoint that the next run reports and removes.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax

from m5p import failures

log = logging.getLogger("m5p")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: installs the handlers, restores the previous ones on exit."""

  def __init__(self, grace_s: float = 120.0, multiprocess: bool | None = None):
    self.grace_s = float(grace_s)
    self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
    self.signal_name: str | None = None  # Set when a stop is requested.
    self.received_at: float | None = None
    self._previous: dict[int, Any] = {}
    self._watchdog: threading.Timer | None = None
    self._announced = False

  # -- Handlers ---------------------------------------------------------------

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python only delivers signals to the main thread's handlers.
    for sig in SIGNALS:
      if self.multiprocess and sig == signal.SIGTERM:
        continue  # JAX's preemption service owns SIGTERM (its C++ handler).
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if self._watchdog is not None:
      self._watchdog.cancel()

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # Second signal: the user means it.
      sys.stderr.write(f"m5p: second signal ({name}) while stopping: exiting now\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    if self.multiprocess:  # Let JAX's preemption service spread it to every process.
      self.signal_name = name
      os.kill(os.getpid(), signal.SIGTERM)
      return
    self.signal_name, self.received_at = name, time.monotonic()
    self._start_watchdog()

  def _start_watchdog(self) -> None:
    if self._watchdog is None and self.grace_s > 0:
      self._watchdog = threading.Timer(self.grace_s, self._expire)
      self._watchdog.daemon = True
      self._watchdog.start()

  def _expire(self) -> None:
    log.error("Still running %.0f s after %s (config.preempt_grace_s): exiting now with code %d.",
              self.grace_s, self.signal_name, failures.EXIT_PREEMPTED)
    for handler in log.handlers:
      handler.flush()
    os._exit(failures.EXIT_PREEMPTED)  # pylint: disable=protected-access

  # -- What the loop asks ---------------------------------------------------------

  def should_stop(self, step: int) -> bool:
    """True once every process should checkpoint `step` and leave; call after each step."""
    if self.multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # Preemption service disabled: only our own flag (this process).
        reached = self.signal_name is not None
      if reached:
        self.signal_name = self.signal_name or "SIGTERM"
        self.received_at = self.received_at or time.monotonic()
        self._start_watchdog()
    else:
      reached = self.signal_name is not None
    if reached and not self._announced:
      self._announced = True
      log.warning("%s received: step %d is done; checkpointing it and stopping (exit code %d).",
                  self.signal_name, step, failures.EXIT_PREEMPTED)
    return reached

  @property
  def requested(self) -> bool:
    """A stop was asked of this process (before the processes agreed on a step)."""
    return self.signal_name is not None
