"""W/report.md (m5p/evaluation/report.py): tables beside their floors, retrieval
examples from the converted records, the embedding map, the modality weights,
and a line (never a crash) for every missing input.

No training here: the embeddings are made up from the tiny dataset's labels
(the report only reads fused, label, index, item_id, present). The report of
a trained run is checked in test_export.py (python -m m5p.evaluate).
"""
import json
import os
import re

import numpy as np

from m5p.data import convert
from m5p.evaluation import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "coarse_retrieval": {"mAP@1": 50.0, "mAP@10": 40.0, "Prec@1": 50.0, "Recall@1": 50.0,
                         "num_queries": 8.0, "gallery_size": 25.0},
    "coarse_retrieval_random": {"mAP@1": 12.5, "mAP@10": 9.0, "Prec@1": 12.5, "Recall@1": 12.5,
                                "num_queries": 8.0, "gallery_size": 25.0},
    "coarse_retrieval_contrastive": {"mAP@1": 62.5, "num_queries": 8.0},
    "clustering": {"nmi": 70.0, "nmi_std": 1.5, "purity": 60.0, "purity_std": 2.0, "k": 8.0},
    "clustering_random": {"nmi": 30.0, "nmi_std": 0.5, "purity": 20.0, "purity_std": 1.0, "k": 8.0},
    "classification": {"top1": 90.0, "top5": 99.5, "num_test": 33.0},
    "classification_random": {"top1": 10.0, "top5": 40.0, "num_test": 33.0},
    "classification_majority": {"top1": 30.0, "top5": 60.0, "num_test": 33.0},
    "linear_probe": {"top1": 80.0, "top5": 99.0, "macro_f1": 70.0, "num_train": 100.0},
    "linear_probe_random": {"top1": 10.0, "top5": 40.0, "macro_f1": 5.0, "num_train": 100.0},
    "any_modality_query": {"text@1": 40.0, "image+audio@1": 30.0, "all_present@1": 50.0},
    "any_modality_gallery": {"text@1": 35.0, "all_present@1": 50.0},
    "meta": {"step": 7.0},
}


def _embeddings(data_dir: str, split: str = "test") -> dict:
  """Fused features that cluster by category (label one-hot + noise), from the split's records."""
  source = convert.open_split(data_dir, split)
  records = [source[i] for i in range(len(source))]
  labels = np.array([r["label"] for r in records])
  rng = np.random.default_rng(0)
  fused = np.eye(16)[np.maximum(labels, 0) % 16] * 3 + 0.3 * rng.standard_normal((len(labels), 16))
  present = np.array([[bool(r["title"]), len(r["table_keys"]) > 0, len(r["image"]) > 0,
                       len(r["video"]) > 0, r["audio"].shape[0] > 0] for r in records])
  return {"fused": fused.astype(np.float32), "label": labels, "index": np.arange(len(labels)),
          "item_id": np.array([r["item_id"] for r in records], object), "present": present,
          "titles": [r["title"].decode() for r in records]}


def _metrics_jsonl(path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for step in (1, 2, 3, 2):  # A resumed run repeats step 2: the last row wins.
      row = {"step": step, "loss": 1.0, "w/text-image": 0.1 * step, "w/text": 0.9 / step}
      f.write(json.dumps(row) + "\n")
    f.write('{"step": 4, "w/te')  # A line cut by a preemption.


def test_report_has_every_section_with_its_plots(tiny_dataset, tmp_path):
  workdir = str(tmp_path)
  emb = _embeddings(tiny_dataset)
  _metrics_jsonl(os.path.join(workdir, "metrics.jsonl"))
  path = report.write_report(workdir, tiny_dataset, RESULTS, emb=emb, split="test", num_queries=2,
                             k=5)
  assert path == os.path.join(workdir, "report.md")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  # (a) Every task with each metric beside its floor (the contrastive variant shares coarse's).
  for heading in ("### coarse_retrieval", "### coarse_retrieval_contrastive", "### classification",
                  "### linear_probe", "### clustering", "## Any-modality retrieval"):
    assert heading in text, heading
  assert "### classification_majority" not in text and "### coarse_retrieval_random" not in text
  assert "| top1 | 90.00 | 10.00 | 30.00 |" in text  # Both of classification's floors.
  assert "| mAP@1 | 50.00 | 12.50 |" in text
  assert "| mAP@1 | 62.50 | 12.50 |" in text
  assert "| nmi | 70.00 ± 1.50 | 30.00 ± 0.50 |" in text
  assert "| top1 | 80.00 | 10.00 |" in text
  assert "(num_queries 8, gallery_size 25)" in text
  assert "| image+audio | 30.00 | - |" in text and "checkpoint step 7" in text
  # (b) Two queries, five neighbours each, with the records' titles.
  assert text.count("**Query ") == 2
  rows = re.findall(r"^\| (\d) \| (\S+) \| (-?\d+) \| ([✓✗]) \|", text, re.M)
  assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5] * 2
  title_of = dict(zip((i.decode() for i in emb["item_id"]), emb["titles"]))
  for _, item, _, _ in rows:
    assert " ".join(title_of[item].split())[:40] in text
  assert sum(r[3] == "✓" for r in rows) >= 6  # The made-up features cluster by category.
  # (c), (d) and the PNGs each section links to.
  assert "## Embedding map" in text and "## Learned modality weights" in text
  assert "| text-image | 0.100 | 0.300 |" in text and "| text | 0.900 | 0.300 |" in text
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert {"report/retrieval_examples.png", "report/embedding_map.png",
          "report/modality_weights.png"} <= set(links)
  for link in links:
    if link.startswith("report/"):
      with open(os.path.join(workdir, link), "rb") as f:
        assert f.read(8) == PNG_MAGIC, link


def test_report_without_inputs_says_what_is_missing(tmp_path):
  workdir = str(tmp_path / "bare")
  os.makedirs(workdir)
  path = report.write_report(workdir)  # No eval.json, embeddings, dataset or metrics.
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert "No " + os.path.join(workdir, "eval.json") in text
  assert "No task results" in text
  assert "No embeddings given: no retrieval examples." in text
  assert "No embeddings given: no map." in text
  assert "metrics.jsonl: no training metrics to plot." in text
  assert os.listdir(os.path.join(workdir, "report")) == []


def test_report_with_embeddings_but_no_dataset(tmp_path):
  """Examples are still listed (ids, categories, scores), with a line saying why no images."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 5)
  emb = {"fused": rng.standard_normal((20, 8)).astype(np.float32), "label": labels,
         "index": np.arange(20), "item_id": np.array([f"id{i}" for i in range(20)]),
         "present": np.ones((20, 5), bool)}
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # Uniform harmonization: no weights.
  text = open(report.write_report(str(tmp_path), str(tmp_path / "nowhere"), {}, emb=emb, split="test",
                                  tsne=False), encoding="utf-8").read()
  assert "No images or titles: cannot read split 'test'" in text
  assert text.count("**Query ") == 3 and "(title not read)" in text
  assert "report/embedding_map.png" in text
  assert "logs no harmonized weights" in text
  assert sorted(os.listdir(tmp_path / "report")) == ["embedding_map.png"]


def test_nearest_leaves_the_query_out_and_ranks_by_dot_product():
  fused = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [2.0, 0.0]], np.float32)
  emb = {"fused": fused, "index": np.array([10, 11, 12, 13])}
  rows, scores = report.nearest(emb, 0, np.arange(4), k=5)
  assert rows.tolist() == [3, 1, 2]
  np.testing.assert_allclose(scores, [2.0, 0.9, 0.0])
  assert report.floor_of(RESULTS, "coarse_retrieval_contrastive") is RESULTS["coarse_retrieval_random"]
