"""Runs the downstream evaluations on embeddings and writes `<workdir>/eval.json`.

Tasks (SCALE.md section 6), each beside its random-embedding floor
(`<task>_random`: the same protocol on standard-normal features of the same
shape): coarse retrieval, fine-grained retrieval, k-means clustering and a
linear probe. Rates are x100 like the paper's tables; counts are plain. A
task whose inputs the split cannot supply (no fine groups, fewer than two
categories, ...) is logged as skipped and left out of the results.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from m5p.data import convert
from m5p.evaluation import clustering as clustering_lib
from m5p.evaluation import probe as probe_lib
from m5p.evaluation import retrieval

log = logging.getLogger("m5p")


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _random_like(emb: dict, seed: int) -> np.ndarray:
  """The floor's features: standard normal, the fused features' shape (same for every task)."""
  return np.random.default_rng(seed).standard_normal(emb["fused"].shape).astype(np.float32)


def _skip(task: str, why: str) -> dict:
  log.warning("eval: %s skipped: %s", task, why)
  return {}


def _id_lists(data_dir: str) -> dict[str, list[str]]:
  return convert.load_manifest(data_dir).get("splits_files", {})


def _rows_of(emb: dict, ids: list[str] | None) -> np.ndarray:
  """Rows of `emb` holding `ids`, in list order; ids not in this split are dropped."""
  if not ids:
    return np.zeros(0, int)
  row_of = {bytes(i).decode(): r for r, i in enumerate(emb["item_id"])}
  return np.array([row_of[i] for i in dict.fromkeys(ids) if i in row_of], int)


def retrieval_features(emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The features each retrieval variant ranks with.

  'fused': the authors' product feature, the sum of the joint co-transformer's
  pooled vectors of the present modalities, ranked by dot product.
  'contrastive': the sum of the L2-normalised contrastive embeddings z_m of
  the present modalities (what the contrastive loss aligns).
  """
  present = emb["present"][..., None].astype(np.float32)
  return {"fused": emb["fused"], "contrastive": (_l2n(emb["z"]) * present).sum(1)}


def _query_gallery(emb: dict, data_dir: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """Row indices of queries and gallery: the dataset's `<prefix>_query/gallery` id
  lists when given and found in this split, else every labelled item (leave-one-out)."""
  labelled = np.flatnonzero(emb["label"] >= 0)
  lists = _id_lists(data_dir)
  q_ids, g_ids = lists.get(f"{prefix}_query"), lists.get(f"{prefix}_gallery")
  if q_ids and g_ids:
    row_of = {bytes(i).decode(): r for r, i in enumerate(emb["item_id"])}
    q = np.array([row_of[i] for i in q_ids if i in row_of and emb["label"][row_of[i]] >= 0], int)
    g = np.array([row_of[i] for i in g_ids if i in row_of and emb["label"][row_of[i]] >= 0], int)
    if len(q) and len(g):
      return q, g
  return labelled, labelled


def coarse_query_gallery(emb: dict, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Rows of the coarse-retrieval queries and gallery (also used by any-modality retrieval)."""
  return _query_gallery(emb, data_dir, "coarse")


def coarse_retrieval(emb: dict, data_dir: str, ks: tuple[int, ...], seed: int) -> dict[str, dict]:
  q, g = _query_gallery(emb, data_dir, "coarse")
  labels, keys = emb["label"], emb["index"]
  results = {}
  feats = retrieval_features(emb)
  feats["random"] = _random_like(emb, seed)
  for name, f in feats.items():
    task = "coarse_retrieval" if name == "fused" else f"coarse_retrieval_{name}"
    results[task] = retrieval.retrieval_metrics(f[q], labels[q], keys[q], f[g], labels[g], keys[g], ks)
    results[task].update(num_queries=float(len(q)), gallery_size=float(len(g)))
  return results


def fine_query_gallery(emb: dict, lists: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(query rows, gallery rows, retrieval labels) for instance retrieval.

  Queries are items with a fine group; the gallery is the `fine_gallery` list
  (with `fine_query`) when both are given and found in this split, else every
  item of the split (leave-one-out). Gallery items without a group stay in as
  distractors: their label is unique (negative), so they are never relevant.
  Queries with no group-mate in the gallery (other than themselves) are
  dropped: they could only score 0.
  """
  group = np.asarray(emb["fine_group"])
  labels = np.where(group >= 0, group, -1 - np.arange(len(group)))
  q, g = _rows_of(emb, lists.get("fine_query")), _rows_of(emb, lists.get("fine_gallery"))
  q = q[group[q] >= 0]
  if not (len(q) and len(g)):
    q, g = np.flatnonzero(group >= 0), np.arange(len(group))
  in_gallery = np.zeros(len(group), bool)
  in_gallery[g] = True
  mates = np.bincount(group[g][group[g] >= 0], minlength=int(group.max(initial=-1)) + 1)
  q = q[mates[group[q]] - in_gallery[q].astype(int) > 0]
  return q, g, labels


def fine_retrieval(emb: dict, data_dir: str, ks: tuple[int, ...], seed: int) -> dict[str, dict]:
  """Instance retrieval (relevant = same fine group) with the coarse task's metrics."""
  if emb.get("fine_group") is None:
    return _skip("fine_retrieval", "the embeddings carry no 'fine_group'")
  if not (np.asarray(emb["fine_group"]) >= 0).any():
    return _skip("fine_retrieval", "no item of this split has a fine group")
  q, g, labels = fine_query_gallery(emb, _id_lists(data_dir))
  if not len(q):
    return _skip("fine_retrieval", "no query has a group-mate in the gallery")
  keys = emb["index"]
  results = {}
  for task, f in (("fine_retrieval", emb["fused"]), ("fine_retrieval_random", _random_like(emb, seed))):
    results[task] = retrieval.retrieval_metrics(f[q], labels[q], keys[q], f[g], labels[g], keys[g], ks)
    results[task].update(num_queries=float(len(q)), gallery_size=float(len(g)))
  return results


def _labelled_eval_rows(emb: dict, lists: dict[str, list[str]]) -> np.ndarray:
  """Labelled rows of the `cls_test` list when it is given and found here, else all labelled rows."""
  labelled = emb["label"] >= 0
  rows = _rows_of(emb, lists.get("cls_test"))
  rows = rows[labelled[rows]]
  return rows if len(rows) else np.flatnonzero(labelled)


def _percent(metrics: dict[str, float], rates: tuple[str, ...]) -> dict[str, float]:
  return {k: float(100.0 * v) if k.split("_std")[0] in rates else float(v) for k, v in metrics.items()}


def clustering(emb: dict, data_dir: str, seed: int, num_seeds: int = 5) -> dict[str, dict]:
  """k-means with k = categories present, on L2-normalised fused features, `num_seeds` seeds."""
  rows = _labelled_eval_rows(emb, _id_lists(data_dir))
  labels = emb["label"][rows]
  k = len(np.unique(labels))
  if k < 2 or k > len(rows):
    return _skip("clustering", f"needs 2 <= k <= items, have k={k} categories over {len(rows)} items")
  seeds = [seed + i for i in range(num_seeds)]
  results = {}
  for task, f in (("clustering", emb["fused"]), ("clustering_random", _random_like(emb, seed))):
    m = clustering_lib.kmeans_scores(f[rows], labels, seeds, num_clusters=k)
    results[task] = _percent(m, ("nmi", "purity", "ari"))
    results[task].update(num_items=float(len(rows)), k=float(k), seeds=float(num_seeds))
  return results


def _probe_sets(emb: dict, lists: dict[str, list[str]],
                train_emb: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(train features, train labels, test rows of `emb`, where they came from) for the probe.

  `cls_train`/`cls_test` ids when the train ids resolve to labelled items of
  >= 2 classes (looked up in `train_emb`, then `emb`) and the test ids to
  labelled items of `emb`; else a deterministic stratified 70/30 split of this
  split's labelled items (probe.stratified_split).
  """
  tr_x, tr_y, seen = [], [], set()
  for pool in (p for p in (train_emb, emb) if p is not None):
    rows = _rows_of(pool, [i for i in lists.get("cls_train") or [] if i not in seen])
    rows = rows[pool["label"][rows] >= 0]
    seen.update(bytes(i).decode() for i in pool["item_id"][rows])
    tr_x.append(pool["fused"][rows])
    tr_y.append(pool["label"][rows])
  test = _rows_of(emb, lists.get("cls_test"))
  test = test[emb["label"][test] >= 0]
  if tr_y and len(np.unique(np.concatenate(tr_y))) >= 2 and len(test):
    return np.concatenate(tr_x), np.concatenate(tr_y), test, "cls_train/cls_test lists"
  labelled = np.flatnonzero(emb["label"] >= 0)
  train, test = probe_lib.stratified_split(emb["index"][labelled], emb["label"][labelled])
  train, test = labelled[train], labelled[test]
  return emb["fused"][train], emb["label"][train], test, "stratified 70/30 of the labelled items"


def linear_probe(emb: dict, data_dir: str, seed: int, train_emb: dict | None = None) -> dict[str, dict]:
  """Multinomial logistic regression on frozen fused features: top1, top5, macro_f1.

  The floor trains and tests on standard-normal features of the same shapes.
  """
  x_train, y_train, test, source = _probe_sets(emb, _id_lists(data_dir), train_emb)
  n_classes = len(np.unique(y_train))
  if n_classes < 2 or not len(test):
    return _skip("linear_probe", f"needs >= 2 training classes and a test item, have {n_classes} "
                 f"classes and {len(test)} test items")
  log.info("eval: linear_probe on %s (%d train, %d test)", source, len(y_train), len(test))
  random_train = np.random.default_rng(seed + 1).standard_normal(x_train.shape).astype(np.float32)
  y_test = emb["label"][test]
  results = {}
  for task, xtr, xte in (("linear_probe", x_train, emb["fused"][test]),
                         ("linear_probe_random", random_train, _random_like(emb, seed)[test])):
    m = probe_lib.linear_probe(xtr, y_train, xte, y_test, seed=seed)
    results[task] = _percent(m, ("top1", "top5", "macro_f1"))
  return results


def evaluate_embeddings(emb: dict, data_dir: str, ks: tuple[int, ...], seed: int = 0, *,
                        cluster_seeds: int = 5, train_emb: dict | None = None) -> dict[str, dict]:
  """All downstream tasks on one split's embeddings: {task: {metric: float}}.

  `train_emb` (optional, same fields) lets the probe train on `cls_train` ids
  that live in another split; without it they are looked up in `emb` only.
  """
  ks = tuple(ks)
  results = coarse_retrieval(emb, data_dir, ks, seed)
  results.update(fine_retrieval(emb, data_dir, ks, seed))
  results.update(clustering(emb, data_dir, seed, cluster_seeds))
  results.update(linear_probe(emb, data_dir, seed, train_emb))
  return results


def write_eval(workdir: str, results: dict, step: int) -> str:
  path = os.path.join(workdir, "eval.json")
  out = dict(results)
  out["meta"] = {"step": float(step)}
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path
