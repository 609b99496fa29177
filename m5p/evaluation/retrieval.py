"""Retrieval metrics with the authors' exact definitions (SCALE.md section 6).

For each query: rank the gallery by dot product, remove the query itself;
P = gallery items sharing the query's label *including the query* (as the
authors count it); K' = min(K, |P|, list length); walking the top K', each
hit at rank r adds (hits so far) / r; AP@K = that sum / hits (0 if none);
Prec@K = hits / K'. mAP@K and Prec@K average over queries, reported x100.
"""
from __future__ import annotations

import numpy as np


def _topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
  k = min(k, scores.shape[1])
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
  return np.take_along_axis(part, order, 1)


def retrieval_metrics(query_emb: np.ndarray, query_labels: np.ndarray, query_keys: np.ndarray,
                      gallery_emb: np.ndarray, gallery_labels: np.ndarray, gallery_keys: np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
  """mAP@K, Prec@K (authors) and Recall@K (any hit in top K), x100, for each K.

  `*_keys` identify items (e.g. record indices) so a query is removed from its
  own ranked list when it is also in the gallery.
  """
  query_emb = np.asarray(query_emb, np.float32)
  gallery_emb = np.asarray(gallery_emb, np.float32)
  max_k = max(ks)
  # Count of relevant gallery items per label (the authors' P, which includes the query).
  labels, counts = np.unique(gallery_labels, return_counts=True)
  count_of = dict(zip(labels.tolist(), counts.tolist()))
  sums = {f"{name}@{k}": 0.0 for k in ks for name in ("mAP", "Prec", "Recall")}
  n = len(query_emb)
  for start in range(0, n, chunk):
    q = query_emb[start:start + chunk]
    scores = q @ gallery_emb.T
    same = query_keys[start:start + chunk, None] == gallery_keys[None, :]
    scores = np.where(same, -np.inf, scores)
    list_len = len(gallery_emb) - same.sum(1)
    top = _topk_indices(scores, max_k + 1)[:, :max_k]
    hits = gallery_labels[top] == query_labels[start:start + chunk, None]
    # A query in the gallery sits at -inf and can only be ranked beyond the list; mask it.
    hits &= np.arange(top.shape[1])[None] < list_len[:, None]
    num_rel = np.array([count_of.get(l, 0) for l in query_labels[start:start + chunk].tolist()])
    ranks = np.arange(1, top.shape[1] + 1)[None]
    cum = np.cumsum(hits, 1)
    for k in ks:
      k_eff = np.minimum(np.minimum(k, num_rel), list_len)  # K'
      within = ranks <= k_eff[:, None]
      h = hits & within
      n_hits = h.sum(1)
      ap = np.where(n_hits > 0, (np.where(h, cum / ranks, 0.0)).sum(1) / np.maximum(n_hits, 1), 0.0)
      prec = np.where(k_eff > 0, n_hits / np.maximum(k_eff, 1), 0.0)
      recall = (hits[:, :k].sum(1) > 0).astype(np.float64)
      sums[f"mAP@{k}"] += ap.sum()
      sums[f"Prec@{k}"] += prec.sum()
      sums[f"Recall@{k}"] += recall.sum()
  return {name: 100.0 * v / max(n, 1) for name, v in sums.items()}
