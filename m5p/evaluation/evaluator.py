"""Runs the downstream evaluations on embeddings and writes `<workdir>/eval.json`."""
from __future__ import annotations

import json
import os

import numpy as np

from m5p.data import convert
from m5p.evaluation import retrieval


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
  lists = convert.load_manifest(data_dir).get("splits_files", {})
  q_ids, g_ids = lists.get(f"{prefix}_query"), lists.get(f"{prefix}_gallery")
  if q_ids and g_ids:
    row_of = {bytes(i).decode(): r for r, i in enumerate(emb["item_id"])}
    q = np.array([row_of[i] for i in q_ids if i in row_of and emb["label"][row_of[i]] >= 0], int)
    g = np.array([row_of[i] for i in g_ids if i in row_of and emb["label"][row_of[i]] >= 0], int)
    if len(q) and len(g):
      return q, g
  return labelled, labelled


def coarse_retrieval(emb: dict, data_dir: str, ks: tuple[int, ...], seed: int) -> dict[str, dict]:
  q, g = _query_gallery(emb, data_dir, "coarse")
  labels, keys = emb["label"], emb["index"]
  results = {}
  feats = retrieval_features(emb)
  rng = np.random.default_rng(seed)
  feats["random"] = rng.standard_normal(emb["fused"].shape).astype(np.float32)
  for name, f in feats.items():
    task = "coarse_retrieval" if name == "fused" else f"coarse_retrieval_{name}"
    results[task] = retrieval.retrieval_metrics(f[q], labels[q], keys[q], f[g], labels[g], keys[g], ks)
    results[task].update(num_queries=float(len(q)), gallery_size=float(len(g)))
  return results


def evaluate_embeddings(emb: dict, data_dir: str, ks: tuple[int, ...], seed: int = 0) -> dict[str, dict]:
  return coarse_retrieval(emb, data_dir, tuple(ks), seed)


def write_eval(workdir: str, results: dict, step: int) -> str:
  path = os.path.join(workdir, "eval.json")
  out = dict(results)
  out["meta"] = {"step": float(step)}
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path
