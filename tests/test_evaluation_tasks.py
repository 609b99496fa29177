"""Fine retrieval, clustering and the linear probe: hand-worked metrics and the whole evaluator."""
import json
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, f1_score, normalized_mutual_info_score

from m5p.data import convert, schema
from m5p.evaluation import clustering, evaluator, probe, retrieval


def _write_manifest(path, splits_files=None):
  manifest = {"record_version": schema.RECORD_VERSION}
  if splits_files is not None:
    manifest["splits_files"] = splits_files
  with open(path / convert.MANIFEST, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  return str(path)


def _emb(fused, label, fine_group=None, seed=0):
  n = len(fused)
  rng = np.random.default_rng(seed)
  emb = {"index": np.arange(n, dtype=np.int32), "label": np.asarray(label, np.int32),
         "item_id": np.array([f"item{i}".encode() for i in range(n)]),
         "present": rng.random((n, 5)) > 0.3, "fused": np.asarray(fused, np.float32),
         "z": rng.standard_normal((n, 5, 4)).astype(np.float32)}
  if fine_group is not None:
    emb["fine_group"] = np.asarray(fine_group, np.int32)
  return emb


# ---------------------------------------------------------------------------
# Clustering metrics.

# Six items, true classes 0 0 0 1 1 2, clusters 0 0 1 1 1 1.
TRUE = np.array([0, 0, 0, 1, 1, 2])
PRED = np.array([0, 0, 1, 1, 1, 1])


def test_purity_hand_worked():
  # Cluster 0 = {0, 0}: majority 2; cluster 1 = {0, 1, 1, 2}: majority 2 -> 4 / 6.
  assert clustering.purity(TRUE, PRED) == pytest.approx(4 / 6)
  assert clustering.purity(TRUE, TRUE + 7) == 1.0  # Cluster ids need not match class ids.
  assert clustering.purity(TRUE, np.zeros(6)) == pytest.approx(3 / 6)  # One cluster: majority class.


def _entropy(counts):
  p = np.asarray(counts, float) / np.sum(counts)
  p = p[p > 0]
  return -(p * np.log(p)).sum()


def test_nmi_and_ari_hand_worked_match_sklearn():
  # Contingency (clusters x classes): [[2, 0, 0], [1, 2, 1]].
  joint = np.array([[2, 0, 0], [1, 2, 1]])
  mi = _entropy([3, 2, 1]) + _entropy([2, 4]) - _entropy(joint.ravel())
  nmi = mi / ((_entropy([3, 2, 1]) + _entropy([2, 4])) / 2)  # Arithmetic normalisation (sklearn's).
  # ARI by pair counting: sum C(n_ij, 2) = 1 + 1 = 2; rows C(2,2)+C(4,2) = 7; columns 3+1+0 = 4; C(6,2) = 15.
  expected = 4 * 7 / 15
  ari = (2 - expected) / ((7 + 4) / 2 - expected)
  assert normalized_mutual_info_score(TRUE, PRED) == pytest.approx(nmi)
  assert adjusted_rand_score(TRUE, PRED) == pytest.approx(ari)


def _blobs(n_per, k, dim, rng, spread=0.05):
  centers = 10 * np.eye(dim)[:k]
  labels = np.repeat(np.arange(k), n_per)
  return centers[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_separated_blobs_cluster_perfectly_and_random_features_do_not():
  rng = np.random.default_rng(0)
  x, labels = _blobs(25, 4, 8, rng)
  m = clustering.kmeans_scores(x, labels, seeds=(0, 1, 2))
  assert m["nmi"] == pytest.approx(1.0) and m["purity"] == 1.0 and m["ari"] == pytest.approx(1.0)
  assert m["nmi_std"] == pytest.approx(0.0, abs=1e-12)
  # Random features, many items per cluster: NMI and ARI near 0, purity near the 1/k floor.
  labels = rng.integers(0, 4, 600)
  r = clustering.kmeans_scores(rng.standard_normal((600, 8)), labels, seeds=(0, 1))
  assert r["nmi"] < 0.05 and abs(r["ari"]) < 0.05 and r["purity"] < 0.4
  assert set(r) == {"nmi", "nmi_std", "purity", "purity_std", "ari", "ari_std"}


def test_kmeans_scores_agree_with_sklearn_on_the_clusters_found():
  from sklearn.cluster import KMeans
  rng = np.random.default_rng(1)
  x, labels = _blobs(10, 3, 4, rng, spread=4.0)  # Overlapping: an imperfect clustering.
  m = clustering.kmeans_scores(x, labels, seeds=(5,))
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  pred = KMeans(n_clusters=3, n_init=1, random_state=5).fit_predict(xn)
  assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred))
  assert m["ari"] == pytest.approx(adjusted_rand_score(labels, pred))
  assert m["purity"] == pytest.approx(clustering.purity(labels, pred))


def test_kmeans_refuses_impossible_k():
  with pytest.raises(ValueError):
    clustering.kmeans_scores(np.ones((3, 2)), np.array([0, 1, 2]), seeds=(0,), num_clusters=4)
  with pytest.raises(ValueError):
    clustering.kmeans_scores(np.ones((3, 2)), np.array([0, 0, 0]), seeds=(0,))


# ---------------------------------------------------------------------------
# Fine-grained retrieval.

def test_fine_retrieval_hand_worked(tmp_path):
  # Queries q_a = e1 (group 0) and q_b = e2 (group 1) rank the gallery by x and y.
  fused = [[1, 0], [0, 1],                          # 0: q_a (group 0), 1: q_b (group 1)
           [0.9, 0.1], [0.95, 0.7], [0.7, 0.9],     # 2: group 0, 3: no group, 4: group 1
           [0.6, 0.2], [0.1, 0.8],                  # 5: group 0, 6: group 1
           [0.5, 0.5], [0.2, 0.3]]                  # 7: query without group, 8: group 2, no mate
  group = [0, 1, 0, -1, 1, 0, 1, -1, 2]
  emb = _emb(fused, [0] * 9, group)
  lists = {"fine_query": ["item0", "item1", "item7", "item8"],
           "fine_gallery": ["item2", "item3", "item4", "item5", "item6", "elsewhere"]}
  q, g, labels = evaluator.fine_query_gallery(emb, lists)
  assert q.tolist() == [0, 1] and g.tolist() == [2, 3, 4, 5, 6]
  assert labels[3] not in labels[[0, 1, 2, 4, 5, 6]]  # The distractor matches no one.
  # q_a by x: 3 (miss), 2 (hit), 4, 5 (hit), 6; |P| = 2, so K' = 1 at K=1 and 2 at K=5.
  #   AP@1 = 0; AP@5 over the top 2: one hit at rank 2 -> (1/2) / 1 = 0.5; Prec@5 = 1/2.
  # q_b by y: 4 (hit), 6 (hit), 3, 5, 2: AP@1 = 1, AP@5 = (1/1 + 2/2) / 2 = 1, Prec@5 = 1.
  results = evaluator.fine_retrieval(emb, _write_manifest(tmp_path, lists), (1, 5), seed=0)
  m = results["fine_retrieval"]
  assert m["mAP@1"] == pytest.approx(50.0)
  assert m["mAP@5"] == pytest.approx(75.0)
  assert m["Prec@5"] == pytest.approx(75.0)
  assert m["Recall@5"] == pytest.approx(100.0)
  assert m["num_queries"] == 2 and m["gallery_size"] == 5
  assert set(results["fine_retrieval_random"]) == set(m)


def test_fine_retrieval_leave_one_out_without_lists(tmp_path):
  group = [0, 0, 1, 1, 1, -1, 2]
  fused = np.eye(7)[[0, 0, 1, 1, 1, 2, 3]] + 0.01 * np.arange(7)[:, None]
  emb = _emb(fused, [0] * 7, group)
  q, g, _ = evaluator.fine_query_gallery(emb, {})
  assert q.tolist() == [0, 1, 2, 3, 4] and g.tolist() == list(range(7))  # Item 6 has no mate.
  m = evaluator.fine_retrieval(emb, _write_manifest(tmp_path), (1, 5), seed=0)["fine_retrieval"]
  assert m["mAP@1"] == pytest.approx(100.0) and m["mAP@5"] == pytest.approx(100.0)
  # Same numbers as the metric function on the groups directly.
  labels = np.array([0, 0, 1, 1, 1, -6, 2])
  ref = retrieval.retrieval_metrics(fused[:5], labels[:5], np.arange(5), fused, labels, np.arange(7), (1, 5))
  assert {k: m[k] for k in ref} == pytest.approx(ref)


def test_fine_retrieval_skipped_without_groups(tmp_path):
  emb = _emb(np.eye(4), [0, 1, 0, 1])
  assert evaluator.fine_retrieval(emb, _write_manifest(tmp_path), (1,), 0) == {}
  emb["fine_group"] = np.full(4, -1)
  assert evaluator.fine_retrieval(emb, str(tmp_path), (1,), 0) == {}


# ---------------------------------------------------------------------------
# Linear probe.

def test_macro_f1_hand_worked_equals_sklearn():
  y_true = np.array([0, 0, 1, 1, 2])
  y_pred = np.array([0, 1, 1, 1, 3])  # Class 3 is not a test label: it does not enter the mean.
  # Class 0: P 1, R 1/2 -> 2/3; class 1: P 2/3, R 1 -> 0.8; class 2: 0.
  assert probe.macro_f1(y_true, y_pred) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
  assert probe.macro_f1(y_true, y_pred) == pytest.approx(
      f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))


def test_probe_on_separable_data():
  rng = np.random.default_rng(0)
  x, y = _blobs(20, 6, 10, rng, spread=0.5)
  train, test = probe.stratified_split(np.arange(len(y)), y)
  m = probe.linear_probe(x[train], y[train], x[test], y[test], seed=0)
  assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["macro_f1"] == pytest.approx(1.0)
  assert m["num_train"] + m["num_test"] == len(y) and m["unseen_test"] == 0 and m["converged"] == 1.0
  chance = probe.linear_probe(rng.standard_normal((len(train), 10)), y[train],
                              rng.standard_normal((len(test), 10)), y[test], seed=0)
  assert chance["top1"] < 0.5


def test_probe_counts_unseen_test_classes_as_errors():
  x = np.array([[0.0], [0.1], [5.0], [5.1], [9.0]])
  m = probe.linear_probe(x[:4], np.array([0, 0, 1, 1]), x[[0, 2, 4]], np.array([0, 1, 7]), seed=0)
  assert m["unseen_test"] == 1 and m["top1"] == pytest.approx(2 / 3) and m["top5"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    probe.linear_probe(x[:2], np.array([0, 0]), x[2:], np.array([0, 0, 0]))


def test_stratified_split_is_deterministic_and_covers_every_test_class():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 8, 50)
  labels[0] = 99  # A class with a single item: train only.
  index = rng.permutation(1000)[:50]
  train, test = probe.stratified_split(index, labels)
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(50))
  assert set(labels[test]) <= set(labels[train]) and 99 not in labels[test]
  assert 0.2 < len(test) / 50 < 0.4
  again = probe.stratified_split(index[::-1], labels[::-1])  # Same items, other order.
  assert sorted(index[::-1][again[1]].tolist()) == sorted(index[test].tolist())


# ---------------------------------------------------------------------------
# The whole evaluator on a small split (~50 items, 8 categories), as the tests' datasets.

TASKS = ("coarse_retrieval", "coarse_retrieval_contrastive", "coarse_retrieval_random",
         "fine_retrieval", "fine_retrieval_random", "clustering", "clustering_random",
         "linear_probe", "linear_probe_random")


def _small_split(n=50, seed=0):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 8, n)
  label[:3] = -1
  group = np.full(n, -1)
  group[3:23] = np.arange(20) // 2
  fused = 3 * rng.standard_normal((8, 16))[np.maximum(label, 0)] + rng.standard_normal((n, 16))
  return _emb(fused, label, group, seed)


def _check_all_tasks(results):
  assert set(results) == set(TASKS)
  for task, metrics in results.items():
    for name, value in metrics.items():
      assert type(value) in (float, np.float64) and math.isfinite(value), (task, name, value)
  assert {"nmi", "nmi_std", "purity", "purity_std", "ari", "ari_std"} <= set(results["clustering"])
  assert {"top1", "top5", "macro_f1"} <= set(results["linear_probe"])
  assert {"mAP@1", "mAP@5", "Prec@5", "Recall@5"} <= set(results["fine_retrieval"])


def test_evaluate_embeddings_without_id_lists(tmp_path):
  emb = _small_split()
  results = evaluator.evaluate_embeddings(emb, _write_manifest(tmp_path), (1, 5, 10), seed=0)
  _check_all_tasks(results)
  # Separated categories: far above the floors.
  assert results["clustering"]["nmi"] > results["clustering_random"]["nmi"] + 20
  assert results["linear_probe"]["top1"] > results["linear_probe_random"]["top1"] + 30
  json.dumps(results)


def test_evaluate_embeddings_with_id_lists(tmp_path):
  emb = _small_split()
  ids = [f"item{i}" for i in range(50)]
  lists = {"coarse_query": ids[:12], "coarse_gallery": ids[12:], "fine_query": ids[3:23:2],
           "fine_gallery": ids[4:23:2] + ids[23:], "cls_train": [f"train{i}" for i in range(10)],
           "cls_test": ids}
  results = evaluator.evaluate_embeddings(emb, _write_manifest(tmp_path, lists), (1, 5, 10), seed=0)
  _check_all_tasks(results)
  assert results["fine_retrieval"]["num_queries"] == 10
  assert results["fine_retrieval"]["gallery_size"] == 37
  # cls_train ids live in another split: with its embeddings the probe trains on them.
  other = _small_split(n=40, seed=1)
  other["item_id"] = np.array([f"train{i}".encode() for i in range(40)])
  lists["cls_train"] = [f"train{i}" for i in range(40)]
  with_train = evaluator.evaluate_embeddings(emb, _write_manifest(tmp_path, lists), (1,), seed=0,
                                             train_emb=other)
  assert with_train["linear_probe"]["num_train"] == float((other["label"] >= 0).sum())
  assert with_train["linear_probe"]["num_test"] == 47


def test_evaluate_embeddings_degrades_on_degenerate_splits(tmp_path):
  data_dir = _write_manifest(tmp_path)
  emb = _small_split()
  emb.pop("fine_group")
  emb["label"] = np.where(emb["label"] >= 0, 0, -1)  # One category: no clustering, no probe.
  results = evaluator.evaluate_embeddings(emb, data_dir, (1, 5), seed=0)
  assert set(results) == {"coarse_retrieval", "coarse_retrieval_contrastive", "coarse_retrieval_random"}
  tiny = _emb(np.eye(3), [0, 1, 2], [0, 0, -1])  # Three items, three categories, one of each.
  results = evaluator.evaluate_embeddings(tiny, data_dir, (1, 5), seed=0)
  assert "clustering" in results and "fine_retrieval" in results
  assert "linear_probe" not in results  # No class has 2 items: nothing to test on.
