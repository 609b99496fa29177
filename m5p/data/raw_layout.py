"""Reading the raw M5Product layout (see shared/M5PRODUCT_LAYOUT.md).

Only text and file lookup happen here: split files (`<split>_id_label.json`
or `.jsonl`, the latter streamed line by line), the `pv` table string, item
ids, media paths, `splits/*_ids.txt` and `fine_groups.json`. Decoding media
is `m5p.data.media`'s job. Whole-file problems (missing root, unreadable
JSON) raise `ConversionError` naming the file; per-item problems are
returned as reasons for the converter to count.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from typing import Any, Iterator

import ijson

from m5p.data import media

PV_PAIR_SEP = "#;#"
PV_KV_SEP = "#:#"

MEDIA_DIRS = {"image": "images", "video": "videos", "audio": "audios",
              "image_feature": "image_feature", "video_feature": "video_feature",
              "audio_feature": "audio_feature"}
MEDIA_EXTS = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"),
    "video": (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".flv"),
    "audio": (".mp3", ".wav", ".m4a", ".flac", ".ogg", ".aac", ".opus"),
    "image_feature": (".npy",), "video_feature": (".npy",), "audio_feature": (".npy",),
}
SPLIT_SUFFIXES = ("_id_label.jsonl", "_id_label.json")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
MAX_ID_LEN = 200


class ConversionError(Exception):
  """The raw layout cannot be converted at all (the message names the file)."""


class ItemRefused(Exception):
  """One item cannot be read; `reason` is counted in the conversion report."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass
class RawItem:
  item_id: str
  title: str
  table_keys: list[str]
  table_values: list[str]
  label: int  # -1 unknown.
  faults: list[str]  # Text-side faults, e.g. 'table:empty_value', 'label:invalid'.


# ---------------------------------------------------------------------------
# Root and split files.


def check_root(root: str) -> str:
  if not root or not os.path.isdir(root):
    raise ConversionError(f"Raw M5Product folder not found: {root!r}")
  return root


def find_splits(root: str) -> dict[str, str]:
  """{split name: path of its `<split>_id_label.json[l]`}, sorted by name."""
  check_root(root)
  found: dict[str, str] = {}
  for name in sorted(os.listdir(root)):
    for suffix in SPLIT_SUFFIXES:
      if not name.endswith(suffix):
        continue
      split = name[:-len(suffix)]
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        continue
      if not _SPLIT_NAME.match(split) or split == "all":
        raise ConversionError(
            f"{path}: split name {split!r} must be letters, digits or '_' (and not 'all').")
      if split in found:
        raise ConversionError(
            f"Split {split!r} is given twice: {found[split]} and {path}; keep one.")
      found[split] = path
  if not found:
    raise ConversionError(f"No <split>_id_label.json or .jsonl file in {root}")
  return dict(sorted(found.items()))


def _first_char(path: str) -> bytes:
  with open(path, "rb") as f:
    while chunk := f.read(4096):
      stripped = chunk.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()  # Whitespace, BOM.
      if stripped:
        return stripped[:1]
  return b""


def iter_entries(path: str) -> Iterator[tuple[Any, Any]]:
  """Yields (item_id, entry) in file order, streamed (memory does not grow with the file).

  `.json`: one object keyed by item id (duplicated keys are all yielded), or a
  list of objects with "item_id". `.jsonl`: one object with "item_id" a line.
  A line or file that is not JSON raises ConversionError naming it (for a
  `.json` file, possibly after earlier entries were yielded); an entry
  without an id is yielded with item_id None.
  """
  try:
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            obj = json.loads(line)
          except json.JSONDecodeError as e:
            raise ConversionError(f"{path}:{lineno}: not valid JSON ({e})") from None
          yield (obj.get("item_id") if isinstance(obj, dict) else None), obj
      return
    first = _first_char(path)
    if first not in (b"{", b"["):
      what = "empty" if not first else f"starts with {first!r}"
      raise ConversionError(f"{path}: not valid JSON ({what}); expected an object keyed by item id")
    with open(path, "rb") as f:
      if f.read(3) != b"\xef\xbb\xbf":  # Skip a UTF-8 byte-order mark.
        f.seek(0)
      try:
        if first == b"{":  # The documented form: {item_id: {...}}.
          yield from ijson.kvitems(f, "", use_float=True)
        else:
          for obj in ijson.items(f, "item", use_float=True):
            yield (obj.get("item_id") if isinstance(obj, dict) else None), obj
      except (ijson.JSONError, ijson.IncompleteJSONError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise ConversionError(f"{path}: not UTF-8 text ({e})") from None
  except OSError as e:
    raise ConversionError(f"{path}: cannot read ({e})") from None


# ---------------------------------------------------------------------------
# Items.


def check_item_id(item_id: Any) -> str:
  """The id as a string, or ItemRefused('unsafe_id' / 'no_item_id')."""
  if item_id is None:
    raise ItemRefused("no_item_id")
  if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
    raise ItemRefused("unsafe_id")
  item_id = str(item_id)
  if (not item_id or item_id in (".", "..") or ".." in item_id or "/" in item_id
      or "\\" in item_id or len(item_id) > MAX_ID_LEN or item_id != item_id.strip()
      or any(ord(c) < 32 or ord(c) == 127 for c in item_id)):
    raise ItemRefused("unsafe_id")
  return item_id


def parse_pv(pv: Any) -> tuple[list[tuple[str, str]], collections.Counter]:
  """'k1#:#v1#;#k2#:#v2' -> ([(k1, v1), (k2, v2)], problems counted by kind).

  Keys and values are stripped. Dropped: pieces without '#:#'
  ('no_separator'), empty keys ('empty_key') or values ('empty_value'),
  empty pieces from doubled, leading or trailing '#;#' ('stray_separator').
  A piece with more than one '#:#' keeps its first part as key and the
  non-empty rest joined by a space as value ('stray_separator' counted).
  Repeated keys are kept (products list several colours). An empty or
  missing pv is no table, not a problem; a non-string pv is 'invalid'.
  """
  problems: collections.Counter = collections.Counter()
  pairs: list[tuple[str, str]] = []
  if pv is None:
    return pairs, problems
  if isinstance(pv, dict):  # Tolerated: a table already split into a mapping.
    pv = PV_PAIR_SEP.join(f"{k}{PV_KV_SEP}{v}" for k, v in pv.items())
  if not isinstance(pv, str):
    problems["invalid"] += 1
    return pairs, problems
  if not pv.strip():
    return pairs, problems
  for piece in pv.split(PV_PAIR_SEP):
    if not piece.strip():
      problems["stray_separator"] += 1
      continue
    if PV_KV_SEP not in piece:
      problems["no_separator"] += 1
      continue
    key, *rest = piece.split(PV_KV_SEP)
    key = key.strip()
    if len(rest) > 1:
      problems["stray_separator"] += 1
    value = " ".join(r.strip() for r in rest if r.strip())
    if not key:
      problems["empty_key"] += 1
    elif not value:
      problems["empty_value"] += 1
    else:
      pairs.append((key, value))
  return pairs, problems


def parse_label(label: Any) -> tuple[int, bool]:
  """(label, ok): absent/None/negative -> -1 (ok); unparsable -> -1 (not ok)."""
  if label is None:
    return -1, True
  if isinstance(label, bool):
    return -1, False
  if isinstance(label, float):
    if not label.is_integer():
      return -1, False
    label = int(label)
  if isinstance(label, str):
    try:
      label = int(label.strip())
    except ValueError:
      return -1, False
  if not isinstance(label, int) or label > 2**31 - 1:
    return -1, False
  return max(label, -1), True


def parse_item(item_id: Any, entry: Any) -> RawItem:
  """One split entry -> RawItem; ItemRefused for unsafe ids or non-objects."""
  item_id = check_item_id(item_id)
  if not isinstance(entry, dict):
    raise ItemRefused("bad_entry")
  title = entry.get("title")
  title = "" if title is None else (title if isinstance(title, str) else str(title))
  title = title.strip()
  pairs, problems = parse_pv(entry.get("pv"))
  faults = [f"table:{kind}" for kind in sorted(problems)]
  label, ok = parse_label(entry.get("label"))
  if not ok:
    faults.append("label:invalid")
  return RawItem(item_id=item_id, title=title, table_keys=[k for k, _ in pairs],
                 table_values=[v for _, v in pairs], label=label, faults=faults)


def find_media(root: str, item_id: str) -> tuple[dict[str, str], list[str]]:
  """({modality: path} of the files that exist, faults like 'image:unsafe_path').

  `item_id` must have passed `check_item_id`. Extensions are tried in the
  order of MEDIA_EXTS, lower then upper case; the first existing file wins.
  """
  paths, faults = {}, []
  for modality, folder in MEDIA_DIRS.items():
    for ext in MEDIA_EXTS[modality]:
      hit = None
      for e in (ext, ext.upper()):
        try:
          hit = media.safe_join(root, folder, item_id + e)
        except media.MediaError as err:
          faults.append(f"{modality}:{err.reason}")
          hit = "refused"
        if hit:
          break
      if hit:
        if hit != "refused":
          paths[modality] = hit
        break
  return paths, faults


# ---------------------------------------------------------------------------
# Optional side files.


def read_id_lists(root: str) -> dict[str, list[str]]:
  """{name: ids} from `splits/<name>_ids.txt` (blank lines skipped)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "splits", "*_ids.txt"))):
    name = os.path.basename(path)[:-len("_ids.txt")]
    try:
      with open(path, encoding="utf-8") as f:
        out[name] = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: cannot read ({e})") from None
  return out


def read_fine_groups(root: str) -> dict[str, str]:
  """{item_id: group name} from `fine_groups.json`; {} when the file is absent."""
  path = os.path.join(root, "fine_groups.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not readable JSON ({e})") from None
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected an object {{item_id: group}}, got {type(data).__name__}")
  return {str(k): str(v) for k, v in data.items() if v is not None and str(v) != ""}
