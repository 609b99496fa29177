"""The converter on hostile input (issue 16): one bad item never stops a conversion, text is
capped, images are judged by their pixels, and shards are byte-identical across processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m5p.data import convert, hostile, media, raw_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(image_size=16, max_frames=2, n_mels=80, max_audio_seconds=2.0, num_shards=2,
                vocab_size=300)


def _written_ids(out: str, manifest: dict) -> set[str]:
  ids = set()
  for split in manifest["splits"]:
    src = convert.open_split(out, split)
    ids |= {src[i]["item_id"].decode() for i in range(len(src))}
  return ids


def test_hostile_layout_converts_and_counts_every_case(tmp_path):
  raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
  expected = hostile.write(raw, big_png_side=6100)  # 37.2M pixels: just over the cap.
  manifest = convert.convert(raw, out, workers=0, log=lambda *a: None, **SETTINGS)
  observed = hostile.observe(manifest, _written_ids(out, manifest))
  assert observed == expected
  assert manifest["items_in"] == manifest["items_written"] + sum(
      v["count"] for v in manifest["skipped"].values())


@pytest.mark.parametrize("value, text, faults", [
    ("ok", "ok", []),
    (12.5, "12.5", []),
    ({"a": {"b": 1}}, "", ["text:invalid"]),
    (True, "", ["text:invalid"]),
    ("x" * (raw_layout.MAX_TITLE_CHARS + 5), "x" * raw_layout.MAX_TITLE_CHARS, ["text:truncated"]),
    ("a\ud800b", "a\ufffdb", ["text:invalid_utf8"]),
])
def test_titles(value, text, faults):
  item = raw_layout.parse_item("1", {"title": value})
  assert (item.title, item.faults) == (text, faults)


def test_table_caps():
  pv = "#;#".join(f"k{i}#:#v" for i in range(raw_layout.MAX_TABLE_PAIRS + 3))
  item = raw_layout.parse_item("1", {"pv": pv})
  assert len(item.table_keys) == raw_layout.MAX_TABLE_PAIRS and item.faults == ["table:truncated"]
  item = raw_layout.parse_item("1", {"pv": "k#:#" + "v" * 500})
  assert item.table_values == ["v" * raw_layout.MAX_TABLE_TEXT_CHARS]
  assert raw_layout.parse_pv({"a": 1, "b": {"deep": [1]}})[0] == [("a", "1")]


@pytest.mark.parametrize("item_id", ["1\u202e2", "1\u200b2", "1\ufffd", "1\u2028"])
def test_format_characters_in_ids_are_refused(item_id):
  with pytest.raises(raw_layout.ItemRefused):
    raw_layout.check_item_id(item_id)


def test_big_integer_and_bad_utf8_in_a_json_split_are_read_on(tmp_path):
  path = tmp_path / "train_id_label.json"
  path.write_bytes(b'{"1": {"title": "a"}, "2": {"label": 100000000000000000000000}, '
                   b'"3": {"title": "b\xffc"}, "4": {"title": "d"}}')
  entries = list(raw_layout.iter_entries(str(path)))
  assert [k for k, _ in entries] == ["1", "2", "3", "4"]
  assert raw_layout.parse_item(*entries[1]).faults == ["label:invalid"]
  assert raw_layout.parse_item(*entries[2]).faults == ["text:invalid_utf8"]


def test_image_pixels_are_capped_before_decoding(tmp_path, monkeypatch):
  p = str(tmp_path / "lie.jpg")
  with open(p, "wb") as f:
    f.write(hostile.jpeg_with_false_size(4000, 4000))  # Under the cap, but 16x16 of data.
  with pytest.raises(media.MediaError) as e:
    media.load_image_jpeg(p, 8)
  assert e.value.reason == "truncated"
  big = str(tmp_path / "big.png")
  Image.new("RGB", (300, 200)).save(big)
  monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
  with pytest.raises(media.MediaError) as e:
    media.load_image_jpeg(big, 8)
  assert e.value.reason == "too_large" and "300x200" in str(e.value)


def _small_layout(root: str) -> None:
  os.makedirs(os.path.join(root, "images"))
  os.makedirs(os.path.join(root, "image_feature"))
  entries = {}
  rng = np.random.default_rng(0)
  for k in range(12):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(
        os.path.join(root, "images", f"{k}.jpg"))
    np.save(os.path.join(root, "image_feature", f"{k}.npy"), rng.standard_normal((3, 8)))
    entries[str(k)] = {"title": f"商品 {k} product", "pv": f"颜色#:#红{k}#;#size#:#{k}",
                       "label": k % 4}
  with open(os.path.join(root, "train_id_label.json"), "w", encoding="utf-8") as f:
    json.dump(entries, f, ensure_ascii=False)


def test_two_processes_write_byte_identical_shards(tmp_path):
  """The converter CLI, twice, in separate processes (each with its own protobuf map
  hashing): the same shard bytes."""
  raw = str(tmp_path / "raw")
  _small_layout(raw)
  outs = []
  for k in range(2):
    out = str(tmp_path / f"out{k}")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_m5product.py"),
                    f"--input_dir={raw}", f"--output_dir={out}", f"--workers={k}",
                    "--image_size=16", "--num_shards=2", "--vocab_size=300"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONHASHSEED=str(k)))
    outs.append(out)
  a, b = ({f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
           if ".array_record-" in f}
          for d in (os.path.join(o, convert.load_manifest(o)["dataset_dir"]) for o in outs))
  assert len(a) == 2 and a == b
