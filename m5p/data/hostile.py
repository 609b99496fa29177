"""A raw layout of hostile inputs: what issue 16 found stopping or fooling the converter.

`write(root)` makes it and returns what a conversion must report for each
case (tools/drills.py and tests/test_hostile_input.py convert it). Every file
is built in bounded memory: the oversized PNG is written row by row.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

from PIL import Image

DEEP = 10_000  # Nesting depth that breaks recursive JSON code.


def _jpeg(size=(16, 16), color=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def jpeg_with_false_size(width: int, height: int) -> bytes:
  """A 16x16 JPEG whose frame header (SOF0) claims width x height."""
  data = bytearray(_jpeg())
  i = data.index(b"\xff\xc0")
  struct.pack_into(">HH", data, i + 5, height, width)
  return bytes(data)


def write_big_png(path: str, width: int, height: int) -> None:
  """A real width x height black RGB PNG, streamed (never held in memory)."""

  def chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

  row = b"\x00" + b"\x00" * (3 * width)
  comp = zlib.compressobj(9)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
    parts = []
    for _ in range(height):
      parts.append(comp.compress(row))
    parts.append(comp.flush())
    f.write(chunk(b"IDAT", b"".join(parts)))
    f.write(chunk(b"IEND", b""))


def _deep(depth: int) -> str:
  return '{"a":' * depth + "1" + "}" * depth


def write(root: str, big_png_side: int = 13_000) -> dict[str, str]:
  """Writes the layout; returns {case: what the conversion must report}."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  good = _jpeg()

  def image(item_id: str, data: bytes = good) -> None:
    with open(os.path.join(root, "images", f"{item_id}.jpg"), "wb") as f:
      f.write(data)

  entries: list[bytes] = []

  def entry(item_id: str, body: str) -> None:
    entries.append(json.dumps(item_id).encode() + b": " + body.encode("utf-8"))

  for k in range(1, 7):  # Ordinary items around the hostile ones.
    entry(str(k), json.dumps({"title": f"good item {k}", "pv": "a#:#b", "label": k % 3}))
    image(str(k))
  # Raw invalid UTF-8 inside one title (the rest of the file is fine).
  entries.append(b'"101": {"title": "bad \xff\xfe bytes", "label": 1}')
  image("101")
  entry("102", '{"title": "lone \\ud800 surrogate", "label": 1}')  # Pure ASCII on disk.
  image("102")
  entry("103", '{"title": "huge label", "label": 1000000000000000000000000000000}')
  image("103")
  entry("104", '{"title": ' + _deep(DEEP) + ', "label": 1}')
  image("104")
  entry("107", json.dumps({"title": "header says 12000x12000"}))
  image("107", jpeg_with_false_size(12_000, 12_000))
  entry("108", json.dumps({"title": "a real big png"}))
  write_big_png(os.path.join(root, "images", "108.png"), big_png_side, big_png_side)
  entry("10\u202e9", json.dumps({"title": "right-to-left override in the id"}))
  with open(os.path.join(root, "train_id_label.json"), "wb") as f:
    f.write(b"{" + b",\n".join(entries) + b"}")

  lines = [json.dumps({"item_id": "201", "title": "jsonl ok"}).encode(),
           b'{"item_id": "202", "title": "jsonl bad \xc3\x28 bytes"}',
           b"{not json at all",
           b'{"item_id": "204", "title": ' + _deep(DEEP).encode() + b"}",
           json.dumps({"item_id": "205", "title": "jsonl ok too"}).encode(),
           json.dumps({"item_id": "105", "title": "x" * 10_000_000, "label": 1}).encode(),
           json.dumps({"item_id": "106", "title": "many pairs",
                       "pv": "#;#".join(["k#:#v"] * 100_000)}).encode()]
  for item_id in ("201", "202", "204", "205"):
    image(item_id)
  with open(os.path.join(root, "test_id_label.jsonl"), "wb") as f:
    f.write(b"\n".join(lines) + b"\n")

  with open(os.path.join(root, "fine_groups.json"), "w", encoding="utf-8") as f:
    f.write('{"1": "g1", "2": "g1", "3": ' + _deep(DEEP) + ', "4": "g2"}')

  return {
      "invalid UTF-8 in a .json title": "kept; text:invalid_utf8 (101)",
      "invalid UTF-8 in a .jsonl title": "kept; text:invalid_utf8 (202)",
      "lone surrogate escape": "kept; text:invalid_utf8 (102)",
      "label 10**30": "kept; label:invalid (103)",
      "title nested 10k deep (.json)": "kept with its image; text:invalid (104)",
      "title nested 10k deep (.jsonl)": "kept with its image; text:invalid (204)",
      "line that is not JSON (.jsonl)": "skipped as bad_json_line",
      "fine_groups.json entry nested 10k deep": "entry ignored, other groups read",
      "10 MB title": "cut; text:truncated (105)",
      "100k table pairs": "cut; table:truncated (106)",
      "JPEG header 12000x12000 over 16x16 data": "image absent: too_large (107)",
      "real PNG over the pixel cap": "image absent: too_large (108)",
      "right-to-left override in an id": "skipped as unsafe_id",
  }


def _examples(manifest: dict, group: str, reason: str, where: str = "faults") -> list[str]:
  section = manifest.get(where, {})
  node = section.get(group, {}) if where == "faults" else section
  return list(node.get(reason, {}).get("examples", []))


def observe(manifest: dict, written_ids: set[str]) -> dict[str, str]:
  """{case: what the conversion did}, in the words of `write`'s expectations."""
  def fault(group, reason, item):
    return item in _examples(manifest, group, reason)

  def kept(item, group, reason):
    if item in written_ids and fault(group, reason, item):
      return f"kept; {group}:{reason} ({item})"
    return f"{'kept' if item in written_ids else 'lost'}, faults {_faults_of(manifest, item)}"

  skipped = manifest.get("skipped", {})
  too_large = _examples(manifest, "image", "too_large")
  return {
      "invalid UTF-8 in a .json title": kept("101", "text", "invalid_utf8"),
      "invalid UTF-8 in a .jsonl title": kept("202", "text", "invalid_utf8"),
      "lone surrogate escape": kept("102", "text", "invalid_utf8"),
      "label 10**30": kept("103", "label", "invalid"),
      "title nested 10k deep (.json)": kept("104", "text", "invalid").replace(
          "kept;", "kept with its image;"),
      "title nested 10k deep (.jsonl)": kept("204", "text", "invalid").replace(
          "kept;", "kept with its image;"),
      "line that is not JSON (.jsonl)": ("skipped as bad_json_line"
                                         if skipped.get("bad_json_line", {}).get("count") == 1
                                         else f"skipped: {sorted(skipped)}"),
      "fine_groups.json entry nested 10k deep": ("entry ignored, other groups read"
                                                 if manifest.get("fine_groups") == 2
                                                 else f"fine_groups={manifest.get('fine_groups')}"),
      "10 MB title": ("cut; text:truncated (105)" if "105" in written_ids
                      and fault("text", "truncated", "105") else "not cut"),
      "100k table pairs": ("cut; table:truncated (106)" if "106" in written_ids
                           and fault("table", "truncated", "106") else "not cut"),
      "JPEG header 12000x12000 over 16x16 data": ("image absent: too_large (107)"
                                                  if "107" in too_large else "image accepted"),
      "real PNG over the pixel cap": ("image absent: too_large (108)" if "108" in too_large
                                      else "image accepted"),
      "right-to-left override in an id": ("skipped as unsafe_id"
                                          if skipped.get("unsafe_id", {}).get("count") == 1
                                          else f"skipped: {sorted(skipped)}"),
  }


def _faults_of(manifest: dict, item: str) -> list[str]:
  return sorted(f"{g}:{r}" for g, reasons in manifest.get("faults", {}).items()
                for r, v in reasons.items() if item in v.get("examples", []))
