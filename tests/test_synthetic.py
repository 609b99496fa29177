"""The synthetic M5Product generator: layout, real media, damage, determinism, structure."""
import collections
import hashlib
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image, ImageFile

from m5p.data import synthetic

N = 120
SEED = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic") / "raw")
  return out, synthetic.generate(out, N, seed=SEED)


def _load(out):
  splits = {}
  for split in ("train", "test"):
    with open(os.path.join(out, f"{split}_id_label.json"), encoding="utf-8") as f:
      splits[split] = json.load(f)
  return splits


def _ids(out, name):
  with open(os.path.join(out, "splits", f"{name}_ids.txt"), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _hashes(out):
  result = {}
  for folder, _, files in os.walk(out):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, out)] = hashlib.sha256(f.read()).hexdigest()
  return result


def _decode_image(path):
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  with Image.open(path) as img:
    img.load()
    return img.size, img.mode


def _decode_av(path, kind):
  with av.open(path) as container:
    frames = list(container.decode(**{kind: 0}))
  if not frames:
    raise ValueError(f"{path}: no {kind} frames")
  return frames


def _undecodable(path, kind):
  try:
    if kind == "image":
      _decode_image(path)
    else:
      _decode_av(path, kind)
  except Exception:  # noqa: BLE001  (any failure is what we want)
    return True
  return False


def _damaged(summary):
  return {d["path"]: d["kind"] for d in summary["damaged"]}


def _category_sizes(plan):
  return np.bincount(plan.inst_category[plan.owner], minlength=len(plan.cats)).tolist()


def _small(out, n, **kw):
  """A quick set: tiny pictures, few videos and sounds."""
  kw = dict(dict(image_size=16, video_fraction=0.2, audio_fraction=0.2), **kw)
  return synthetic.generate(str(out), n, **kw)


def test_layout_exists_and_parses(raw):
  out, summary = raw
  splits = _load(out)
  train, test = splits["train"], splits["test"]
  assert len(train) + len(test) == N
  assert not set(train) & set(test)
  assert 0.7 < len(train) / N < 0.9
  num_cats = summary["num_categories"]
  assert num_cats == 8
  for split, entries in splits.items():
    for item_id, entry in entries.items():
      assert item_id.isdigit() and len(item_id) == 9
      assert isinstance(entry["title"], str) and isinstance(entry["pv"], str)
      if split == "test":
        assert 0 <= entry["label"] < num_cats
      else:
        assert entry.get("label", -1) in range(-1, num_cats)
  # Every title mixes scripts somewhere; tables use the layout's separators.
  titles = [e["title"] for s in splits.values() for e in s.values()]
  assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in titles)
  assert any(any(ch.isascii() and ch.isalpha() for ch in t) for t in titles)
  assert any(any(ch.isdigit() for ch in t) for t in titles)
  pvs = [e["pv"] for s in splits.values() for e in s.values() if e["pv"]]
  assert all("#:#" in pv for pv in pvs)
  # Id lists: drawn from test (retrieval, cls_test) and labelled train items (cls_train).
  lists = {name: _ids(out, name) for name in synthetic.SPLIT_LISTS}
  assert set(lists["coarse_query"]) | set(lists["coarse_gallery"]) == set(test)
  assert not set(lists["coarse_query"]) & set(lists["coarse_gallery"])
  assert set(lists["fine_query"]) | set(lists["fine_gallery"]) == set(test)
  assert set(lists["cls_test"]) == set(test)
  assert set(lists["cls_train"]) <= set(train)
  assert all(train[i].get("label", -1) >= 0 for i in lists["cls_train"])
  assert summary["split_lists"] == {k: len(v) for k, v in lists.items()}
  with open(os.path.join(out, "fine_groups.json"), encoding="utf-8") as f:
    groups = json.load(f)
  assert set(groups) <= set(train) | set(test)
  assert synthetic.load_summary(out)["params"]["num_products"] == N
  assert summary["split_files"] == "json"
  assert not any(os.path.exists(os.path.join(out, d)) for d in synthetic.FEATURE_DIRS.values())


def test_media_decode(raw):
  out, summary = raw
  damaged = _damaged(summary)
  ids = set().union(*[set(s) for s in _load(out).values()])
  images = sorted(os.listdir(os.path.join(out, "images")))
  videos = sorted(os.listdir(os.path.join(out, "videos")))
  audios = sorted(os.listdir(os.path.join(out, "audios")))
  assert all(name.split(".")[0] in ids for name in images + videos + audios)
  for name in images:
    if f"images/{name}" not in damaged:
      assert _decode_image(os.path.join(out, "images", name)) == ((64, 64), "RGB")
  codecs, tracks = collections.Counter(), 0
  audio_ids = {name.split(".")[0] for name in audios}
  for name in videos:
    if f"videos/{name}" in damaged:
      continue
    path = os.path.join(out, "videos", name)
    frames = _decode_av(path, "video")
    assert 14 <= len(frames) <= 30
    assert (frames[0].width, frames[0].height, frames[0].format.name) == (64, 64, "yuv420p")
    with av.open(path) as c:
      codecs[c.streams.video[0].codec_context.name] += 1
      seconds = c.duration / 1e6
      if c.streams.audio:
        tracks += 1
        assert name.split(".")[0] not in audio_ids  # The track stands in for the audio file.
        assert sum(f.samples for f in c.decode(audio=0)) >= 16000
    assert 3.4 <= seconds <= 5.1
  assert set(codecs) == {"mpeg4", "h264"}
  assert tracks == summary["modalities"]["audio_in_video"] >= 1
  rates, exts = collections.Counter(), collections.Counter()
  for name in audios:
    if f"audios/{name}" in damaged:
      continue
    frames = _decode_av(os.path.join(out, "audios", name), "audio")
    rate = frames[0].sample_rate
    assert len(frames[0].layout.channels) == 1
    assert 1.9 <= sum(f.samples for f in frames) / rate <= 4.2
    rates[rate] += 1
    exts[name.split(".")[1]] += 1
  assert set(rates) == {16000, 22050} and set(exts) == {"mp3", "wav"}


def test_damaged_files_exist_and_are_undecodable(raw):
  out, summary = raw
  kinds = collections.Counter(d["kind"] for d in summary["damaged"])
  assert set(kinds) == set(synthetic.DAMAGE_KINDS)
  for d in summary["damaged"]:
    path = os.path.join(out, d["path"])
    modality = synthetic.DAMAGE_KINDS[d["kind"]][0]
    assert os.path.exists(path), d
    assert _undecodable(path, modality), d
  assert os.path.getsize(os.path.join(out, next(
      d["path"] for d in summary["damaged"] if d["kind"] == "empty_mp4"))) == 0
  # At least 2 per kind from 200 products on; none when asked for none (planning alone is cheap).
  plan = synthetic._plan(200, 0, 0.45, 0.45, 0.01, None, 0.0)
  per_kind = collections.Counter(k for it in plan.items() for k in it.damage.values())
  assert min(per_kind[k] for k in synthetic.DAMAGE_KINDS) >= 2
  plan = synthetic._plan(200, 0, 0.45, 0.45, 0.0, None, 0.0)
  assert not plan.damage.any()


def test_same_seed_same_bytes_other_seed_differs(raw, tmp_path):
  out, _ = raw
  again = str(tmp_path / "again")
  synthetic.generate(again, N, seed=SEED, num_threads=1)  # Threads must not matter either.
  assert _hashes(out) == _hashes(again)
  other = str(tmp_path / "other")
  synthetic.generate(other, 16, seed=SEED + 1, video_fraction=0.0, audio_fraction=0.0)
  assert _load(other)["train"] != _load(out)["train"]


def test_categories_are_long_tailed(raw):
  _, summary = raw
  sizes = sorted(summary["category_sizes"], reverse=True)
  assert sum(sizes) == N
  assert sizes[0] >= 3 * sizes[-1]
  assert sizes[-1] >= 4
  # At demo scale: C = N // 40 categories, head ~10x the tail.
  plan = synthetic._plan(1200, 0)
  assert len(plan.cats) == 30
  sizes = sorted(_category_sizes(plan))
  assert len(sizes) == 30 and sizes[-1] >= 8 * sizes[0] and sizes[0] >= 4


def test_fine_groups_have_several_members(raw):
  out, _ = raw
  splits = _load(out)
  entries = {**splits["train"], **splits["test"]}
  split_of = {i: s for s, e in splits.items() for i in e}
  with open(os.path.join(out, "fine_groups.json"), encoding="utf-8") as f:
    groups = json.load(f)
  members = collections.defaultdict(list)
  for item_id, group in groups.items():
    members[group].append(item_id)
  assert len(members) >= 5
  for ids in members.values():
    assert 2 <= len(ids) <= 4
    assert len({split_of[i] for i in ids}) == 1  # A product is never split across train/test.
    assert len({entries[i].get("label", -1) for i in ids} - {-1}) <= 1  # One category.
  gallery = set(_ids(out, "fine_gallery"))
  fine_query = _ids(out, "fine_query")
  assert fine_query
  for q in fine_query:
    assert any(m in gallery for m in members[groups[q]] if m != q)
  # Listings of one product share brand and colour in their tables.
  for ids in members.values():
    tables = [dict(p.split("#:#", 1) for p in entries[i]["pv"].split("#;#") if "#:#" in p)
              for i in ids]
    brands = {t.get("品牌") for t in tables} - {None}
    assert len(brands) <= 1


def test_presence_fractions(raw):
  out, summary = raw
  m = summary["modalities"]
  n_images = len(os.listdir(os.path.join(out, "images")))
  n_videos = len(os.listdir(os.path.join(out, "videos")))
  n_audios = len(os.listdir(os.path.join(out, "audios")))
  assert (n_images, n_videos, n_audios) == (m["image"], m["video"], m["audio_mp3"] + m["audio_wav"])
  assert 0.95 * N <= n_images < N
  assert 0.3 * N <= n_videos <= 0.6 * N
  assert 0.3 * N <= n_audios <= 0.6 * N
  train = _load(out)["train"]
  assert sum(e.get("label") == -1 for e in train.values()) >= 1
  assert sum("label" not in e for e in train.values()) >= 1
  entries = [e for s in _load(out).values() for e in s.values()]
  assert sum(e["title"] == "" for e in entries) == m["title_empty"] >= 1
  assert sum(e["pv"] == "" for e in entries) == m["pv_empty"] >= 1
  assert m["title_noisy"] == round(0.1 * N)
  bad = [pv for pv in (e["pv"] for e in entries) if pv and any(
      "#:#" not in p or p.startswith("#:#") or p.endswith("#:#") for p in pv.split("#;#"))]
  assert len(bad) >= 3


def test_each_modality_carries_the_category(raw):
  """Nearest class mean on raw pixels / bag of words beats chance by far."""
  out, _ = raw
  splits = _load(out)
  train = {k: v["label"] for k, v in splits["train"].items() if v.get("label", -1) >= 0}
  test = {k: v["label"] for k, v in splits["test"].items()}

  def image(item_id):
    path = os.path.join(out, "images", f"{item_id}.jpg")
    if not os.path.exists(path) or _undecodable(path, "image"):
      return None
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB").resize((32, 32)), np.float32).ravel() / 255

  def words(item_id, key):
    entry = splits["train"].get(item_id) or splits["test"][item_id]
    text = entry[key].replace("#;#", " ").replace("#:#", "=")
    return text.split()

  def accuracy(features):
    xs = {k: features(k) for k in list(train) + list(test)}
    tr = [(xs[k], y) for k, y in train.items() if xs[k] is not None]
    te = [(xs[k], y) for k, y in test.items() if xs[k] is not None]
    x_tr = np.stack([x for x, _ in tr])
    y_tr = np.array([y for _, y in tr])
    means = {c: x_tr[y_tr == c].mean(0) for c in set(y_tr)}
    right = [min(means, key=lambda c: ((x - means[c]) ** 2).sum()) == y for x, y in te]
    return float(np.mean(right))

  vocab = {}
  for key in ("title", "pv"):
    for k in list(train) + list(test):
      for w in words(k, key):
        vocab.setdefault(w, len(vocab))

  def bag(key):
    def f(item_id):
      v = np.zeros(len(vocab), np.float32)
      v[[vocab[w] for w in words(item_id, key)]] = 1
      return v
    return f

  assert accuracy(image) > 0.6
  assert accuracy(bag("title")) > 0.5
  assert accuracy(bag("pv")) > 0.5


def test_corrupt_modality_changes_only_that_modality(raw, tmp_path):
  out, _ = raw
  bad = str(tmp_path / "corrupt")
  s = synthetic.generate(bad, N, seed=SEED, corrupt_modality="image", corrupt_fraction=0.3)
  assert s["corrupt_modality"] == "image"
  base, new = _hashes(out), _hashes(bad)
  changed = {p for p in base if base[p] != new.get(p)} - {synthetic.MARKER}
  assert set(base) == set(new)
  assert changed and all(p.startswith("images/") for p in changed)
  assert {p[len("images/"):-4] for p in changed} <= set(s["corrupted_items"])
  assert 0.2 * N <= len(s["corrupted_items"]) <= 0.4 * N
  with pytest.raises(ValueError):
    synthetic.generate(str(tmp_path / "x"), N, corrupt_modality="smell", corrupt_fraction=0.1)


def test_refuses_a_foreign_folder_and_cli_runs(tmp_path):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    synthetic.generate(str(foreign), 16)
  assert (foreign / "notes.txt").exists()
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "make_synthetic.py"), f"--output_dir={out}",
       "--num_products=24", "--seed=1", "--video_fraction=0.2", "--audio_fraction=0.2",
       "--image_size=16", "--num_categories=5", "--zipf_exponent=0.5", "--group_size_range=2,3",
       "--caption_quality=0.8,0.1,0.1", "--feature_fraction=0.5", "--feature_only_fraction=0.5",
       "--split_format=jsonl", "--log_every=0"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "wrote 24 items" in proc.stdout and "items/s, peak RSS" in proc.stdout
  assert (out / "train_id_label.jsonl").exists() and not (out / "train_id_label.json").exists()
  assert os.listdir(out / "image_feature")
  assert synthetic.load_summary(str(out))["summary"]["num_categories"] == 5
  # Regenerating into a generated folder replaces it.
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "make_synthetic.py"), f"--output_dir={out}",
       "--num_products=16", "--seed=1", "--log_every=0"], capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sum(len(json.loads((out / f"{s}_id_label.json").read_text())) for s in ("train", "test")) == 16
  assert not list(out.glob("*.jsonl")) and not os.listdir(out / "image_feature")


# ---------------------------------------------------------------------------
# Knobs, features, split files, bounded memory.


def test_num_categories_and_zipf_exponent(tmp_path):
  plan = synthetic._plan(2000, 0, num_categories=100, zipf_exponent=0.0)
  sizes = _category_sizes(plan)
  assert len(plan.cats) == 100 and sum(sizes) == 2000 and max(sizes) - min(sizes) <= 1
  steep = sorted(_category_sizes(synthetic._plan(2000, 0, num_categories=20, zipf_exponent=1.5)))
  mild = sorted(_category_sizes(synthetic._plan(2000, 0, num_categories=20)))
  assert steep[-1] / steep[0] > 2 * mild[-1] / mild[0]
  # Synthesized categories stay apart: names and pictures up to 400, sounds up to 120.
  cats = synthetic._make_categories(synthetic.MAX_SYNTH_CATEGORIES, np.random.default_rng(0))
  assert len({c.name for c in cats}) == 400
  assert len({(c.shape, c.pattern, c.hue) for c in cats}) == 400
  assert len({(c.pitch_hz, c.tempo, c.chord) for c in cats[:120]}) == 120
  variant = next(c for c in cats if c.name not in {f"{e[0]} {e[1]}" for e in synthetic.CATEGORY_POOL})
  title = synthetic.make_title(variant, synthetic._make_instance(0, variant, 1, "train", 0),
                               np.random.default_rng(0))
  assert any(w in title for m in synthetic.MODIFIERS for w in (m[0], *m[2], m[3]))
  with pytest.raises(ValueError, match="num_categories"):
    synthetic.generate(str(tmp_path / "x"), 1000, num_categories=401)
  with pytest.raises(ValueError, match="num_categories"):
    synthetic.generate(str(tmp_path / "x"), 20, num_categories=21)


def test_attributes_and_instance_groups(tmp_path):
  plan = synthetic._plan(1000, 0, attributes_per_category=5, multi_listing_fraction=0.6,
                         group_size_range=(3, 5))
  assert all(len(c.keys) == 5 for c in plan.cats) and len(plan.instance(0).attrs) == 5
  multi = plan.inst_items[plan.inst_items > 1]
  assert multi.max() <= 5 and np.mean(multi >= 3) > 0.9  # Shorter only where a category runs out.
  assert 0.5 < len(multi) / len(plan.inst_items) < 0.7
  assert (synthetic._plan(300, 0, multi_listing_fraction=0.0).inst_items == 1).all()
  with pytest.raises(ValueError, match="group_size_range"):
    synthetic.generate(str(tmp_path / "x"), 100, group_size_range=(1, 3))
  with pytest.raises(ValueError, match="attributes_per_category"):
    synthetic.generate(str(tmp_path / "x"), 100, attributes_per_category=6)


def test_caption_quality_mix(tmp_path):
  n, mix = 80, (0.6, 0.25, 0.15)
  out = tmp_path / "captions"
  s = _small(out, n, caption_quality=mix, video_fraction=0.0, audio_fraction=0.0)
  m = s["modalities"]
  assert (m["title_noisy"], m["title_poor"]) == (round(0.25 * n), round(0.15 * n))
  plan = synthetic._plan(n, 0, 0.0, 0.0, caption_quality=mix)
  splits = _load(str(out))
  entries = {**splits["train"], **splits["test"]}
  names_own = collections.defaultdict(list)  # Does the title name the item's own category?
  for it in plan.items():
    cat = plan.cats[plan.inst_category[it.instance]]
    names_own[it.title_mode].append(cat.zh in entries[it.item_id]["title"])
  assert len(names_own["poor"]) == m["title_poor"]
  assert np.mean(names_own["ok"]) > 0.6 and np.mean(names_own["poor"]) < 0.2
  with pytest.raises(ValueError, match="caption_quality"):
    synthetic.generate(str(tmp_path / "x"), 100, caption_quality=(0.5, 0.1, 0.1))


FEATURE_KW = dict(image_size=16, video_fraction=0.5, audio_fraction=0.5, feature_fraction=0.75,
                  feature_only_fraction=0.6)


@pytest.fixture(scope="module")
def feat(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("features") / "raw")
  summary = synthetic.generate(out, 160, seed=1, **FEATURE_KW)
  plan = synthetic._plan(160, 1, 0.5, 0.5, feature_fraction=0.75, feature_only_fraction=0.6)
  return out, summary, plan


def _feature(out, modality, item_id):
  path = os.path.join(out, synthetic.FEATURE_DIRS[modality], f"{item_id}.npy")
  return np.load(path, allow_pickle=False) if os.path.exists(path) else None


def test_feature_files(feat):
  out, s, plan = feat
  m = s["modalities"]
  stems = {sub: {name.split(".")[0] for name in os.listdir(os.path.join(out, sub))}
           for sub in synthetic.MEDIA_DIRS.values()}
  damaged = _damaged(s)
  assert m["feature_only"] == plan.feature_only.sum() >= 40
  assert 0.7 * 160 <= plan.features.sum() <= 0.8 * 160
  for it in plan.items():
    has = {"image": it.image, "video": it.video, "audio": it.audio is not None}
    for modality, present in has.items():
      x = _feature(out, modality, it.item_id)
      assert (x is not None) == (it.features and present), (it, modality)
      if x is None:
        continue
      assert x.dtype == np.float32 and np.isfinite(x).all()
      if modality == "image":
        assert x.shape == synthetic.IMAGE_FEATURE_SHAPE
      elif modality == "video":
        assert x.shape[1] == synthetic.VIDEO_FEATURE_DIM and 4 <= x.shape[0] <= 5
        path = os.path.join(out, "videos", f"{it.item_id}.mp4")
        if os.path.exists(path) and f"videos/{it.item_id}.mp4" not in damaged:
          with av.open(path) as c:  # One row per started second of the clip.
            stream = c.streams.video[0]
            assert x.shape[0] == int(np.ceil(stream.frames / float(stream.average_rate)))
      else:
        assert x.shape[1] == synthetic.AUDIO_FEATURE_DIM and 2 <= x.shape[0] <= 4
    if it.feature_only:  # Features instead of media.
      assert not any(it.item_id in names for names in stems.values())
    else:
      assert it.image == (it.item_id in stems["images"])
      assert it.video == (it.item_id in stems["videos"])
  for modality, sub in synthetic.FEATURE_DIRS.items():
    assert len(os.listdir(os.path.join(out, sub))) == m[f"{modality}_feature"] > 0
  assert m["image"] == len(stems["images"])
  assert not any(it.feature_only and it.damage for it in plan.items())


def test_features_carry_category_and_product(feat):
  """Class means of the features tell categories apart; group-mates are nearest neighbours."""
  out, _, plan = feat
  for modality in synthetic.FEATURE_DIRS:
    xs, labels, owners = [], [], []
    for it in plan.items():
      x = _feature(out, modality, it.item_id)
      if x is not None:
        xs.append(x.mean(0) if modality != "image" else x.ravel())
        labels.append(int(plan.inst_category[it.instance]))
        owners.append(it.instance)
    x, y, g = np.stack(xs), np.array(labels), np.array(owners)
    means = np.stack([x[y == c].mean(0) if (y == c).any() else np.full(x.shape[1], np.inf)
                      for c in range(len(plan.cats))])
    predicted = ((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert np.mean(predicted == y) > 0.8, modality
    if modality == "image":
      d = ((x[:, None] - x[None]) ** 2).sum(-1)
      np.fill_diagonal(d, np.inf)
      grouped = [i for i in range(len(g)) if (g == g[i]).sum() > 1]
      assert len(grouped) >= 10
      assert np.mean([g[d[i].argmin()] == g[i] for i in grouped]) > 0.6


def test_jsonl_split_files(tmp_path):
  a, b = tmp_path / "json", tmp_path / "jsonl"
  kw = dict(seed=2, image_size=16, video_fraction=0.0, audio_fraction=0.0)
  synthetic.generate(str(a), 24, split_format="json", **kw)
  s = synthetic.generate(str(b), 24, split_format="jsonl", **kw)
  assert s["split_files"] == "jsonl"
  for split in ("train", "test"):
    assert not (b / f"{split}_id_label.json").exists()
    with open(b / f"{split}_id_label.jsonl", encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    expected = json.loads((a / f"{split}_id_label.json").read_text(encoding="utf-8"))
    assert [r["item_id"] for r in rows] == list(expected)
    assert {r.pop("item_id"): r for r in rows} == expected
  # Regenerating as json replaces the jsonl files; everything else was the same already.
  synthetic.generate(str(b), 24, split_format="json", **kw)
  ha, hb = _hashes(str(a)), _hashes(str(b))
  del ha[synthetic.MARKER], hb[synthetic.MARKER]
  assert ha == hb
  with pytest.raises(ValueError, match="split_format"):
    synthetic.generate(str(tmp_path / "x"), 24, split_format="csv")


def test_summary_and_marker_do_not_grow_with_n(tmp_path):
  """Per-item lists are capped (counts stay exact), so a 1M-item marker stays small."""
  sizes = {}
  for n in (40, 160):
    out = tmp_path / str(n)
    s = _small(out, n, damaged_fraction=0.3, corrupt_modality="table", corrupt_fraction=0.5,
               summary_list_cap=3)
    assert len(s["damaged"]) == 3 < s["damaged_count"] == sum(s["damaged_by_kind"].values())
    assert len(s["corrupted_items"]) == 3 < s["corrupted_count"]
    sizes[n] = len((out / synthetic.MARKER).read_bytes())
    stored = synthetic.load_summary(str(out))["summary"]
    assert stored["damaged_count"] == s["damaged_count"] and len(stored["damaged"]) == 3
  assert abs(sizes[160] - sizes[40]) < 200


def test_planning_holds_small_arrays_only():
  """Planning memory per item is a few numbers, not Python objects (1M items must fit)."""
  import tracemalloc
  peaks = {}
  for n in (1000, 5000):
    tracemalloc.start()
    try:
      plan = synthetic._plan(n, 0)
      peaks[n] = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert len(plan) == n
  assert (peaks[5000] - peaks[1000]) / 4000 < 400  # Bytes per item; objects would be > 1000.


def test_writer_window_bounds_pending_items():
  consumed = []

  def indices():
    for j in range(50):
      consumed.append(j)
      yield j

  results = synthetic._ordered_map(lambda j: j * j, indices(), num_threads=2, window=4)
  for k, r in enumerate(results):
    assert r == k * k and len(consumed) <= k + 4
  assert len(consumed) == 50
