"""Training metrics: one JSON line per log step in metrics.jsonl, plus TensorBoard files."""
from __future__ import annotations

import json
import math
import os

import jax


class MetricsWriter:
  """Writes on process 0 only; appends, so a resumed run continues the same files."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience, never a reason to fail.
        self._tb = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
