"""W/report.md: a run's evaluation for a reader, with its plots in W/report/.

eval.json is for machines; a person judging a run needs each number beside
its random-embedding floor, and to *see* what the model does: what retrieval
returns for a few products (images and titles), whether categories separate
in the embedding space, and how the self-harmonized weights moved during
training. `write_report` writes all of that from the eval results, the
split's embeddings (embed.embed_split's output, or an export's npz), the
converted records (images and titles) and W/metrics.jsonl. Any of those may
be missing: the report then says so in a line instead of failing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from typing import Any

import numpy as np

from m5p.modalities import MODALITIES

log = logging.getLogger("m5p")

REPORT_FILE = "report.md"
REPORT_DIR = "report"
# Sections first in this order, then any other task eval.json has.
SECTION_ORDER = ("coarse_retrieval", "coarse_retrieval_contrastive", "fine_retrieval",
                 "classification", "linear_probe", "clustering")
# Plain counts (shown after the table), not rates.
COUNTS = ("num_queries", "gallery_size", "num_items", "k", "seeds", "num_train", "num_test",
          "num_classes", "converged", "unseen_test")
# Floors a task may have beside it in eval.json (`<task>_<name>`), as report columns.
BASELINES = (("random", "random floor"), ("majority", "majority-class floor"))
_METRIC_ORDER = ("mAP", "Prec", "Recall", "top1", "top5", "macro_f1", "nmi", "purity", "ari")
_NOTES = {
    "coarse_retrieval": "relevant = same category; fused feature, dot product, query removed from "
                        "its own list (the authors' protocol)",
    "coarse_retrieval_contrastive": "the same with the sum of the L2-normalised contrastive "
                                    "embeddings z_m as the feature",
    "fine_retrieval": "relevant = same fine-grained (instance) group",
    "classification": "the authors' head fine-tuned on cls_train, tested on cls_test",
    "linear_probe": "logistic regression on frozen fused features",
    "clustering": "k-means with k = categories, mean ± std over seeds",
}


# ---------------------------------------------------------------------------
# Small helpers.


def _id(value: Any) -> str:
  """Item ids are bytes in embed_split's output and unicode in an export's npz."""
  return value.decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _text(value: Any) -> str:
  return _id(value).strip()


def _md(text: str, limit: int = 80) -> str:
  """One markdown table cell: no pipes or newlines, at most `limit` characters."""
  text = " ".join(text.replace("|", "/").split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


def _fmt(value: float) -> str:
  return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _metric_key(name: str) -> tuple:
  base, _, k = name.partition("@")
  rank = _METRIC_ORDER.index(base) if base in _METRIC_ORDER else len(_METRIC_ORDER)
  return (rank, base, int(k) if k.isdigit() else 0)


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _category_colors(n: int) -> list:
  """n distinguishable colours (tab20, tab20b, tab20c: 60, then they repeat)."""
  plt = _pyplot()
  base = [plt.get_cmap(name)(i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
  return [base[i % len(base)] for i in range(n)]


# ---------------------------------------------------------------------------
# (a) Metric tables.


def floor_of(results: dict, task: str, name: str = "random") -> dict:
  """The task's `<task>_<name>` floor (variants such as `coarse_retrieval_contrastive`
  share their base task's)."""
  base = task.removesuffix("_contrastive")
  return results.get(f"{task}_{name}") or results.get(f"{base}_{name}") or {}


def _cell(metrics: dict, m: str) -> str:
  if m not in metrics:
    return "-"
  std = f" ± {_fmt(metrics[f'{m}_std'])}" if f"{m}_std" in metrics else ""
  return _fmt(metrics[m]) + std


def task_table(results: dict, task: str) -> list[str]:
  """One markdown table: metric | value | its floors; counts in a line under it."""
  metrics = results[task]
  floors = [(title, floor_of(results, task, name)) for name, title in BASELINES]
  floors = [(title, f) for title, f in floors if f or title == BASELINES[0][1]]
  rates = sorted((m for m in metrics if m not in COUNTS and not m.endswith("_std")), key=_metric_key)
  lines = ["| metric | value | " + " | ".join(t for t, _ in floors) + " |",
           "|---|---:|" + "---:|" * len(floors)]
  for m in rates:
    lines.append(f"| {m} | {_cell(metrics, m)} | " + " | ".join(_cell(f, m) for _, f in floors) + " |")
  counts = [f"{m} {metrics[m]:g}" for m in COUNTS if m in metrics]
  if counts:
    lines += ["", "(" + ", ".join(counts) + ")"]
  return lines


def tasks_in(results: dict) -> list[str]:
  """The task sections of eval.json, in report order (floors, meta and any-modality apart)."""
  floors = tuple(f"_{name}" for name, _ in BASELINES)
  tasks = [t for t in results if isinstance(results[t], dict) and t != "meta"
           and not t.endswith(floors) and not t.startswith("any_modality")]
  return [t for t in SECTION_ORDER if t in tasks] + sorted(t for t in tasks if t not in SECTION_ORDER)


def metrics_section(results: dict) -> list[str]:
  lines = ["## Metrics", "",
           "Rates x100; each beside the same protocol on standard-normal features of the same "
           "shape (the random floor).", ""]
  tasks = tasks_in(results)
  if not tasks:
    return lines + ["No task results (eval.json is missing or empty).", ""]
  for task in tasks:
    note = _NOTES.get(task)
    lines += [f"### {task}", ""] + ([note + ".", ""] if note else []) + task_table(results, task) + [""]
  return lines


def any_modality_section(results: dict, workdir: str) -> list[str]:
  """Each modality subset as the query (vs full products) and as the gallery (vs full queries)."""
  query, gallery = results.get("any_modality_query"), results.get("any_modality_gallery")
  lines = ["## Any-modality retrieval", ""]
  if not query and not gallery:
    return lines + ["Not evaluated for this report (`python -m m5p.evaluate --any_modality` "
                    "computes it).", ""]
  query, gallery = query or {}, gallery or {}
  floor = floor_of(results, "coarse_retrieval")
  names = list(dict.fromkeys(list(query) + list(gallery)))
  names.sort(key=lambda n: (n.startswith("all_present"), n.count("+"), n))
  k = names[0].rpartition("@")[2] if names else "1"
  base = f" The random floor of coarse mAP@{k} is {_fmt(floor[f'mAP@{k}'])}." if f"mAP@{k}" in floor else ""
  lines += [f"Coarse mAP@{k} with queries (or gallery) reduced to a subset of their modalities; "
            f"`all_present` is the products as they are.{base}", "",
            f"| modalities | query subset vs full products | full products vs gallery subset |",
            "|---|---:|---:|"]
  for n in names:
    lines.append(f"| {n.rpartition('@')[0]} | {_fmt(query.get(n))} | {_fmt(gallery.get(n))} |")
  lines.append("")
  if os.path.exists(os.path.join(workdir, "any_modality.png")):
    lines += ["The whole 32 x 32 matrix (any_modality.json, any_modality.md):", "",
              "![any-modality matrix](any_modality.png)", ""]
  return lines


# ---------------------------------------------------------------------------
# Records (images, titles) of the converted split.


def _open_records(data_dir: str | None, split: str | None) -> tuple[Any, str]:
  """(the split's random-access records or None, why not)."""
  if not data_dir or not split:
    return None, "no dataset directory or split given"
  try:
    from m5p.data import convert  # pylint: disable=import-outside-toplevel
    return convert.open_split(data_dir, split), ""
  except Exception as e:  # pylint: disable=broad-except  (a report never fails on its inputs)
    return None, f"cannot read split {split!r} of {data_dir}: {e}"


def _record(source: Any, index: int) -> dict:
  try:
    return source[int(index)] if source is not None and index >= 0 else {}
  except Exception:  # pylint: disable=broad-except
    return {}


def _image(record: dict) -> np.ndarray | None:
  """The product's image, else its first video frame, else None."""
  for key in ("image", "video"):
    frames = record.get(key)
    if frames is not None and len(frames):
      return np.asarray(frames[0])
  return None


def _cjk_font() -> str | None:
  """A font family with CJK glyphs (titles are often Chinese), or None."""
  from matplotlib import font_manager, ft2font  # pylint: disable=import-outside-toplevel
  for f in font_manager.fontManager.ttflist:
    if any(w in f.name for w in ("CJK", "Han", "Hei", "Song", "Ming", "Kai")):
      try:
        if all(ft2font.FT2Font(f.fname).get_char_index(ord(c)) for c in "中文品牌"):
          return f.name
      except Exception:  # pylint: disable=broad-except  (an unreadable font file)
        continue
  return None


# ---------------------------------------------------------------------------
# (b) Retrieval examples.


def _queries_and_gallery(emb: dict, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """The coarse-retrieval rows the evaluation used (its id lists), else every labelled row."""
  if data_dir:
    try:
      from m5p.evaluation import evaluator  # pylint: disable=import-outside-toplevel
      return evaluator.coarse_query_gallery(emb, data_dir)
    except Exception:  # pylint: disable=broad-except  (no manifest: leave-one-out below)
      pass
  labelled = np.flatnonzero(np.asarray(emb["label"]) >= 0)
  return labelled, labelled


def nearest(emb: dict, query_row: int, gallery_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows, scores) of the top `k` gallery items for one query: fused features ranked
  by dot product, the query itself removed (the coarse-retrieval protocol)."""
  fused = np.asarray(emb["fused"], np.float32)
  gallery_rows = gallery_rows[np.asarray(emb["index"])[gallery_rows] != emb["index"][query_row]]
  scores = fused[gallery_rows] @ fused[query_row]
  order = np.argsort(-scores, kind="stable")[:k]
  return gallery_rows[order], scores[order]


def retrieval_examples_section(emb: dict | None, data_dir: str | None, split: str | None,
                               out_dir: str, *, num_queries: int = 3, k: int = 5,
                               seed: int = 0) -> list[str]:
  lines = ["## Retrieval examples", ""]
  if emb is None:
    return lines + ["No embeddings given: no retrieval examples.", ""]
  queries, gallery = _queries_and_gallery(emb, data_dir)
  if not len(queries) or len(gallery) < 2:
    return lines + ["No labelled queries and gallery: no retrieval examples.", ""]
  source, why = _open_records(data_dir, split)
  present = np.asarray(emb["present"], bool)
  # A seeded choice, products with an image first (they make the picture).
  order = np.random.default_rng(seed).permutation(queries)
  order = order[np.argsort(~present[order, MODALITIES.index("image")], kind="stable")]
  chosen = order[:num_queries]
  labels = np.asarray(emb["label"])
  lines += [f"{len(chosen)} coarse-retrieval queries (seed {seed}) and their top {k} of "
            f"{len(gallery)} gallery products by fused-feature dot product; ✓ = same category.", ""]
  if source is None:
    lines += [f"No images or titles: {why}.", ""]
  examples = []
  for q in chosen:
    rows, scores = nearest(emb, int(q), gallery, k)
    examples.append((int(q), rows, scores))
    rec = _record(source, emb["index"][q])
    title = _text(rec.get("title", b"")) if rec else ""
    lines += [f"**Query {_id(emb['item_id'][q])}** (category {labels[q]}): "
              f"{_md(title, 120) if title else '(no title)' if rec else '(title not read)'}", "",
              "| rank | item | category | same | score | title |", "|---:|---|---:|:-:|---:|---|"]
    for r, (row, s) in enumerate(zip(rows, scores), 1):
      rec = _record(source, emb["index"][row])
      title = _md(_text(rec.get("title", b""))) if rec else ""
      lines.append(f"| {r} | {_id(emb['item_id'][row])} | {labels[row]} | "
                   f"{'✓' if labels[row] == labels[q] else '✗'} | {s:.3f} | {title} |")
    lines.append("")
  if source is not None:
    try:
      path = _plot_examples(examples, emb, source, os.path.join(out_dir, "retrieval_examples.png"), k)
      lines += [f"![retrieval examples]({REPORT_DIR}/{os.path.basename(path)})", ""]
    except Exception as e:  # pylint: disable=broad-except
      lines += [f"(retrieval examples plot failed: {e})", ""]
  return lines


def _plot_examples(examples: list, emb: dict, source: Any, path: str, k: int) -> str:
  plt = _pyplot()
  font = _cjk_font()
  labels = np.asarray(emb["label"])
  fig, axes = plt.subplots(len(examples), k + 1, figsize=(1.9 * (k + 1), 2.3 * len(examples)),
                           squeeze=False)
  rc = {"font.family": ["DejaVu Sans", font] if font else ["DejaVu Sans"], "font.size": 7}
  with plt.rc_context(rc), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Missing glyphs warn once per character.
    for row, (q, rows, scores) in enumerate(examples):
      cells = [(q, None)] + list(zip(rows, scores))
      for col, (item, score) in enumerate(cells):
        ax = axes[row, col]
        rec = _record(source, emb["index"][item])
        image = _image(rec)
        if image is None:
          ax.imshow(np.full((8, 8, 3), 200, np.uint8))
          ax.text(3.5, 3.5, "no image", ha="center", va="center", fontsize=7)
        else:
          ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        title = _text(rec.get("title", b"")) if rec else ""
        if not font and not title.isascii():  # No glyphs for it: the table in report.md has it.
          title = re.sub(r"[^\x00-\x7f]+", " ", title)
        title = " ".join(title.split())[:22]
        if score is None:
          head, color = f"query · cat {labels[item]}", "black"
        else:
          hit = labels[item] == labels[q]
          head, color = f"#{col} {score:.2f} · cat {labels[item]}", "green" if hit else "red"
        ax.set_title(f"{head}\n{title}", fontsize=7, color=color)
        for spine in ax.spines.values():
          spine.set_edgecolor(color)
          spine.set_linewidth(1 if score is None else 2.5)
    fig.suptitle("query (left) and its top gallery products: green = same category", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# (c) 2-D map of the embeddings.


def pca_2d(x: np.ndarray) -> np.ndarray:
  """The first two principal components (SVD of the centred features)."""
  x = x - x.mean(0, keepdims=True)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  out = u[:, :2] * s[:2]
  return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def embedding_map_section(emb: dict | None, out_dir: str, *, max_points: int = 500,
                          tsne: bool = True, seed: int = 0) -> list[str]:
  lines = ["## Embedding map", ""]
  if emb is None:
    return lines + ["No embeddings given: no map.", ""]
  rows = np.flatnonzero(np.asarray(emb["label"]) >= 0)
  if len(rows) < 3:
    return lines + [f"Too few labelled products ({len(rows)}) for a map.", ""]
  total = len(rows)
  if len(rows) > max_points:
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
  x = np.asarray(emb["fused"], np.float64)[rows]
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # As clustering sees them.
  labels = np.asarray(emb["label"])[rows]
  maps = [("PCA", pca_2d(x))]
  if tsne and len(rows) > 5:
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
    from threadpoolctl import threadpool_limits  # pylint: disable=import-outside-toplevel
    perplexity = float(min(30.0, (len(rows) - 1) / 3))
    # One thread: on a busy machine OpenMP threads spinning against each other made
    # 250 points take a minute instead of 3 s.
    with threadpool_limits(limits=1):
      xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    maps.append((f"t-SNE (perplexity {perplexity:.0f})", xy))
  plt = _pyplot()
  cats = np.unique(labels)
  colors = _category_colors(len(cats))
  fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5.5), squeeze=False)
  for ax, (name, xy) in zip(axes[0], maps):
    for c, color in zip(cats, colors):
      sel = labels == c
      ax.scatter(xy[sel, 0], xy[sel, 1], s=12, color=color, label=str(c), alpha=0.85, linewidths=0)
    ax.set_title(f"{name} of the L2-normalised fused embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
  if len(cats) <= 20:
    axes[0, -1].legend(title="category", fontsize=7, markerscale=1.5, loc="best")
  fig.tight_layout()
  path = os.path.join(out_dir, "embedding_map.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  sampled = f" (a seeded sample of {total})" if total > len(rows) else ""
  return lines + [f"{len(rows)} labelled products{sampled}, {len(cats)} categories, one colour "
                  "per category.", "", f"![embedding map]({REPORT_DIR}/embedding_map.png)", ""]


# ---------------------------------------------------------------------------
# (d) Learned modality weights.


def read_metrics(path: str) -> list[dict]:
  """metrics.jsonl rows by step; a resumed run's repeated steps keep their last row."""
  by_step: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut by a preemption.
        continue
      if "step" in row:
        by_step[int(row["step"])] = row
  return [by_step[s] for s in sorted(by_step)]


def modality_weights_section(workdir: str, out_dir: str) -> list[str]:
  lines = ["## Learned modality weights", ""]
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return lines + [f"No {path}: no training metrics to plot.", ""]
  rows = read_metrics(path)
  keys = sorted({k for r in rows for k in r if k.startswith("w/")})
  if not rows or not keys:
    return lines + ["metrics.jsonl logs no harmonized weights (`w/...`) "
                    "(e.g. loss.harmonization='uniform').", ""]
  pairs = [k for k in keys if "-" in k]
  single = [k for k in keys if "-" not in k]
  steps = np.array([r["step"] for r in rows])

  def series(key: str) -> np.ndarray:
    return np.array([float(r.get(key, "nan")) for r in rows])

  plt = _pyplot()
  panels = [(p, t) for p, t in ((pairs, "modality pairs (batch mean of the harmonized weight)"),
                                (single, "masked-modelling weight per modality (G_b[m, m])")) if p]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
  colors = _category_colors(max(len(p) for p, _ in panels))
  for ax, (names, title) in zip(axes[0], panels):
    for name, color in zip(names, colors):
      ax.plot(steps, series(name), label=name[2:], color=color, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  png = os.path.join(out_dir, "modality_weights.png")
  fig.savefig(png, dpi=100)
  plt.close(fig)
  last = rows[-1]
  lines += [f"From {len(rows)} logged steps ({int(steps[0])}..{int(steps[-1])}) of metrics.jsonl.",
            "", f"![modality weights]({REPORT_DIR}/modality_weights.png)", "",
            f"| weight | first (step {int(steps[0])}) | last (step {int(steps[-1])}) |",
            "|---|---:|---:|"]
  def by_last(name: str) -> float:
    value = float(last.get(name, "nan"))
    return -value if math.isfinite(value) else math.inf

  for name in sorted(single, key=by_last) + sorted(pairs, key=by_last):
    lines.append(f"| {name[2:]} | {float(rows[0].get(name, 'nan')):.3f} | "
                 f"{float(last.get(name, 'nan')):.3f} |")
  return lines + [""]


# ---------------------------------------------------------------------------
# The report.


def write_report(workdir: str, data_dir: str | None = None, results: dict | None = None, *,
                 emb: dict | None = None, split: str | None = None, num_queries: int = 3,
                 k: int = 5, seed: int = 0, max_points: int = 500, tsne: bool = True) -> str:
  """Writes workdir/report.md (and its PNGs in workdir/report/); returns its path.

  `results`: eval.json's content (default: read workdir/eval.json).
  `emb`: the evaluated split's embeddings (fields fused, label, index,
  item_id, present: embed_split's output or an export's npz); without it
  there are no retrieval examples and no map. The map shows at most
  `max_points` products (a seeded sample), with t-SNE beside PCA unless
  `tsne` is False (about 3 s for 250 points on one core). `data_dir`/`split`: the
  converted records the examples' images and titles come from.
  """
  out_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  eval_path = os.path.join(workdir, "eval.json")
  note = ""
  if results is None:
    if os.path.exists(eval_path):
      with open(eval_path, encoding="utf-8") as f:
        results = json.load(f)
    else:
      results, note = {}, f"No {eval_path}: run `python -m m5p.evaluate --workdir={workdir}`."
  step = results.get("meta", {}).get("step")
  lines = ["# Evaluation report", "",
           f"Run `{os.path.abspath(workdir)}`"
           + (f", checkpoint step {int(step)}" if step is not None else "")
           + (f", split `{split}`" if split else "") + ". Numbers from eval.json.", ""]
  if note:
    lines += [note, ""]
  sections = [
      lambda: metrics_section(results),
      lambda: any_modality_section(results, workdir),
      lambda: retrieval_examples_section(emb, data_dir, split, out_dir, num_queries=num_queries,
                                         k=k, seed=seed),
      lambda: embedding_map_section(emb, out_dir, max_points=max_points, tsne=tsne, seed=seed),
      lambda: modality_weights_section(workdir, out_dir),
  ]
  for section in sections:
    try:
      lines += section()
    except Exception as e:  # pylint: disable=broad-except  (one broken input spoils one section only)
      log.warning("report: a section failed: %r", e)
      lines += [f"(this section failed: {type(e).__name__}: {e})", ""]
  path = os.path.join(workdir, REPORT_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines).rstrip() + "\n")
  os.replace(tmp, path)
  return path
