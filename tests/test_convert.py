"""Raw layout -> convert -> read back: records, faults, errors, pv parsing, log-mel."""
import io
import json
import os
import wave

import av
import numpy as np
import pytest
from PIL import Image

from m5p.data import convert as convert_lib
from m5p.data import media, raw_layout, schema
from m5p.data.raw_layout import ConversionError
from m5p.data.tokenizer import Tokenizer

SIZE, FRAMES, MELS, SECONDS = 16, 4, 40, 3.0
SETTINGS = dict(image_size=SIZE, max_frames=FRAMES, n_mels=MELS, max_audio_seconds=SECONDS,
                num_shards=2, vocab_size=600)


# ---------------------------------------------------------------------------
# Making media.


def write_image(path, size=(40, 30), color=(10, 200, 30), mode="RGB", **save):
  img = Image.new("RGB", size, color)
  img = img if mode == "RGB" else img.convert(mode)
  img.save(path, **save)


def write_wav(path, seconds=2.0, freq=1000.0, rate=16000, channels=1):
  t = np.arange(int(seconds * rate)) / rate
  x = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
  with wave.open(path, "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(np.repeat(x[:, None], channels, axis=1).tobytes())


def write_mp4(path, seconds=3.5, fps=10, size=(48, 32), tone=None):
  """Frame i has red = 255 * i / (n - 1); optional sine sound track."""
  c = av.open(path, "w")
  v = c.add_stream("mpeg4", rate=fps)
  v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
  a = None
  if tone:
    a = c.add_stream("aac", rate=16000)
    a.layout = "mono"
  n = int(round(seconds * fps))
  for i in range(n):
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[..., 0] = (255 * i) // max(n - 1, 1)
    for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
      c.mux(p)
  for p in v.encode():
    c.mux(p)
  if a is not None:
    x = (0.5 * np.sin(2 * np.pi * tone * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
    for s in range(0, len(x), 1024):
      fr = av.AudioFrame.from_ndarray(x[None, s:s + 1024], format="flt", layout="mono")
      fr.sample_rate = 16000
      for p in a.encode(fr):
        c.mux(p)
    for p in a.encode():
      c.mux(p)
  c.close()


def decode_jpeg(b):
  return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


# ---------------------------------------------------------------------------
# A hand-made raw layout.


def make_raw(root):
  for d in ("images", "videos", "audios", "splits"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  img, vid, aud = (os.path.join(root, d) for d in ("images", "videos", "audios"))
  # 100: everything good.
  write_image(f"{img}/100.jpg", (60, 40), (10, 200, 30), quality=95)
  write_mp4(f"{vid}/100.mp4", seconds=3.5, tone=440)
  write_wav(f"{aud}/100.wav", seconds=2.0)
  # 101: RGBA png with transparent background, audio only from the video's track.
  rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
  rgba.paste((255, 0, 0, 255), (12, 12, 20, 20))
  rgba.save(f"{img}/101.png")
  write_mp4(f"{vid}/101.mp4", seconds=1.2, tone=300)
  # 102: damaged files only (title keeps the item).
  write_image(f"{img}/102.jpg", (64, 64), (1, 2, 3), quality=95)
  with open(f"{img}/102.jpg", "rb") as f:
    data = f.read()
  with open(f"{img}/102.jpg", "wb") as f:
    f.write(data[:len(data) // 2])
  with open(f"{vid}/102.mp4", "w") as f:
    f.write("<html><body>Not Found</body></html>")
  open(f"{aud}/102.wav", "w").close()
  # 103: no text, a 0.5 s silent video only.
  write_mp4(f"{vid}/103.mp4", seconds=0.5)
  # 104: no text, HTML saved as .jpg -> skipped.
  with open(f"{img}/104.jpg", "w") as f:
    f.write("<!DOCTYPE html>")
  # 105: webp greyscale image, invalid label, a truncated audio feature.
  write_image(f"{img}/105.webp", (30, 50), (120, 120, 120), mode="L")
  for d in ("image_feature", "video_feature", "audio_feature"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  np.save(f"{root}/image_feature/100.npy", np.arange(24, dtype=np.float32).reshape(3, 8))
  np.save(f"{root}/video_feature/101.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  np.save(f"{root}/audio_feature/105.npy", np.ones((4, 6), np.float32))
  with open(f"{root}/audio_feature/105.npy", "r+b") as f:
    f.truncate(100)
  # 107: no text and no media, only a precomputed video feature -> kept.
  np.save(f"{root}/video_feature/107.npy", np.full((5,), 0.5, np.float64))
  train = {
      "100": {"title": "红色 连衣裙 red dress", "pv": "颜色#:#红色#;#尺码#:#M", "label": 5},
      "101": {"title": "sticker", "pv": "a#:#1#;#nosep#;##:#v#;#k#:##;#", "label": 2},
      "102": {"title": "broken media", "pv": ""},
      "103": {"title": "", "pv": ""},
      "104": {"title": "", "pv": "#;#"},
      "../evil": {"title": "escape", "pv": ""},
      "105": {"title": "grey", "pv": "色#:#灰", "label": "abc"},
      "106": "not an object",
      "107": {"title": "", "label": 3},
  }
  with open(os.path.join(root, "train_id_label.json"), "w", encoding="utf-8") as f:
    json.dump(train, f, ensure_ascii=False)
  # test split as JSONL: a duplicate, an entry without id, a symlink escaping the root.
  outside = os.path.join(os.path.dirname(root), "outside.jpg")
  write_image(outside)
  os.symlink(outside, f"{img}/201.jpg")
  write_image(f"{img}/200.jpg", (20, 20), (200, 10, 10))
  lines = [{"item_id": "200", "title": "测试 item", "pv": "k#:#v", "label": 1},
           {"item_id": "200", "title": "again"},
           {"title": "no id"},
           {"item_id": 201, "title": "symlinked image"}]
  with open(os.path.join(root, "test_id_label.jsonl"), "w", encoding="utf-8") as f:
    for obj in lines:
      f.write(json.dumps(obj, ensure_ascii=False) + "\n")
  with open(os.path.join(root, "fine_groups.json"), "w") as f:
    json.dump({"100": "gB", "200": "gA", "999": "gC"}, f)
  with open(os.path.join(root, "splits", "fine_query_ids.txt"), "w") as f:
    f.write("100\n\n200\n")
  return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  return make_raw(str(tmp_path_factory.mktemp("raw") / "m5"))


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data"))
  logs = []
  manifest = convert_lib.convert(raw, out, workers=0, log=logs.append, **SETTINGS)
  return out, manifest, logs


def records(data_dir, split):
  src = convert_lib.open_split(data_dir, split)
  recs = [src[i] for i in range(len(src))]
  return {r["item_id"].decode(): r for r in recs}


# ---------------------------------------------------------------------------
# Conversion.


def test_manifest_counts_every_item(converted):
  out, m, logs = converted
  assert m == convert_lib.load_manifest(out)
  assert m["items_in"] == 13
  skipped = {k: v["count"] for k, v in m["skipped"].items()}
  assert skipped == {"no_usable_modality": 1, "unsafe_id": 1, "bad_entry": 1,
                     "duplicate_id": 1, "no_item_id": 1}
  assert m["skipped"]["no_usable_modality"]["examples"] == ["104"]
  assert m["skipped"]["unsafe_id"]["examples"] == ["../evil"]
  assert m["items_in"] == m["items_written"] + sum(skipped.values())
  assert m["splits"] == {"train": 6, "test": 2}
  assert m["items_written"] == 8
  faults = {(mod, r): v["count"] for mod, rs in m["faults"].items() for r, v in rs.items()}
  assert faults == {
      ("image", "truncated"): 1, ("video", "undecodable"): 1, ("audio", "empty"): 1,
      ("image", "undecodable"): 1,  # 104, skipped: faults count every item read.
      ("image", "unsafe_path"): 1, ("label", "invalid"): 1,
      ("table", "no_separator"): 1, ("table", "empty_key"): 1, ("table", "empty_value"): 1,
      ("table", "stray_separator"): 2,  # 101 and 104.
      ("video_feature", "bad_dtype"): 1, ("audio_feature", "truncated"): 1,
  }
  assert m["faults"]["image"]["truncated"]["examples"] == ["102"]
  assert m["faults"]["image"]["unsafe_path"]["examples"] == ["201"]
  no_features = {"image_feature": 0, "video_feature": 0, "audio_feature": 0}
  assert m["presence"]["train"] == {"text": 4, "table": 3, "image": 3, "video": 3, "audio": 2,
                                    "image_feature": 1, "video_feature": 1, "audio_feature": 0}
  assert m["presence"]["test"] == {"text": 2, "table": 1, "image": 1, "video": 0, "audio": 0,
                                   **no_features}
  assert m["audio_from_video"] == {"train": 1, "test": 0}
  assert m["fine_groups"] == 3
  assert m["splits_files"] == {"fine_query": ["100", "200"]}
  assert m["num_categories"] == 6
  assert m["conversion"]["image_size"] == SIZE and m["conversion"]["n_mels"] == MELS
  assert os.path.isdir(os.path.join(out, m["dataset_dir"]))
  assert not os.path.isabs(m["dataset_dir"])
  assert any("items/s" in line for line in logs)


def test_records_round_trip(converted):
  out, m, _ = converted
  train, test = records(out, "train"), records(out, "test")
  assert set(train) == {"100", "101", "102", "103", "105", "107"}
  assert set(test) == {"200", "201"}

  r = train["100"]
  assert r["title"].decode() == "红色 连衣裙 red dress"
  assert [k.decode() for k in r["table_keys"]] == ["颜色", "尺码"]
  assert [v.decode() for v in r["table_values"]] == ["红色", "M"]
  assert r["label"] == 5 and r["fine_group"] == b"gB" and r["fine_group_id"] == 1
  assert len(r["image"]) == 1 and r["image"][0].shape == (SIZE, SIZE, 3)
  assert r["image"][0].dtype == np.uint8
  np.testing.assert_allclose(r["image"][0].reshape(-1, 3).mean(0), (10, 200, 30), atol=6)
  assert len(r["video"]) == 4  # 3.5 s at 1 fps: t = 0, 1, 2, 3.
  reds = [f[..., 0].mean() for f in r["video"]]  # Frame i of 35 has red 255 i / 34.
  np.testing.assert_allclose(reds, [255 * k * 10 / 34 for k in range(4)], atol=8)
  assert r["audio"].dtype == np.float16
  assert r["audio"].shape == (1 + 32000 // 256, MELS)  # The 2 s wav, not the video's track.
  assert list(r["faults"]) == []
  assert [x.decode() for x in r["lists"]] == ["fine_query"]
  np.testing.assert_array_equal(schema.feature_array(r, "image_feature"),
                                np.arange(24).reshape(3, 8))
  assert schema.feature_array(r, "video_feature").shape == (0, 0)

  r = train["101"]
  assert [k.decode() for k in r["table_keys"]] == ["a"]
  assert r["image"][0][0, 0].min() > 245  # Transparent corner composited onto white.
  assert r["image"][0][SIZE // 2, SIZE // 2, 0] > 200  # Opaque red centre.
  assert len(r["video"]) == 2 and r["audio"].shape[0] > 0  # Audio from the video's track.
  assert r["fine_group_id"] == -1 and r["fine_group"] == b""

  r = train["102"]
  assert r["image"] == [] and r["video"] == [] and r["audio"].shape == (0, MELS)
  assert sorted(f.decode() for f in r["faults"]) == [
      "audio:empty", "image:truncated", "video:undecodable"]

  r = train["103"]
  assert r["title"] == b"" and list(r["table_keys"]) == [] and r["image"] == []
  assert len(r["video"]) == 1 and r["audio"].shape == (0, MELS)  # Silent video: no fault.
  assert list(r["faults"]) == [] and r["label"] == -1

  r = train["105"]
  assert r["label"] == -1
  assert [f.decode() for f in r["faults"]] == ["label:invalid", "audio_feature:truncated"]
  assert schema.feature_array(r, "audio_feature").shape == (0, 0)
  px = r["image"][0].reshape(-1, 3).astype(int)
  assert np.abs(px - 120).max() < 6  # Greyscale webp -> RGB.

  r = train["107"]
  assert r["image"] == [] and r["video"] == [] and r["title"] == b"" and list(r["lists"]) == []
  v = schema.feature_array(r, "video_feature")
  assert v.dtype == np.float16 and v.shape == (1, 5) and (v == 0.5).all()

  assert test["200"]["fine_group_id"] == 0 and test["200"]["label"] == 1
  assert [x.decode() for x in test["200"]["lists"]] == ["fine_query"]
  assert test["201"]["image"] == [] and [f.decode() for f in test["201"]["faults"]] == [
      "image:unsafe_path"]

  tok = Tokenizer(convert_lib.tokenizer_path(out))
  assert tok.decode(tok.encode("红色 连衣裙")) == "红色 连衣裙"


def test_shards_per_split(converted):
  out, m, _ = converted
  files = os.listdir(os.path.join(out, m["dataset_dir"]))
  assert len([f for f in files if "-train.array_record-" in f and "index" not in f]) == 2
  assert len([f for f in files if "-test.array_record-" in f and "index" not in f]) == 2
  with pytest.raises(KeyError, match="no split 'valid'"):
    convert_lib.open_split(out, "valid")


def test_workers_give_the_same_records(raw, converted, tmp_path):
  out0, m0, _ = converted
  out2 = str(tmp_path / "w2")
  m2 = convert_lib.convert(raw, out2, workers=2, log=lambda s: None, **SETTINGS)
  for key in ("splits", "presence", "faults", "skipped", "items_written"):
    assert m0[key] == m2[key]
  for split in ("train", "test"):
    a, b = records(out0, split), records(out2, split)
    assert a.keys() == b.keys()
    for k in a:
      for field in ("title", "label", "audio"):
        np.testing.assert_array_equal(a[k][field], b[k][field])
      assert len(a[k]["video"]) == len(b[k]["video"])
      for x, y in zip(a[k]["image"] + a[k]["video"], b[k]["image"] + b[k]["video"]):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# Whole-input errors.


def test_missing_root(tmp_path):
  with pytest.raises(ConversionError, match="nowhere"):
    convert_lib.convert(str(tmp_path / "nowhere"), str(tmp_path / "out"), **SETTINGS)


def test_bad_json_names_the_file(tmp_path):
  root = tmp_path / "raw"
  root.mkdir()
  (root / "train_id_label.json").write_text('{"1": {"title": "x"')
  with pytest.raises(ConversionError, match="train_id_label.json"):
    convert_lib.convert(str(root), str(tmp_path / "out"), **SETTINGS)
  (root / "train_id_label.json").unlink()
  # A JSONL line that is not JSON is one refused item, not the file's end (issue 16).
  (root / "train_id_label.jsonl").write_text('{"item_id": "1", "title": "x"}\n{oops\n')
  entries = list(raw_layout.iter_entries(str(root / "train_id_label.jsonl")))
  assert entries[1] == (None, raw_layout.BadEntry("bad_json_line", "train_id_label.jsonl:2"))
  with pytest.raises(raw_layout.ItemRefused) as e:
    raw_layout.parse_item(*entries[1])
  assert (e.value.reason, e.value.example) == ("bad_json_line", "train_id_label.jsonl:2")
  (root / "train_id_label.json").write_text('{}')
  with pytest.raises(ConversionError, match="given twice"):
    raw_layout.find_splits(str(root))


def test_no_split_file_and_existing_output(raw, converted, tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="No <split>_id_label"):
    convert_lib.convert(str(tmp_path / "empty"), str(tmp_path / "out"), **SETTINGS)
  out, _, _ = converted
  with pytest.raises(ConversionError, match="already holds a conversion"):
    convert_lib.convert(raw, out, **SETTINGS)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    convert_lib.load_manifest(str(tmp_path))


def test_bad_fine_groups(tmp_path):
  (tmp_path / "fine_groups.json").write_text("[1, 2")
  with pytest.raises(ConversionError, match="fine_groups.json"):
    raw_layout.read_fine_groups(str(tmp_path))


# ---------------------------------------------------------------------------
# Units.


@pytest.mark.parametrize("pv, pairs, problems", [
    ("k1#:#v1#;#k2#:#v2", [("k1", "v1"), ("k2", "v2")], {}),
    ("", [], {}),
    (None, [], {}),
    (" 颜色 #:# 红色 ", [("颜色", "红色")], {}),
    ("a#:#1#;#nosep", [("a", "1")], {"no_separator": 1}),
    ("#:#v#;#k#:#", [], {"empty_key": 1, "empty_value": 1}),
    ("#;#a#:#1#;##;#", [("a", "1")], {"stray_separator": 3}),
    ("a#:#1#:#2", [("a", "1 2")], {"stray_separator": 1}),
    ("c#:#red#;#c#:#blue", [("c", "red"), ("c", "blue")], {}),
    (42, [], {"invalid": 1}),
])
def test_parse_pv(pv, pairs, problems):
  got, counts = raw_layout.parse_pv(pv)
  assert got == pairs
  assert dict(counts) == problems


@pytest.mark.parametrize("item_id", ["../x", "a/b", "a\\b", "", "..", "a\x00b", "a\nb", " 1", None, 1.5])
def test_unsafe_ids_refused(item_id):
  with pytest.raises(raw_layout.ItemRefused):
    raw_layout.check_item_id(item_id)


def test_safe_ids():
  assert raw_layout.check_item_id(576820091) == "576820091"
  assert raw_layout.check_item_id("abc-1_2.x") == "abc-1_2.x"


@pytest.mark.parametrize("label, want", [(3, (3, True)), ("7", (7, True)), (None, (-1, True)),
                                         (-1, (-1, True)), ("x", (-1, False)), (2.0, (2, True)),
                                         (2.5, (-1, False)), (True, (-1, False))])
def test_parse_label(label, want):
  assert raw_layout.parse_label(label) == want


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0])
def test_logmel_of_a_tone_peaks_at_its_mel_bin(freq):
  sr = 16000
  x = np.sin(2 * np.pi * freq * np.arange(sr) / sr).astype(np.float32)
  spec = media.logmel(x, n_mels=80)
  assert spec.shape == (1 + sr // 256, 80)
  want = int(np.argmin(np.abs(media.mel_center_frequencies(80) - freq)))
  assert int(np.argmax(spec[5:-5].mean(0))) == want


def test_logmel_length_and_file_formats(tmp_path):
  write_wav(str(tmp_path / "a.wav"), seconds=5.0, rate=44100, channels=2)
  m = media.load_audio_logmel(str(tmp_path / "a.wav"), max_seconds=3.0, n_mels=80)
  assert m.dtype == np.float16 and m.shape == (1 + 3 * 16000 // 256, 80)
  assert np.isfinite(m.astype(np.float32)).all()
  write_wav(str(tmp_path / "short.wav"), seconds=0.01)
  with pytest.raises(media.MediaError) as e:
    media.load_audio_logmel(str(tmp_path / "short.wav"))
  assert e.value.reason == "too_short"


def test_image_modes_and_exif(tmp_path):
  p = str(tmp_path / "cmyk.jpg")
  write_image(p, (40, 40), (255, 0, 0), mode="CMYK", quality=95)
  px = decode_jpeg(media.load_image_jpeg(p, 8)).reshape(-1, 3).mean(0)
  assert px[0] > 200 and px[1] < 60 and px[2] < 60
  p = str(tmp_path / "pal.png")
  write_image(p, (20, 30), (0, 0, 255), mode="P")
  assert decode_jpeg(media.load_image_jpeg(p, 8))[..., 2].mean() > 200
  # Stored 40 wide x 20 high, top red / bottom blue; EXIF 6 = display rotated 90 deg clockwise.
  img = Image.new("RGB", (40, 20), (255, 0, 0))
  img.paste((0, 0, 255), (0, 10, 40, 20))
  exif = Image.Exif()
  exif[0x0112] = 6
  p = str(tmp_path / "rot.jpg")
  img.save(p, exif=exif, quality=95)
  a = decode_jpeg(media.load_image_jpeg(p, 8))
  assert a[:, :3, 2].mean() > 200 and a[:, -3:, 0].mean() > 200  # Left blue, right red.
  with pytest.raises(media.MediaError) as e:
    media.load_image_jpeg(str(tmp_path / "none.jpg"), 8)
  assert e.value.reason == "missing"


def test_video_sampling(tmp_path):
  p = str(tmp_path / "v.mp4")
  write_mp4(p, seconds=5.0, fps=4)
  frames = media.load_video_frames(p, 8, max_frames=3)
  assert len(frames) == 3  # Stops at max_frames.
  reds = [decode_jpeg(f)[..., 0].mean() for f in frames]
  np.testing.assert_allclose(reds, [255 * 4 * k / 19 for k in range(3)], atol=8)
  write_mp4(p, seconds=0.3, fps=10)
  assert len(media.load_video_frames(p, 8, max_frames=12)) == 1
  write_wav(str(tmp_path / "a.wav"))
  with pytest.raises(media.MediaError) as e:
    media.load_video_frames(str(tmp_path / "a.wav"), 8, 4)
  assert e.value.reason == "no_stream"


def _crash_on_item_101(paths_list, settings):
  """Stands in for the worker's decode: kills the worker process on item 101."""
  if any(os.path.basename(p).startswith("101.") for paths in paths_list for p in paths.values()):
    os._exit(1)
  return [media.decode_item_media(p, *settings) for p in paths_list]


def test_decoder_crash_costs_only_that_item(raw, converted, tmp_path, monkeypatch):
  from m5p.data import shards
  monkeypatch.setattr(shards, "_decode_chunk", _crash_on_item_101)
  monkeypatch.setattr(shards, "_CHUNK", 2)
  m = convert_lib.convert(raw, str(tmp_path / "c"), workers=1, log=lambda s: None, **SETTINGS)
  assert m["splits"] == converted[1]["splits"]
  assert m["faults"]["image"]["crashed"]["examples"] == ["101"]
  assert m["faults"]["video"]["crashed"]["count"] == 1
  r = records(str(tmp_path / "c"), "train")
  assert r["101"]["image"] == [] and r["101"]["title"] == b"sticker"
  assert len(r["100"]["video"]) == 4  # Items around it are intact.


def test_split_without_text(tmp_path):
  root = tmp_path / "raw"
  (root / "images").mkdir(parents=True)
  (root / "train_id_label.json").write_text(json.dumps({"1": {"title": "a title"}}))
  # 'valid': no text anywhere, one usable image -> kept; 'extra': nothing usable -> left out.
  write_image(str(root / "images" / "2.jpg"))
  (root / "images" / "3.jpg").write_text("<html>")
  (root / "valid_id_label.json").write_text(json.dumps({"2": {"title": ""}}))
  (root / "extra_id_label.jsonl").write_text(json.dumps({"item_id": "3", "pv": "#;#"}) + "\n")
  m = convert_lib.convert(str(root), str(tmp_path / "out"), workers=0, log=lambda s: None,
                          **SETTINGS)
  assert m["splits"] == {"train": 1, "valid": 1}
  assert m["empty_splits"] == ["extra"]
  assert m["items_in"] == 3 and m["skipped"]["no_usable_modality"]["examples"] == ["3"]
  assert len(records(str(tmp_path / "out"), "valid")["2"]["image"]) == 1


def test_image_limits_and_16_bit(tmp_path, monkeypatch):
  p = str(tmp_path / "big.png")
  write_image(p, (64, 64))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # 3x over: Pillow refuses.
  with pytest.raises(media.MediaError) as e:
    media.load_image_jpeg(p, 8)
  assert e.value.reason == "too_large"
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 * 2 // 3)  # 1.5x over: warns only.
  assert decode_jpeg(media.load_image_jpeg(p, 8)).shape == (8, 8, 3)
  p16 = str(tmp_path / "g16.png")
  Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(p16)
  assert Image.open(p16).mode.startswith("I")
  assert abs(decode_jpeg(media.load_image_jpeg(p16, 8)).mean() - 40000 / 65535 * 255) < 4


# ---------------------------------------------------------------------------
# Determinism, resumption, job arrays, Beam.


def shard_bytes(out):
  """{file name: bytes} of every ArrayRecord shard of a conversion."""
  m = convert_lib.load_manifest(out)
  d = os.path.join(out, m["dataset_dir"])
  return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
          if ".array_record-" in f}


def test_interrupted_conversion_resumes_to_identical_shards(raw, converted, tmp_path, monkeypatch):
  out = str(tmp_path / "r")
  real = media.decode_item_media

  def interrupt_on_105(paths, *args):
    if any(os.path.basename(p).startswith("105.") for p in paths.values()):
      raise KeyboardInterrupt  # As a preemption would, in the last shard (train 1 of 2).
    return real(paths, *args)

  monkeypatch.setattr(media, "decode_item_media", interrupt_on_105)
  with pytest.raises(KeyboardInterrupt):
    convert_lib.convert(raw, out, workers=0, log=lambda s: None, **SETTINGS)
  monkeypatch.setattr(media, "decode_item_media", real)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  work = os.path.join(out, "conversion")
  done = sorted(f for f in os.listdir(work) if f != "plan.json")
  assert done == ["test-00000-of-00002.json", "test-00001-of-00002.json",
                  "train-00000-of-00002.json"]
  stamps = {f: os.stat(os.path.join(work, f)).st_mtime_ns for f in done}
  with pytest.raises(ConversionError, match="unfinished conversion.*settings"):
    convert_lib.convert(raw, out, workers=0, log=lambda s: None, **{**SETTINGS, "image_size": 8})
  logs = []
  m = convert_lib.convert(raw, out, workers=0, log=logs.append, **SETTINGS)
  assert any("3 shards already done" in line for line in logs)
  assert {f: os.stat(os.path.join(work, f)).st_mtime_ns for f in done} == stamps  # Not redone.
  assert not [f for f in os.listdir(m and os.path.join(out, m["dataset_dir"])) if ".tmp" in f]
  assert shard_bytes(out) == shard_bytes(converted[0])
  for key in ("splits", "presence", "faults", "skipped", "items_in"):
    assert m[key] == converted[1][key]


def test_job_array_tasks_then_finish(raw, converted, tmp_path):
  out = str(tmp_path / "t")
  for task in (1, 0):
    assert convert_lib.convert(raw, out, workers=0, num_tasks=2, task_index=task,
                               log=lambda s: None, **SETTINGS) is None
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  m = convert_lib.convert(raw, out, workers=0, log=lambda s: None, **SETTINGS)
  assert m["splits"] == converted[1]["splits"]
  assert shard_bytes(out) == shard_bytes(converted[0])
  with pytest.raises(ConversionError, match="task_index"):
    convert_lib.convert(raw, out, num_tasks=2, task_index=2, **SETTINGS)


def test_beam_direct_runner_gives_the_same_shards(raw, converted, tmp_path):
  pytest.importorskip("apache_beam")
  out = str(tmp_path / "b")
  m = convert_lib.convert(raw, out, beam_runner="DirectRunner", log=lambda s: None, **SETTINGS)
  assert m["faults"] == converted[1]["faults"] and m["skipped"] == converted[1]["skipped"]
  assert shard_bytes(out) == shard_bytes(converted[0])


def test_linked_media_folder_outside_root_is_refused(tmp_path):
  root, elsewhere = tmp_path / "raw", tmp_path / "elsewhere"
  root.mkdir()
  elsewhere.mkdir()
  write_image(str(elsewhere / "1.jpg"))
  os.symlink(elsewhere, root / "images")
  (root / "train_id_label.json").write_text(json.dumps({"1": {"title": "t"}}))
  m = convert_lib.convert(str(root), str(tmp_path / "out"), workers=0, log=lambda s: None,
                          **SETTINGS)
  assert m["faults"]["image"]["unsafe_path"]["examples"] == ["1"]
  assert records(str(tmp_path / "out"), "train")["1"]["image"] == []


def test_json_split_is_streamed_with_duplicate_keys(tmp_path):
  path = tmp_path / "x_id_label.json"
  path.write_text('\ufeff {"1": {"title": "a"}, "2": {"title": "b", "label": 1.0}, "1": {}}',
                  encoding="utf-8")
  assert list(raw_layout.iter_entries(str(path))) == [
      ("1", {"title": "a"}), ("2", {"title": "b", "label": 1.0}), ("1", {})]
  path.write_text('[{"item_id": "5", "title": "c"}, 3]')
  assert list(raw_layout.iter_entries(str(path))) == [("5", {"item_id": "5", "title": "c"}),
                                                      (None, 3)]
  path.write_text("")
  with pytest.raises(ConversionError, match="x_id_label.json.*empty"):
    list(raw_layout.iter_entries(str(path)))


def test_feature_files_are_checked(tmp_path):
  p = str(tmp_path / "f.npy")
  np.save(p, np.ones((2, 3), np.int64))
  assert media.load_feature(p).dtype == np.float16
  cases = {
      "bad_dtype": lambda: np.save(p, np.array(["a", "b"])),
      "bad_shape": lambda: np.save(p, np.ones((2, 2, 2))),
      "not_finite": lambda: np.save(p, np.array([np.nan])),
      "undecodable": lambda: open(p, "w").write("<html>"),
      "empty": lambda: open(p, "w").close(),
  }
  for reason, make in cases.items():
    make()
    with pytest.raises(media.MediaError) as e:
      media.load_feature(p)
    assert e.value.reason == reason, reason
