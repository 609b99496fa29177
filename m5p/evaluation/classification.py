"""Evaluation of a fine-tuned classifier (task='classify'): top-1, top-5, macro-F1.

The test items are picked as the linear probe picks them (evaluator.py): the
labelled items of the eval split in the `cls_test` id list (every labelled
item when the dataset has no such list), so `classification` and
`linear_probe` in eval.json are measured on the same items. Two floors sit
beside it, like every other task's `<task>_random`:

  classification_random    standard-normal scores (expected top-1 = 1/C)
  classification_majority  the training labels' class frequencies as scores
                           (always the most frequent class first)

Rates x100 like the other tasks; counts plain.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from m5p import sharding
from m5p.data import convert
from m5p.evaluation import probe as probe_lib

log = logging.getLogger("m5p")

RATES = ("top1", "top5", "macro_f1")


def make_logits_fn(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable:
  """(params, batch) -> {'logits'}: what `embed.embed_split` runs per eval batch."""

  def logits(params, batch):
    return {"logits": model.apply({"params": params}, batch, train=False)["logits"]}

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(model.config)):
    return jax.jit(logits, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def scored_rows(emb: dict, data_dir: str, list_name: str = "cls_test") -> tuple[np.ndarray, str]:
  """(rows of `emb` scored, where they came from): labelled items of `list_name`
  in this split, in list order (as the probe), else every labelled item."""
  ids = convert.load_manifest(data_dir).get("splits_files", {}).get(list_name) if list_name else None
  labelled = np.asarray(emb["label"]) >= 0
  if ids:
    row_of = {bytes(i).decode(): r for r, i in enumerate(emb["item_id"])}
    rows = np.array([row_of[i] for i in dict.fromkeys(ids) if i in row_of], int)
    rows = rows[labelled[rows]] if len(rows) else rows
    if len(rows):
      return rows, f"{list_name} list"
  return np.flatnonzero(labelled), "every labelled item"


def scores_metrics(scores: np.ndarray, y_test: np.ndarray, train_labels: np.ndarray) -> dict:
  """top1, top5, macro_f1 (fractions) of class scores [N, C] (column c = class c)
  against y_test, and the counts that go with them."""
  classes = np.arange(scores.shape[1])
  pred = np.argmax(scores, axis=1)
  return {
      "top1": probe_lib.top_k_accuracy(scores, classes, y_test, 1),
      "top5": probe_lib.top_k_accuracy(scores, classes, y_test, 5),
      "macro_f1": probe_lib.macro_f1(y_test, pred),
      "num_train": float(len(train_labels)),
      "num_test": float(len(y_test)),
      "num_classes": float(scores.shape[1]),
      "unseen_test": float((~np.isin(y_test, train_labels)).sum()),
  }


def evaluate(emb: dict, data_dir: str, train_labels: np.ndarray, *, list_name: str = "cls_test",
             seed: int = 0) -> dict[str, dict]:
  """{classification, classification_random, classification_majority} from
  `emb` (embed_split's output with 'logits' [N, C]); `train_labels`: the
  labels of the items trained on (for the majority floor and `unseen_test`)."""
  rows, source = scored_rows(emb, data_dir, list_name)
  if not len(rows):
    log.warning("eval: classification skipped: no labelled item in the eval split")
    return {}
  logits = np.asarray(emb["logits"], np.float32)[rows]
  y_test = np.asarray(emb["label"])[rows]
  c = logits.shape[1]
  train_labels = np.asarray(train_labels)
  counts = np.bincount(train_labels[(train_labels >= 0) & (train_labels < c)], minlength=c)
  log.info("eval: classification on %s (%d test items, %d classes, %d trained on)", source,
           len(rows), c, len(train_labels))
  floors = {
      "classification": logits,
      "classification_random": np.random.default_rng(seed).standard_normal(logits.shape),
      # Ties (classes of equal count) broken towards the lower class index.
      "classification_majority": np.broadcast_to(counts - np.arange(c) * 1e-6, logits.shape),
  }
  results = {}
  for task, scores in floors.items():
    m = scores_metrics(np.asarray(scores), y_test, train_labels)
    results[task] = {k: 100.0 * v if k in RATES else v for k, v in m.items()}
  return results
