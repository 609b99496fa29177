"""Linear probe: category classification from frozen features (SCALE.md section 6, task 3).

The authors fine-tune an MLP head with the model; a linear probe on frozen
features is the cheap, deterministic check that pretraining put category
information where a linear classifier can read it. Multinomial logistic
regression on standardised features (scikit-learn, lbfgs).
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler


def _hash(index: np.ndarray) -> np.ndarray:
  """A fixed integer hash of record indices: a split that does not depend on record order."""
  x = np.asarray(index).astype(np.uint64)
  x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
  return x ^ (x >> np.uint64(31))


def stratified_split(index: np.ndarray, labels: np.ndarray,
                     test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, test rows): per class, the items with the smallest index hash go to test.

  Deterministic; a class with n >= 2 items puts round(test_fraction * n)
  items (at least 1, at most n - 1) in test, so every test class is also
  trained on; a class with one item is train only.
  """
  labels = np.asarray(labels)
  h = _hash(index)
  train, test = [], []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    rows = rows[np.argsort(h[rows], kind="stable")]
    n_test = 0 if len(rows) < 2 else min(max(1, int(np.floor(test_fraction * len(rows) + 0.5))),
                                         len(rows) - 1)
    test.append(rows[:n_test])
    train.append(rows[n_test:])
  return np.sort(np.concatenate(train)).astype(int), np.sort(np.concatenate(test)).astype(int)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """F1 averaged over the classes present in y_true (a class never predicted scores 0)."""
  return float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def top_k_accuracy(scores: np.ndarray, classes: np.ndarray, y_true: np.ndarray, k: int) -> float:
  """Fraction of rows whose true class is among the k highest scores (a class the
  classifier never saw is a miss). With at most k classes, every seen class hits."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float((classes[top] == np.asarray(y_true)[:, None]).any(1).mean())


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 seed: int = 0, c: float = 1.0, max_iter: int = 1000) -> dict[str, float]:
  """Fits on (x_train, y_train), scores on x_test. Fractions: top1, top5, macro_f1.

  Also returns num_train, num_test, num_classes (trained on), unseen_test (test
  items whose class was never trained on: counted as errors) and converged
  (1 when lbfgs stopped before max_iter). Raises ValueError with < 2 classes.
  """
  y_train, y_test = np.asarray(y_train), np.asarray(y_test)
  classes = np.unique(y_train)
  if len(classes) < 2:
    raise ValueError(f"a probe needs at least 2 training classes, got {len(classes)}")
  if len(y_test) == 0:
    raise ValueError("a probe needs at least one test item")
  scaler = StandardScaler().fit(np.asarray(x_train, np.float64))
  clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # Reported as `converged` instead.
    clf.fit(scaler.transform(np.asarray(x_train, np.float64)), y_train)
  scores = clf.decision_function(scaler.transform(np.asarray(x_test, np.float64)))
  if scores.ndim == 1:  # Binary: one margin for classes_[1].
    scores = np.stack([-scores, scores], 1)
  pred = clf.classes_[np.argmax(scores, 1)]
  return {
      "top1": top_k_accuracy(scores, clf.classes_, y_test, 1),
      "top5": top_k_accuracy(scores, clf.classes_, y_test, 5),
      "macro_f1": macro_f1(y_test, pred),
      "num_train": float(len(y_train)),
      "num_test": float(len(y_test)),
      "num_classes": float(len(classes)),
      "unseen_test": float((~np.isin(y_test, classes)).sum()),
      "converged": float(np.max(clf.n_iter_) < max_iter),
  }
