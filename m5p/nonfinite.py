"""Non-finite steps: skipped on device, counted and judged on the host without stalling it.

The train step (m5p.train.make_train_step) checks every step on device that
the loss, the gradient norm and the updated state are finite; when not, it
keeps the previous params and optimizer state (the step counter and the data
still advance, so the bad batch is not retried) and sets its `nonfinite`
metric to 1. So a non-finite state is never trained on, and never saved.

`Monitor` reads those flags in step order, each once it is computed
(`jax.Array.is_ready`: no host sync per step), and applies
`config.optim.nonfinite`:

  'skip'  count the step and go on; stop (m5p.failures.Diverged) after
          `optim.nonfinite_max_consecutive` bad steps in a row
  'stop'  stop at the first bad step

Before a checkpoint or a log line the trainer calls `drain()`, which waits
for the steps still in flight. While bad steps follow one another the state
is the one that went non-finite, so the trainer saves no checkpoint then; when
the run stops, it moves aside the checkpoints holding that state (saved at or
after the step before the first bad one), so that a rerun with a saner config
resumes from before it (m5p.train).
"""
from __future__ import annotations

import collections
import logging
import math
from typing import Any

import jax
import ml_collections

from m5p.failures import ConfigError, Diverged

log = logging.getLogger("m5p")

POLICIES = ("skip", "stop")
FLAG = "nonfinite"  # The train step's metric: 1.0 when the step's update was skipped.


def policy(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(policy, max consecutive bad steps) from config.optim; ConfigError when invalid."""
  name = str(config.optim.get("nonfinite", "skip"))
  limit = int(config.optim.get("nonfinite_max_consecutive", 10))
  if name not in POLICIES:
    raise ConfigError(f"config.optim.nonfinite={name!r}: expected one of {POLICIES}")
  if limit < 1:
    raise ConfigError(f"config.optim.nonfinite_max_consecutive={limit}: expected >= 1")
  return name, (1 if name == "stop" else limit)


def _bad_terms(metrics: dict[str, float], shown: int = 6) -> str:
  """'loss=nan, mlm=inf' for the non-finite metrics (the loss first, then the loss terms,
  then the rest: grad_norm, modality weights), or what else went wrong."""
  bad = [k for k in metrics if k != FLAG and not math.isfinite(metrics[k])]
  bad.sort(key=lambda k: (k != "loss", "/" in k or k in ("grad_norm", "lr"), k))
  if not bad:
    return "the update (loss and gradient norm were finite)"
  more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
  return ", ".join(f"{k}={metrics[k]}" for k in bad[:shown]) + more


class Monitor:
  """Follows the train step's `nonfinite` flag in step order."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.policy, self.max_consecutive = policy(config)
    self.consecutive = 0
    self.total = 0
    self.streak_start: int | None = None  # First step of the current run of bad steps.
    self._pending: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()

  def push(self, step: int, metrics: dict[str, Any]) -> None:
    """Records a dispatched step's (device) metrics, then judges the steps already computed."""
    self._pending.append((step, metrics))
    self.poll()

  def poll(self) -> None:
    while self._pending and self._pending[0][1][FLAG].is_ready():
      self._judge(*self._pending.popleft())

  def drain(self) -> None:
    """Judges every pending step, waiting for them (before a checkpoint or at the end)."""
    while self._pending:
      self._judge(*self._pending.popleft())

  def _judge(self, step: int, metrics: dict[str, Any]) -> None:
    if float(metrics[FLAG]) == 0.0:
      self.consecutive, self.streak_start = 0, None
      return
    self.consecutive += 1
    self.total += 1
    if self.consecutive == 1:
      self.streak_start = step
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    terms = _bad_terms(values)
    if self.consecutive >= self.max_consecutive:
      self._pending.clear()
      raise Diverged(
          f"step {step}: non-finite {terms}; {self.consecutive} bad step(s) in a row "
          f"(config.optim.nonfinite={self.policy!r}, "
          f"nonfinite_max_consecutive={self.max_consecutive}); stopping. No non-finite update "
          "was applied or saved.", first_bad_step=self.streak_start)
    log.warning("step %d: non-finite %s: update skipped (%d in a row, %d in all).", step, terms,
                self.consecutive, self.total)
