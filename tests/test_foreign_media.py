"""Media made by other tools (ffmpeg, ImageMagick, espeak-ng) convert as expected.

tools/make_foreign_raw.sh writes the layout; skipped when the tools are missing
(`apt-get install -y ffmpeg imagemagick espeak-ng`).
"""
import os
import shutil
import subprocess

import numpy as np
import pytest

from m5p.data import convert as convert_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "make_foreign_raw.sh")
SIZE, MELS = 16, 40


def _missing_tools():
  missing = [t for t in ("ffmpeg", "espeak-ng") if not shutil.which(t)]
  if not (shutil.which("magick") or os.access("/usr/bin/convert", os.X_OK)):
    missing.append("ImageMagick (magick or /usr/bin/convert)")
  return missing


pytestmark = pytest.mark.skipif(
    bool(_missing_tools()),
    reason=f"needs {', '.join(_missing_tools())}: apt-get install -y ffmpeg imagemagick espeak-ng")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
  raw = str(tmp_path_factory.mktemp("foreign") / "raw")
  subprocess.run(["bash", SCRIPT, raw], check=True, capture_output=True, text=True)
  out = str(tmp_path_factory.mktemp("foreign_data"))
  manifest = convert_lib.convert(raw, out, image_size=SIZE, max_frames=4, n_mels=MELS,
                                 max_audio_seconds=12.0, num_shards=2, vocab_size=600,
                                 workers=0, log=lambda s: None)
  recs = {}
  for split in manifest["splits"]:
    src = convert_lib.open_split(out, split)
    for i in range(len(src)):
      recs[src[i]["item_id"].decode()] = src[i]
  return manifest, recs


def faults(r):
  return sorted(f.decode() for f in r["faults"] if not f.startswith((b"table:", b"label:")))


def test_counts(foreign):
  m, recs = foreign
  assert m["items_in"] == 12 and m["items_written"] == 11
  assert m["items_in"] == m["items_written"] + sum(v["count"] for v in m["skipped"].values())
  assert m["skipped"]["no_usable_modality"]["examples"] == ["f09"]
  assert m["splits"] == {"test": 2, "train": 9}
  assert m["fine_groups"] == 2 and sorted(m["splits_files"]) == ["coarse_gallery", "coarse_query"]
  assert recs["f01"]["fine_group"] == recs["f11"]["fine_group"] == b"g1"


def test_images(foreign):
  _, recs = foreign
  for k in ("f01", "f02", "f03", "f04", "f05", "f06", "f10", "f11", "f12"):
    assert len(recs[k]["image"]) == 1, k
    assert recs[k]["image"][0].shape == (SIZE, SIZE, 3)
  assert recs["f02"]["image"][0][0, 0].min() > 240  # Transparent corner -> white.
  assert recs["f02"]["image"][0][SIZE // 2, SIZE // 2, 0] > 200
  g = recs["f04"]["image"][0].astype(int)
  assert np.abs(g[..., 0] - g[..., 1]).max() < 8  # Greyscale stays grey.
  red = recs["f05"]["image"][0].reshape(-1, 3).mean(0)  # CMYK pure red.
  assert red[0] > 200 and red[1] < 80 and red[2] < 80, red
  rot = recs["f06"]["image"][0]  # EXIF 6: stored red top / blue bottom -> left blue, right red.
  assert rot[:, :3, 2].mean() > 200 and rot[:, -3:, 0].mean() > 200
  g16 = recs["f12"]["image"][0].astype(int)  # 16-bit grey gradient white -> black.
  assert g16[0].mean() > 150 and g16[-1].mean() < 100
  for k in ("f07", "f08"):
    assert recs[k]["image"] == []
  assert faults(recs["f07"]) == ["image:truncated", "video:undecodable"]
  assert faults(recs["f08"]) == ["audio:empty", "image:undecodable", "video:empty"]


def test_video_and_audio(foreign):
  _, recs = foreign
  assert len(recs["f01"]["video"]) == 4  # 3.5 s h264.
  assert len(recs["f02"]["video"]) == 3  # 2.2 s.
  assert len(recs["f06"]["video"]) == 3  # 2.5 s vp9 webm.
  assert len(recs["f11"]["video"]) == 1  # 0.5 s.
  v = recs["f10"]["video"][0]  # Display rotation 90: shown top blue / bottom red.
  assert v[:3, :, 2].mean() > 200 and v[-3:, :, 0].mean() > 200
  frames = lambda s: 1 + int(s * 16000) // 256
  # From the video's sound track (no audio file): f01 (aac), f06 (opus).
  assert abs(recs["f01"]["audio"].shape[0] - frames(3.5)) <= 4
  assert abs(recs["f06"]["audio"].shape[0] - frames(2.5)) <= 4
  assert recs["f02"]["audio"].shape[0] > 0  # .m4a, though the video is silent.
  assert abs(recs["f03"]["audio"].shape[0] - frames(1.5)) <= 4  # flac 44.1 kHz stereo.
  assert abs(recs["f04"]["audio"].shape[0] - frames(1.5)) <= 4  # ogg vorbis.
  assert recs["f05"]["audio"].shape[0] > frames(1.0)  # espeak-ng speech.
  assert abs(recs["f07"]["audio"].shape[0] - frames(1.0)) <= 8  # mp3.
  assert abs(recs["f12"]["audio"].shape[0] - frames(1.0)) <= 2  # 8 kHz stereo wav.
  for k in ("f01", "f03", "f04", "f05", "f12"):
    a = recs[k]["audio"]
    assert a.dtype == np.float16 and a.shape[1] == MELS and np.isfinite(a.astype(np.float32)).all()
  speech = recs["f05"]["audio"].astype(np.float32)
  assert speech.std(0).mean() > 0.5  # Speech varies over time, unlike a tone.
