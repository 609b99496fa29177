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
import logging
import os
import re
import unicodedata
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
# Length caps (README "The raw layout and its conversion"): longer text is cut, and
# the item gets the fault 'text:truncated' / 'table:truncated'. Titles are a few
# dozen characters and the model reads data.text_len tokens; these only bound
# what a hostile or broken entry can cost.
MAX_TITLE_CHARS = 1000
MAX_PV_CHARS = 20_000  # The whole `pv` string, before it is split.
MAX_TABLE_PAIRS = 256
MAX_TABLE_TEXT_CHARS = 200  # Each key and each value.
# Characters refused in item ids (they name files): controls, format characters such as
# the right-to-left override, surrogates, private-use and unassigned code points.
_BAD_ID_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
_SURROGATES = re.compile("[\ud800-\udfff]")
_RECOVERABLE_JSON = ("integer overflow", "invalid bytes in UTF8", "UTF8")

log = logging.getLogger("m5p")


class ConversionError(Exception):
  """The raw layout cannot be converted at all (the message names the file)."""


class ItemRefused(Exception):
  """One item cannot be read; `reason` is counted in the conversion report, with
  `example` (default: the item's id) among its examples."""

  def __init__(self, reason: str, example: str | None = None):
    super().__init__(reason)
    self.reason = reason
    self.example = example


@dataclasses.dataclass(frozen=True)
class BadEntry:
  """An entry of a split file that is not JSON (one JSONL line): refused as `reason`."""
  reason: str
  where: str


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


def _short(e: Exception, limit: int = 200) -> str:
  """The first line of an error, cut: a parser may quote a 10 MB string back."""
  arg = e.args[0] if e.args else ""
  text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
  text = (text.strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


_warned: set[str] = set()  # Files whose slow re-read was already reported (per process).


def _jsonl_entries(path: str) -> Iterator[tuple[Any, Any]]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      if not raw.strip():
        continue
      # Invalid UTF-8 becomes U+FFFD, which parse_item counts as 'text:invalid_utf8'.
      line = raw.decode("utf-8", errors="replace")
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        yield None, BadEntry("bad_json_line", f"{os.path.basename(path)}:{lineno}")
        continue
      except RecursionError:  # Deep nesting: ijson's C parser builds it without recursion.
        try:
          obj = next(ijson.items(line.encode("utf-8"), "", use_float=True))
        except (ijson.JSONError, ijson.IncompleteJSONError, StopIteration):
          yield None, BadEntry("bad_json_line", f"{os.path.basename(path)}:{lineno}")
          continue
      yield (obj.get("item_id") if isinstance(obj, dict) else None), obj


class _Utf8Replacing:
  """A binary file whose invalid UTF-8 reads as U+FFFD (for the pure-Python JSON parser)."""

  def __init__(self, f):
    import codecs  # pylint: disable=import-outside-toplevel
    self._f = f
    self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def read(self, size: int = -1) -> bytes:
    if size == 0:  # ijson probes the type of the stream with read(0).
      return b""
    chunk = self._f.read(size if size > 0 else 1 << 16)
    return self._decoder.decode(chunk, final=not chunk).encode("utf-8")


def _json_values(f, first: bytes, backend) -> Iterator[tuple[Any, Any]]:
  if first == b"{":  # The documented form: {item_id: {...}}.
    yield from backend.kvitems(f, "", use_float=True)
  else:
    for obj in backend.items(f, "item", use_float=True):
      yield (obj.get("item_id") if isinstance(obj, dict) else None), obj


def _json_entries(path: str) -> Iterator[tuple[Any, Any]]:
  """Streamed with ijson's C parser; if it meets what only it refuses (an integer beyond
  64 bits, invalid UTF-8), the file is read again with the pure-Python parser (slower;
  big integers kept, invalid UTF-8 as U+FFFD), continuing after the entries already yielded."""
  first = _first_char(path)
  if first not in (b"{", b"["):
    what = "empty" if not first else f"starts with {first!r}"
    raise ConversionError(f"{path}: not valid JSON ({what}); expected an object keyed by item id")
  done = 0
  with open(path, "rb") as f:
    if f.read(3) != b"\xef\xbb\xbf":  # Skip a UTF-8 byte-order mark.
      f.seek(0)
    try:
      for entry in _json_values(f, first, ijson):
        yield entry
        done += 1
      return
    except (ijson.JSONError, ijson.IncompleteJSONError) as e:
      if not any(k in str(e) for k in _RECOVERABLE_JSON):
        raise ConversionError(f"{path}: not valid JSON ({_short(e)})") from None
      if path not in _warned:
        _warned.add(path)
        log.warning("%s: %s; reading it with the slower pure-Python JSON parser.", path,
                    _short(e))
  python_backend = ijson.get_backend("python")
  with open(path, "rb") as f:
    if f.read(3) != b"\xef\xbb\xbf":
      f.seek(0)
    try:
      for k, entry in enumerate(_json_values(_Utf8Replacing(f), first, python_backend)):
        if k >= done:
          yield entry
    except (ijson.JSONError, ijson.IncompleteJSONError) as e:
      raise ConversionError(f"{path}: not valid JSON ({_short(e)})") from None
    except RecursionError:
      raise ConversionError(f"{path}: JSON nested too deeply to read") from None


def iter_entries(path: str) -> Iterator[tuple[Any, Any]]:
  """Yields (item_id, entry) in file order, streamed (memory does not grow with the file).

  `.json`: one object keyed by item id (duplicated keys are all yielded), or a
  list of objects with "item_id". `.jsonl`: one object with "item_id" a line; a
  line that is not JSON is one refused entry (`BadEntry`), not the file's end.
  Invalid UTF-8 reads as U+FFFD (counted by parse_item). A `.json` file that is
  not JSON raises ConversionError naming it (possibly after earlier entries
  were yielded); an entry without an id is yielded with item_id None.
  """
  try:
    if path.endswith(".jsonl"):
      yield from _jsonl_entries(path)
    else:
      yield from _json_entries(path)
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
      or "\ufffd" in item_id
      or any(unicodedata.category(c) in _BAD_ID_CATEGORIES for c in item_id)):
    raise ItemRefused("unsafe_id")
  return item_id


def _scalar_text(value: Any) -> str | None:
  """A JSON string or number as text; None for anything else (objects, lists, booleans)."""
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  return None


def _clean(text: str, cap: int, problems: collections.Counter) -> str:
  """Lone surrogates (from a '\\ud800' escape) as U+FFFD; cut at `cap` characters."""
  if _SURROGATES.search(text):
    text = _SURROGATES.sub("\ufffd", text)
  if "\ufffd" in text:
    problems["invalid_utf8"] += 1
  if len(text) > cap:
    text = text[:cap]
    problems["truncated"] += 1
  return text


def parse_pv(pv: Any) -> tuple[list[tuple[str, str]], collections.Counter]:
  """'k1#:#v1#;#k2#:#v2' -> ([(k1, v1), (k2, v2)], problems counted by kind).

  Keys and values are stripped. Dropped: pieces without '#:#'
  ('no_separator'), empty keys ('empty_key') or values ('empty_value'),
  empty pieces from doubled, leading or trailing '#;#' ('stray_separator').
  A piece with more than one '#:#' keeps its first part as key and the
  non-empty rest joined by a space as value ('stray_separator' counted).
  Repeated keys are kept (products list several colours). An empty or
  missing pv is no table, not a problem; a non-string pv is 'invalid'.
  Caps ('truncated'): the pv string at MAX_PV_CHARS, MAX_TABLE_PAIRS pairs,
  each key and value at MAX_TABLE_TEXT_CHARS; invalid UTF-8 or lone
  surrogates become U+FFFD ('invalid_utf8').
  """
  problems: collections.Counter = collections.Counter()
  pairs: list[tuple[str, str]] = []
  if pv is None:
    return pairs, problems
  if isinstance(pv, dict):  # Tolerated: a table already split into a mapping.
    parts = []
    for k, v in pv.items():
      text = _scalar_text(v)
      if text is None:
        problems["invalid"] += 1
        continue
      parts.append(f"{k}{PV_KV_SEP}{text}")
    pv = PV_PAIR_SEP.join(parts)
  if not isinstance(pv, str):
    problems["invalid"] += 1
    return pairs, problems
  if not pv.strip():
    return pairs, problems
  pv = _clean(pv, MAX_PV_CHARS, problems)
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
    elif len(pairs) >= MAX_TABLE_PAIRS:
      problems["truncated"] += 1
      break
    else:
      if len(key) > MAX_TABLE_TEXT_CHARS or len(value) > MAX_TABLE_TEXT_CHARS:
        problems["truncated"] += 1
      pairs.append((key[:MAX_TABLE_TEXT_CHARS], value[:MAX_TABLE_TEXT_CHARS]))
  if problems["truncated"] > 1:
    problems["truncated"] = 1  # Counted once per item.
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
  """One split entry -> RawItem; ItemRefused for unsafe ids or non-objects.

  A title that is not a string or number is dropped ('text:invalid'); one
  longer than MAX_TITLE_CHARS is cut ('text:truncated'); invalid UTF-8 and
  lone surrogates become U+FFFD ('text:invalid_utf8'). The item keeps its
  other modalities in every case.
  """
  if isinstance(entry, BadEntry):
    raise ItemRefused(entry.reason, entry.where)
  item_id = check_item_id(item_id)
  if not isinstance(entry, dict):
    raise ItemRefused("bad_entry")
  text_problems: collections.Counter = collections.Counter()
  title = entry.get("title")
  text = "" if title is None else _scalar_text(title)
  if text is None:
    text_problems["invalid"] += 1
    text = ""
  title = _clean(text.strip(), MAX_TITLE_CHARS, text_problems).strip()
  pairs, problems = parse_pv(entry.get("pv"))
  faults = [f"text:{kind}" for kind in sorted(text_problems)]
  faults += [f"table:{kind}" for kind in sorted(problems)]
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
  """{item_id: group name} from `fine_groups.json`; {} when the file is absent.

  Streamed like a split file. An entry whose group is not a string or number
  (an object, a list, a nesting 10k deep) is ignored with a warning, not the
  whole file; a file that is not a JSON object stops the conversion naming it.
  """
  path = os.path.join(root, "fine_groups.json")
  if not os.path.exists(path):
    return {}
  first = _first_char(path)
  if first != b"{":
    what = "empty" if not first else f"starts with {first!r}"
    raise ConversionError(f"{path}: expected an object {{item_id: group}} ({what})")
  out: dict[str, str] = {}
  ignored: list[str] = []
  try:
    for item_id, group in _json_entries(path):
      text = _scalar_text(group) if group is not None else None
      if text is None or _SURROGATES.search(text):
        if group is not None:
          ignored.append(str(item_id)[:40])
        continue
      if text != "":
        out[str(item_id)] = text
  except ConversionError as e:
    raise ConversionError(f"{path}: not readable JSON ({e})") from None
  except OSError as e:
    raise ConversionError(f"{path}: cannot read ({e})") from None
  if ignored:
    log.warning("%s: ignored %d entries whose group is not text (e.g. item %s).", path,
                len(ignored), ignored[0])
  return out
