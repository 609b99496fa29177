"""Any-modality retrieval: query (and gallery) with any of the 31 subsets of the five modalities.

The model masks an absent modality out of everything (attention, pooling,
the fused sum), so embedding a product "as if it only had" a subset S is the
same forward pass with `present` ANDed with S. For every query subset S and
gallery subset G, queries are the coarse-retrieval queries that have every
modality of S, the gallery the gallery items that have every modality of G,
and the metric is the authors' coarse mAP@1 (relevant = same category).
One more row and column, `all_present`, is the products as they are (every
modality they have, no item left out): its column is "query with S against
a gallery of full products", and its cell with itself is plain coarse
retrieval.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Callable

import numpy as np

from m5p.evaluation import retrieval
from m5p.modalities import MODALITIES, NUM_MODALITIES

FULL = "all_present"  # Every modality a product has; no product left out.


def subsets() -> list[tuple[str, np.ndarray]]:
  """The 31 non-empty subsets as (name like 'text+image', keep mask [5]), smallest first."""
  out = []
  for size in range(1, NUM_MODALITIES + 1):
    for combo in itertools.combinations(range(NUM_MODALITIES), size):
      keep = np.zeros(NUM_MODALITIES, bool)
      keep[list(combo)] = True
      out.append(("+".join(MODALITIES[i] for i in combo), keep))
  return out


def retrieval_matrix(embed_subset: Callable[[np.ndarray], dict], query_rows: np.ndarray,
                     gallery_rows: np.ndarray, k: int = 1) -> dict:
  """mAP@k for every (query subset, gallery subset) pair.

  `embed_subset(keep)` returns the split's embeddings with only the `keep`
  modalities (keep None: as they are; fields fused, present, label, index;
  rows in split order). Returns {'subsets': the 31 names + 'all_present',
  'map': [32, 32] (NaN where no query or gallery item has the subset),
  'num_queries': [32], 'gallery_size': [32]}.
  """
  names, feats, has = [], [], []
  labels = keys = None
  for name, keep in subsets() + [(FULL, None)]:
    emb = embed_subset(keep)
    names.append(name)
    feats.append(np.asarray(emb["fused"], np.float32))
    present = np.asarray(emb["present"], bool)
    # The item has every modality of the subset (present after masking == keep).
    has.append(np.ones(len(present), bool) if keep is None else (present == keep[None]).all(1))
    labels, keys = emb["label"], emb["index"]
  n = len(names)
  table = np.full((n, n), np.nan)
  num_q, num_g = np.zeros(n, int), np.zeros(n, int)
  for i in range(n):
    q = query_rows[has[i][query_rows]]
    num_q[i] = len(q)
    for j in range(n):
      g = gallery_rows[has[j][gallery_rows]]
      num_g[j] = len(g)
      if len(q) and len(g):
        m = retrieval.retrieval_metrics(feats[i][q], labels[q], keys[q], feats[j][g], labels[g],
                                        keys[g], ks=(k,))
        table[i, j] = m[f"mAP@{k}"]
  return {"subsets": names, "map": table, "num_queries": num_q, "gallery_size": num_g, "k": k}


def summary(result: dict) -> dict[str, dict[str, float]]:
  """eval.json sections: each subset as query vs full gallery, and full queries vs each gallery subset."""
  names, table = result["subsets"], result["map"]
  full = names.index(FULL)
  k = result["k"]
  query = {f"{n}@{k}": float(table[i, full]) for i, n in enumerate(names)
           if np.isfinite(table[i, full])}
  gallery = {f"{n}@{k}": float(table[full, j]) for j, n in enumerate(names)
             if np.isfinite(table[full, j])}
  return {"any_modality_query": query, "any_modality_gallery": gallery}


def write(result: dict, out_dir: str) -> tuple[str, str, str]:
  """any_modality.json (the whole matrix), any_modality.md (table), any_modality.png (heatmap)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names, table = result["subsets"], result["map"]
  full = names.index(FULL)
  json_path = os.path.join(out_dir, "any_modality.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"subsets": names, "k": result["k"],
               "map": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                       for row in table],
               "num_queries": result["num_queries"].tolist(),
               "gallery_size": result["gallery_size"].tolist()}, f, indent=1)
  k = result["k"]
  lines = [f"| query modalities | queries | mAP@{k} vs full products | mAP@{k} vs same subset |",
           "|---|---:|---:|---:|"]
  for i, n in enumerate(names):
    cell = lambda v: "-" if not np.isfinite(v) else f"{v:.2f}"
    lines.append(f"| {n} | {result['num_queries'][i]} | {cell(table[i, full])} | {cell(table[i, i])} |")
  md_path = os.path.join(out_dir, "any_modality.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  short = ["ALL" if n == FULL else "".join(m[0].upper() if m != "table" else "B"
                                           for m in n.split("+")) for n in names]
  fig, ax = plt.subplots(figsize=(11, 10))
  im = ax.imshow(np.ma.masked_invalid(table), cmap="viridis")
  ax.set_xticks(range(len(names)), short, rotation=90, fontsize=7)
  ax.set_yticks(range(len(names)), short, fontsize=7)
  ax.set_xlabel("gallery modalities (T text, B table, I image, V video, A audio; "
                "ALL: products as they are)")
  ax.set_ylabel("query modalities")
  ax.set_title(f"coarse mAP@{k} by query and gallery modality subset")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  png_path = os.path.join(out_dir, "any_modality.png")
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return json_path, md_path, png_path
