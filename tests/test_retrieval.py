"""The retrieval metrics against a direct transcription of the authors' loop."""
import numpy as np
import pytest

from m5p.evaluation import retrieval


def authors_reference(q_emb, q_lab, q_key, g_emb, g_lab, g_key, k):
  """Per query, plain Python, as SCALE.md section 6 states the authors' code."""
  aps, precs = [], []
  for qe, ql, qk in zip(q_emb, q_lab, q_key):
    scores = g_emb @ qe
    order = [i for i in np.argsort(-scores, kind="stable") if g_key[i] != qk]
    relevant = int((g_lab == ql).sum())  # Includes the query itself when it is in the gallery.
    k_eff = min(k, relevant, len(order))
    hits, total = 0, 0.0
    for r, i in enumerate(order[:k_eff], start=1):
      if g_lab[i] == ql:
        hits += 1
        total += hits / r
    aps.append(total / hits if hits else 0.0)
    precs.append(hits / k_eff if k_eff else 0.0)
  return 100 * np.mean(aps), 100 * np.mean(precs)


def test_hand_worked_example():
  # 1-D embeddings; query 0 (label A) ranks items 3 (A), 1 (B), 2 (A).
  emb = np.array([[0.0], [2.0], [1.0], [3.0]], np.float32)
  q = np.array([[1.0]], np.float32)
  g_lab = np.array([0, 1, 0, 0])
  keys = np.arange(4)
  m = retrieval.retrieval_metrics(q, np.array([0]), np.array([0]), emb, g_lab, keys, ks=(1, 2, 3))
  # Ranked list without the query: 3 (hit), 1 (miss), 2 (hit); |P| = 3 (includes the query).
  assert m["mAP@1"] == pytest.approx(100.0)
  assert m["Prec@2"] == pytest.approx(50.0)
  assert m["mAP@3"] == pytest.approx(100 * (1 / 1 + 2 / 3) / 2)
  assert m["Prec@3"] == pytest.approx(100 * 2 / 3)
  assert m["Recall@1"] == pytest.approx(100.0)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_matches_reference_on_random_data(k):
  rng = np.random.default_rng(k)
  n = 200
  emb = rng.standard_normal((n, 8)).astype(np.float32)
  labels = rng.zipf(1.6, n) % 17
  keys = np.arange(n)
  q = rng.choice(n, 60, replace=False)
  got = retrieval.retrieval_metrics(emb[q], labels[q], keys[q], emb, labels, keys, ks=(k,), chunk=16)
  ap, prec = authors_reference(emb[q], labels[q], keys[q], emb, labels, keys, k)
  assert got[f"mAP@{k}"] == pytest.approx(ap, abs=1e-9)
  assert got[f"Prec@{k}"] == pytest.approx(prec, abs=1e-9)


def test_random_embeddings_are_near_chance_and_perfect_ones_score_100():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 500)
  keys = np.arange(500)
  random = rng.standard_normal((500, 32)).astype(np.float32)
  perfect = np.eye(10, dtype=np.float32)[labels]
  chance = retrieval.retrieval_metrics(random, labels, keys, random, labels, keys, ks=(1,))
  best = retrieval.retrieval_metrics(perfect, labels, keys, perfect, labels, keys, ks=(1,))
  assert 4 < chance["mAP@1"] < 18
  assert best["mAP@1"] == pytest.approx(100.0)
