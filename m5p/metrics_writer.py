"""Training metrics: one JSON line per log step in metrics.jsonl, plus TensorBoard files.

A resumed run continues the same files. Rows a previous run wrote after the
step it is resumed from (it was stopped or killed before checkpointing them)
are dropped first, so metrics.jsonl holds each step once, and TensorBoard is
told to purge its events from that step on.
"""
from __future__ import annotations

import json
import logging
import math
import os

import jax

log = logging.getLogger("m5p")
METRICS_FILE = "metrics.jsonl"


def truncate_after(path: str, step: int) -> int:
  """Keeps the rows of `path` with step <= `step` (and drops unreadable lines: a write
  cut short by a kill); returns how many rows were dropped. Rewritten atomically."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if row_step <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricsWriter:
  """Writes on process 0 only; `start_step`: the step the run resumes from (0: fresh)."""

  def __init__(self, workdir: str, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      dropped = truncate_after(path, start_step)
      if dropped:
        log.info("%s: dropped %d rows after step %d (a run stopped before checkpointing them).",
                 path, dropped, start_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        # purge_step: TensorBoard drops the earlier run's events from this step on.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1 if start_step else None)
      except ImportError:  # TensorBoard files are a convenience, never a reason to fail.
        self._tb = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v)))
                for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    if self._jsonl:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
