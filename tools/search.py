r"""Prints the nearest products of an exported gallery to a query: retrieval as a demo.

  python tools/search.py --export=E --query=QUERY [--k=5] [--split=test] \
      [--query_type=auto|id|file|text] [--data_dir=DATA]

E is a folder written by `python -m m5p.export`; the gallery is its
E/embeddings/<split>.npz (default: the run's eval split). QUERY is
  - an item id of the gallery: its stored fused embedding is the query (and
    the item itself is left out of the results, as in coarse retrieval);
  - a path to an image, video or audio file, or
  - free text (a title),
the last two embedded with `m5p.Encoder.from_export(E)` (the training
preprocessing). Products are ranked by the dot product of fused embeddings
(the authors' coarse-retrieval protocol). Printed per result: rank, item id,
score, category and title. Titles are read from the converted records
(the export stores none): the dataset the export was made from, or --data_dir.
Exit status 2: no export, no such split, an unknown item id or a missing file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

QUERY_TYPES = ("auto", "id", "file", "text")


class SearchError(Exception):
  """A bad query or export: printed as one line, exit status 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--export", required=True, help="Export folder (python -m m5p.export).")
  p.add_argument("--query", required=True, help="Item id, media file path, or text.")
  p.add_argument("--k", type=int, default=5, help="Number of results.")
  p.add_argument("--split", default=None, help="Gallery split (default: the run's eval split).")
  p.add_argument("--query_type", choices=QUERY_TYPES, default="auto",
                 help="auto: an id of the gallery, else an existing file, else text.")
  p.add_argument("--data_dir", default=None,
                 help="Converted dataset for titles (default: the one the export was made from).")
  return p.parse_args(argv)


def gallery_path(export_dir: str, split: str | None) -> tuple[str, str]:
  """(split, its npz path): `split`, else the export's eval split, else the first there is."""
  emb_dir = os.path.join(export_dir, "embeddings")
  if not os.path.isdir(export_dir):
    raise SearchError(f"{export_dir}: no such export (make one with python -m m5p.export).")
  have = sorted(f[:-4] for f in os.listdir(emb_dir) if f.endswith(".npz")) \
      if os.path.isdir(emb_dir) else []
  if not have:
    raise SearchError(f"{emb_dir}: no embeddings (export with --splits=test, for instance).")
  if split is None:
    try:
      with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as f:
        split = json.load(f)["data"]["eval_split"]
    except (OSError, KeyError, ValueError):
      split = None
    split = split if split in have else have[0]
  if split not in have:
    raise SearchError(f"{export_dir}: no embeddings of split {split!r}; it has {', '.join(have)}.")
  return split, os.path.join(emb_dir, f"{split}.npz")


def _media_kind(path: str) -> str | None:
  from m5p.data.raw_layout import MEDIA_EXTS
  ext = os.path.splitext(path)[1].lower()
  return next((kind for kind, exts in MEDIA_EXTS.items() if ext in exts), None)


def classify_query(query: str, ids: np.ndarray, query_type: str) -> str:
  """'id', 'file' or 'text' for `query`; SearchError when it cannot be what it looks like."""
  known = bool(np.any(ids == query))
  if query_type == "id" or (query_type == "auto" and known):
    if not known:
      raise SearchError(f"unknown item id {query!r}: not in this gallery ({len(ids)} items).")
    return "id"
  if query_type == "file" or (query_type == "auto" and (os.path.isfile(query) or _media_kind(query))):
    if not os.path.isfile(query):
      raise SearchError(f"{query}: no such file.")
    if _media_kind(query) is None:
      raise SearchError(f"{query}: unknown media type (an image, video or audio file by extension).")
    return "file"
  if query_type == "auto" and query.isdigit() and all(str(i).isdigit() for i in ids[:100]):
    raise SearchError(f"unknown item id {query!r}: not in this gallery ({len(ids)} items); "
                      "--query_type=text searches it as text.")
  return "text"


def query_embedding(export_dir: str, query: str, kind: str, emb: dict) -> np.ndarray:
  """The query's fused embedding [D]: stored for an id, else from m5p.Encoder."""
  if kind == "id":
    return np.asarray(emb["fused"][int(np.flatnonzero(emb["item_id"] == query)[0])], np.float32)
  from m5p.encoder import Encoder  # Loads jax and the model: only for queries that need it.
  product = {_media_kind(query): query} if kind == "file" else {"title": query}
  out = Encoder.from_export(export_dir, batch_size=1).embed([product])
  if not out["present"][0].any():
    raise SearchError(f"{query}: nothing usable in it ({', '.join(out['faults'][0]) or 'empty'}).")
  return np.asarray(out["fused"][0], np.float32)


def _titles(export_dir: str, data_dir: str | None, split: str, indices: list[int]) -> tuple[dict, str]:
  """({record index: title}, why there are none) from the converted records."""
  if data_dir is None:
    try:
      with open(os.path.join(export_dir, "manifest.json"), encoding="utf-8") as f:
        data_dir = json.load(f).get("source_data_dir")
    except (OSError, ValueError):
      data_dir = None
  if not data_dir:
    return {}, "no dataset known for titles (--data_dir)"
  try:
    from m5p.data import convert
    source = convert.open_split(data_dir, split)
    return {i: bytes(source[i]["title"]).decode("utf-8", "replace").strip() for i in indices}, ""
  except Exception as e:  # pylint: disable=broad-except  (titles are a nicety: no dataset, no titles)
    return {}, f"no titles: cannot read split {split!r} of {data_dir} ({type(e).__name__})"


def search(export_dir: str, query: str, *, k: int = 5, split: str | None = None,
           query_type: str = "auto", data_dir: str | None = None) -> dict[str, Any]:
  """{'split', 'kind', 'query_row' (or None), 'rows', 'scores', 'emb'}: the top `k`."""
  from m5p.export import load_embeddings
  split, path = gallery_path(export_dir, split)
  emb = load_embeddings(path)
  kind = classify_query(query, emb["item_id"], query_type)
  q = query_embedding(export_dir, query, kind, emb)
  scores = np.asarray(emb["fused"], np.float32) @ q
  query_row = int(np.flatnonzero(emb["item_id"] == query)[0]) if kind == "id" else None
  candidates = np.arange(len(scores))
  if query_row is not None:
    candidates = candidates[candidates != query_row]  # The query is not its own result.
  rows = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
  return {"split": split, "kind": kind, "query_row": query_row, "rows": rows,
          "scores": scores[rows], "emb": emb}


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the results; returns the exit status."""
  args = parse_args(argv)
  try:
    found = search(args.export, args.query, k=args.k, split=args.split,
                   query_type=args.query_type, data_dir=args.data_dir)
  except SearchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  emb, rows, q = found["emb"], found["rows"], found["query_row"]
  indices = [int(emb["index"][r]) for r in rows] + ([int(emb["index"][q])] if q is not None else [])
  titles, why = _titles(args.export, args.data_dir, found["split"], indices)
  if q is not None:
    print(f"query: item {emb['item_id'][q]} (category {int(emb['label'][q])}) "
          f"{titles.get(int(emb['index'][q]), '')}".rstrip())
  else:
    what = f"{_media_kind(args.query)} file" if found["kind"] == "file" else "text"
    print(f"query: {what} {args.query!r} (embedded with m5p.Encoder)")
  print(f"gallery: {found['split']} ({len(emb['item_id'])} products, step {int(emb['step'])}); "
        "score = dot product of fused embeddings" + (f"; {why}" if why else ""))
  width = max([len(str(emb["item_id"][r])) for r in rows] + [7])
  print(f"{'rank':>4}  {'item_id':<{width}}  {'score':>10}  {'category':>8}  title")
  for rank, (r, s) in enumerate(zip(rows, found["scores"]), 1):
    print(f"{rank:>4}  {str(emb['item_id'][r]):<{width}}  {s:>10.3f}  {int(emb['label'][r]):>8}  "
          f"{titles.get(int(emb['index'][r]), '')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
