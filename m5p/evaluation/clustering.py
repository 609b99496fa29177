"""Multi-modal clustering (SCALE.md section 6, task 4).

The authors released no clustering code, so m5p fixes the protocol: k-means
with k = the number of categories present, on L2-normalised features, run
with several seeds (one initialisation each) so the spread over seeds is
visible; NMI and purity (the paper's metrics) plus ARI, which, unlike purity
and NMI, is not inflated by many small clusters.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
  """Fraction of items whose cluster's majority class is their own class.

  Each cluster votes for its most frequent true label; purity = sum over
  clusters of that count / number of items. 1 for a perfect clustering (and
  for one cluster per item, which is why ARI is reported beside it).
  """
  labels_true = np.asarray(labels_true)
  labels_pred = np.asarray(labels_pred)
  if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
    raise ValueError(f"purity needs two equal 1-D label arrays, got {labels_true.shape} and "
                     f"{labels_pred.shape}")
  if len(labels_true) == 0:
    raise ValueError("purity of an empty clustering is undefined")
  _, t = np.unique(labels_true, return_inverse=True)
  _, p = np.unique(labels_pred, return_inverse=True)
  contingency = np.zeros((p.max() + 1, t.max() + 1), np.int64)
  np.add.at(contingency, (p, t), 1)
  return float(contingency.max(1).sum() / len(labels_true))


def kmeans_scores(features: np.ndarray, labels: np.ndarray, seeds: list[int] | tuple[int, ...],
                  num_clusters: int | None = None) -> dict[str, float]:
  """k-means over `seeds` (n_init=1 each) on L2-normalised `features` against `labels`.

  Returns fractions in [0, 1] (ARI can dip below 0): nmi, purity, ari as the
  mean over seeds and *_std their population std. k defaults to the number
  of distinct labels. Raises ValueError when k < 2 or k > number of items.
  """
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  labels = np.asarray(labels)
  k = len(np.unique(labels)) if num_clusters is None else int(num_clusters)
  if k < 2 or k > len(x):
    raise ValueError(f"k-means needs 2 <= k <= items, got k={k} for {len(x)} items")
  if not seeds:
    raise ValueError("kmeans_scores needs at least one seed")
  runs: dict[str, list[float]] = {"nmi": [], "purity": [], "ari": []}
  for s in seeds:
    pred = KMeans(n_clusters=k, n_init=1, random_state=int(s)).fit_predict(x)
    runs["nmi"].append(normalized_mutual_info_score(labels, pred))
    runs["purity"].append(purity(labels, pred))
    runs["ari"].append(adjusted_rand_score(labels, pred))
  out = {}
  for name, values in runs.items():
    out[name] = float(np.mean(values))
    out[f"{name}_std"] = float(np.std(values))
  return out
