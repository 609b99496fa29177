r"""What converting M5Product costs: products/s of the converter on a synthetic raw set, extrapolated.

  python tools/benchmark_convert.py [--num_products=300] [--workers=0,1,2] [--config=demo]
      [--image_size=64] [--video_seconds=0 --video_fps=25] [--raw_dir=RAW] [--work_dir=DIR]

Generates a synthetic raw M5Product with real media (JPEG images, MP4 videos,
MP3/WAV audio; m5p/data/synthetic.py), converts it with `m5p.data.convert`
once per --workers value (0 = media decoded in the converting process
itself), and prints products/s, products/s per core, the CPU seconds a
product costs (this process and its decoder processes, from rusage: less
sensitive than wall time to other load on a shared machine), where the time
goes (tokenizer, records; per-modality decoding when workers=0), and the
cost of converting --total_products: hours on one core, core-hours, and the
wall time on --cores_list cores.

The synthetic media are small and short (images --image_size px, videos
3.5-5 s at 4-6 fps); real M5Product images are larger and videos longer and
denser, and decoding cost grows with both. The tool prints the raw set's
bytes per item, resolutions and durations so the extrapolation can be
judged; --image_size and --video_seconds/--video_fps (re-encode every video
as H.264 of that length and rate, looping its frames) move the synthetic set
towards real sizes.
"""
from __future__ import annotations

import collections
import contextlib
import logging as pylogging
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

flags.DEFINE_integer("num_products", 300, "Products of the generated synthetic set.")
flags.DEFINE_integer("image_size", 64, "Side of the generated images and video frames (the demo's "
                     "generator setting: m5p.prepare calls synthetic.generate with its default, 64).")
flags.DEFINE_float("video_seconds", 0.0, "Re-encode every video to this many seconds, looping its "
                   "frames (0: keep the generated 3.5-5 s clips).")
flags.DEFINE_integer("video_fps", 25, "Frame rate of the re-encoded videos (with --video_seconds).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Converter media-decoding processes to try (0: in-process).")
flags.DEFINE_string("config", "demo", "Config whose data settings the converter writes (image size, "
                    "frames, audio, vocabulary, shards): a name in configs/ or a path.")
flags.DEFINE_string("raw_dir", None, "Convert this raw layout instead of generating one.")
flags.DEFINE_string("work_dir", None, "Where the raw set and conversions go (default: a temporary "
                    "folder, removed at the end). A raw set there from the same flags is reused.")
flags.DEFINE_float("total_products", 6.3e6, "Products to extrapolate to (M5Product: about 6.3M).")
flags.DEFINE_list("cores_list", ["100", "1000"], "Core counts to give the extrapolated wall time for.")
FLAGS = flags.FLAGS

_MEDIA_STAGES = {"load_image_jpeg": "decode image -> JPEG", "load_video_frames": "decode video -> frames",
                 "load_audio_logmel": "decode audio -> log-mel", "load_feature": "load features .npy"}


# ---------------------------------------------------------------------------
# The raw set.

def make_raw(raw_dir: str, num_products: int, image_size: int, video_seconds: float,
             video_fps: int, log: Callable[[str], None] = print) -> None:
  """Generates the synthetic set (reused when `raw_dir` holds one from the same arguments)."""
  from m5p.data import synthetic
  done = synthetic.load_summary(raw_dir)
  stretched = os.path.join(raw_dir, ".m5p_bench_videos")
  want = f"{video_seconds:g}s@{video_fps}"
  same = done and done["params"].get("num_products") == num_products and \
      done["params"].get("image_size") == image_size
  if same and _read(stretched) == (want if video_seconds else None):
    log(f"reusing the synthetic set in {raw_dir}")
    return
  with contextlib.suppress(FileNotFoundError):
    os.remove(stretched)
  t0 = time.perf_counter()
  synthetic.generate(raw_dir, num_products, seed=0, image_size=image_size, overwrite=True)
  log(f"generated {num_products} products at {image_size} px in {time.perf_counter() - t0:.1f} s "
      f"-> {raw_dir}")
  if video_seconds > 0:
    t0 = time.perf_counter()
    n = stretch_videos(os.path.join(raw_dir, "videos"), video_seconds, video_fps)
    with open(stretched, "w", encoding="utf-8") as f:
      f.write(want)
    log(f"re-encoded {n} videos to {video_seconds:g} s at {video_fps} fps (H.264) in "
        f"{time.perf_counter() - t0:.1f} s")


def _read(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


def stretch_videos(video_dir: str, seconds: float, fps: int) -> int:
  """Rewrites each decodable video as `seconds` s of H.264 at `fps`, its frames (and sound) looped.

  The generated clips are 3.5-5 s at 4-6 fps; the converter decodes up to
  max_frames seconds of each video, so longer, denser clips cost it more.
  Damaged files (undecodable on purpose) are left as they are.
  """
  import av
  from m5p.data import media
  count = 0
  for name in sorted(os.listdir(video_dir)):
    path = os.path.join(video_dir, name)
    try:
      with av.open(path) as c:
        stream = c.streams.video[0]
        src_fps = float(stream.average_rate or 4)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    except Exception:  # pylint: disable=broad-except
      continue
    if not frames:
      continue
    try:
      sound = media.load_audio_samples(path, max_seconds=seconds)
    except Exception:  # pylint: disable=broad-except  (no track, or damaged)
      sound = None
    n_out = max(1, int(round(seconds * fps)))
    out = [frames[int(j * src_fps / fps) % len(frames)] for j in range(n_out)]
    h, w = (d - d % 2 for d in out[0].shape[:2])
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w", format="mp4") as c:
      vs = c.add_stream("libx264", rate=fps)
      vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
      vs.options = {"preset": "veryfast", "crf": "23"}  # B-frames, as usual H.264 uploads.
      astream = None
      if sound is not None and len(sound):
        astream = c.add_stream("aac", rate=media.AUDIO_SAMPLE_RATE)
        astream.layout = "mono"
      for i, pixels in enumerate(out):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:h, :w]), format="rgb24")
        frame.pts = i
        for packet in vs.encode(frame):
          c.mux(packet)
      for packet in vs.encode():
        c.mux(packet)
      if astream is not None:
        wave = np.resize(sound.astype(np.float32), int(seconds * media.AUDIO_SAMPLE_RATE))
        af = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        af.sample_rate = media.AUDIO_SAMPLE_RATE
        for packet in astream.encode(af):
          c.mux(packet)
        for packet in astream.encode(None):
          c.mux(packet)
    os.replace(tmp, path)
    count += 1
  return count


def describe_raw(raw_dir: str) -> dict[str, Any]:
  """Files, bytes and media sizes/durations of a raw set, per modality."""
  import av
  from PIL import Image
  from m5p.data import raw_layout
  items = sum(sum(1 for _ in raw_layout.iter_entries(p)) for p in raw_layout.find_splits(raw_dir).values())
  out: dict[str, Any] = {"items": items, "modalities": {}}
  total = 0
  for sub in ("images", "videos", "audios"):
    folder = os.path.join(raw_dir, sub)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    sizes, dims, durations, rates, bad = [], [], [], [], 0
    for name in names:
      path = os.path.join(folder, name)
      sizes.append(os.path.getsize(path))
      try:
        if sub == "images":
          with Image.open(path) as im:
            dims.append(im.size)
        else:
          with av.open(path) as c:
            s = c.streams.video[0] if sub == "videos" else c.streams.audio[0]
            dur = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            durations.append(dur)
            if sub == "videos":
              rates.append(float(s.average_rate or 0))
              dims.append((s.width, s.height))
            else:
              rates.append(s.rate)
      except Exception:  # pylint: disable=broad-except  (damaged on purpose)
        bad += 1
    total += sum(sizes)
    out["modalities"][sub] = {
        "files": len(names), "unreadable": bad, "bytes_mean": statistics.mean(sizes) if sizes else 0,
        "dims": collections.Counter(dims).most_common(2),
        "seconds_mean": statistics.mean(durations) if durations else 0,
        "seconds_max": max(durations) if durations else 0,
        "rate_mean": statistics.mean(rates) if rates else 0}
  out["bytes_per_item"] = total / max(items, 1)
  return out


# ---------------------------------------------------------------------------
# Conversion.

def _reap_children(timeout: float = 30.0) -> None:
  """Waits for the decoder processes to exit, so that RUSAGE_CHILDREN counts them."""
  end = time.time() + timeout
  while multiprocessing.active_children() and time.time() < end:
    time.sleep(0.05)


def _cpu_seconds() -> float:
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def media_timers(seconds: dict[str, float]):
  """Times m5p.data.media's per-modality decoders (in this process only: workers=0)."""
  from m5p.data import media
  originals = {n: getattr(media, n) for n in _MEDIA_STAGES if hasattr(media, n)}

  def timed(name, fn):
    def run(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        seconds[_MEDIA_STAGES[name]] += time.perf_counter() - t0
    return run

  try:
    for n, fn in originals.items():
      setattr(media, n, timed(n, fn))
    yield
  finally:
    for n, fn in originals.items():
      setattr(media, n, fn)


_TIMED_LINE = re.compile(r"^(\w+): (.*?) in ([0-9.]+) ?s\b")


def run_conversion(raw_dir: str, out_dir: str, config: ml_collections.ConfigDict,
                   workers: int) -> dict[str, Any]:
  """Converts once; returns wall and CPU seconds, the stage times the log lines give, media timings."""
  import tensorflow_datasets as tfds
  from m5p.data import convert
  tfds.disable_progress_bar()
  d = config.data
  lines: list[str] = []
  media_s: dict[str, float] = collections.defaultdict(float)
  _reap_children()
  cpu0, t0 = _cpu_seconds(), time.perf_counter()
  with media_timers(media_s) if workers == 0 else contextlib.nullcontext():
    manifest = convert.convert(raw_dir, out_dir, image_size=d.image_size, max_frames=d.max_frames,
                               n_mels=d.n_mels, max_audio_seconds=d.max_audio_seconds,
                               num_shards=d.num_shards, vocab_size=d.vocab_size, workers=workers,
                               overwrite=True, log=lines.append)
  wall = time.perf_counter() - t0
  _reap_children()
  cpu = _cpu_seconds() - cpu0
  stages, tokenizer_lines = {}, None
  for line in lines:
    m = _TIMED_LINE.match(line)
    if m and m.group(1) in ("tokenizer", "records"):
      stages[m.group(1)] = float(m.group(3))
      if m.group(1) == "tokenizer":
        n = re.match(r"(\d+) lines", m.group(2))
        tokenizer_lines = int(n.group(1)) if n else None
  return {"wall_s": wall, "cpu_s": cpu, "items": int(manifest["items_in"]), "stages": stages,
          "tokenizer_lines": tokenizer_lines, "media_s": dict(media_s),
          "manifest_s": manifest.get("conversion", {}).get("seconds")}


# ---------------------------------------------------------------------------
# Report.

def _hours(x: float) -> str:
  if x >= 10:
    return f"{x:,.0f} h"
  return f"{x:.1f} h" if x >= 1 else f"{60 * x:.1f} min"


def _print_raw(info: dict[str, Any], raw_dir: str) -> None:
  print(f"\nraw set {raw_dir}: {info['items']} items, {info['bytes_per_item'] / 1024:.1f} KiB of media "
        "per item on average")
  for sub, m in info["modalities"].items():
    dims = ", ".join(f"{w}x{h} ({n})" for (w, h), n in m["dims"]) or "-"
    extra = ""
    if sub == "videos":
      extra = f", {m['seconds_mean']:.1f} s avg (max {m['seconds_max']:.1f}) at {m['rate_mean']:.1f} fps"
    elif sub == "audios":
      extra = f", {m['seconds_mean']:.1f} s avg (max {m['seconds_max']:.1f}), {m['rate_mean']:.0f} Hz avg"
    print(f"  {sub:7s} {m['files']:5d} files ({m['unreadable']} unreadable), "
          f"{m['bytes_mean'] / 1024:7.1f} KiB avg, {dims}{extra}")


def main(argv):
  del argv
  from m5p.config_loader import load_config
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("m5p").setLevel(pylogging.WARNING)
  cpus = os.cpu_count() or 1
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  print(f"machine: {platform.platform()}, {platform.machine()}, {cpus} CPUs, Python "
        f"{platform.python_version()}, load average {load}", flush=True)
  config = load_config(FLAGS.config)
  d = config.data
  workers = [int(w) for w in FLAGS.workers]
  print(f"converter settings ({FLAGS.config}): {d.image_size} px, {d.max_frames} frames at 1 fps, "
        f"{d.n_mels} mels, {d.max_audio_seconds:g} s audio, vocab {d.vocab_size}, {d.num_shards} shards",
        flush=True)

  results = {}
  with contextlib.ExitStack() as stack:
    work_dir = FLAGS.work_dir
    if work_dir is None:
      work_dir = tempfile.mkdtemp(prefix="m5p_bench_convert_")
      stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
    raw_dir = FLAGS.raw_dir or os.path.join(work_dir, "raw")
    if not FLAGS.raw_dir:
      make_raw(raw_dir, FLAGS.num_products, FLAGS.image_size, FLAGS.video_seconds, FLAGS.video_fps)
    info = describe_raw(raw_dir)
    _print_raw(info, raw_dir)
    for w in workers:
      out = os.path.join(work_dir, f"data_w{w}")
      r = run_conversion(raw_dir, out, config, w)
      shutil.rmtree(out, ignore_errors=True)
      results[w] = r
      print(f"  workers={w}: {r['items']} products in {r['wall_s']:.1f} s "
            f"({r['items'] / r['wall_s']:.1f} products/s, {r['cpu_s']:.1f} CPU s)", flush=True)

  total = FLAGS.total_products
  cores_list = [int(c) for c in FLAGS.cores_list]
  print("\nConverter throughput (cores = min(max(1, workers), CPUs); workers=0 decodes in the converting "
        "process; CPU s = this process + its decoder processes, from rusage; workers > 0 includes "
        "starting the decoder processes, a few seconds each):")
  print(f"  {'workers':>7s} {'cores':>5s} {'wall s':>7s} {'products/s':>10s} {'per core':>9s} "
        f"{'CPU ms/product':>14s} {'tokenizer s':>11s} {'records s':>9s} {'other s':>7s}")
  for w, r in results.items():
    cores = min(max(1, w), cpus)
    st = r["stages"]
    other = max(0.0, r["wall_s"] - sum(st.values()))
    print(f"  {w:7d} {cores:5d} {r['wall_s']:7.1f} {r['items'] / r['wall_s']:10.1f} "
          f"{r['items'] / r['wall_s'] / cores:9.1f} {1e3 * r['cpu_s'] / r['items']:14.1f} "
          f"{st.get('tokenizer', float('nan')):11.1f} {st.get('records', float('nan')):9.1f} {other:7.1f}")

  if 0 in results and results[0]["media_s"]:
    r = results[0]
    rec = r["stages"].get("records", r["wall_s"])
    print(f"\nWhere the records time goes (workers=0, {r['items']} products, wall ms per product):")
    for stage, s in sorted(r["media_s"].items(), key=lambda kv: -kv[1]):
      print(f"  {stage:28s} {1e3 * s / r['items']:8.2f} ms  {100 * s / rec:5.1f}%")
    rest = rec - sum(r["media_s"].values())
    print(f"  {'rest (JSON, serialise, write)':28s} {1e3 * rest / r['items']:8.2f} ms  "
          f"{100 * rest / rec:5.1f}%")

  print(f"\nExtrapolated to {total / 1e6:g}M products (same media as this synthetic set; linear; "
        "wall/core: the records stage's wall time x cores; CPU time: all CPU less the tokenizer's):")
  print(f"  {'from':22s} {'s/product':>9s} {'1 core':>10s} {'core-hours':>10s} "
        + " ".join(f"{f'{c} cores':>10s}" for c in cores_list))
  for w, r in results.items():
    cores = min(max(1, w), cpus)
    rec = r["stages"].get("records", r["wall_s"])
    for label, per in ((f"workers={w} wall/core", rec / r["items"] * cores),
                       (f"workers={w} CPU time", (r["cpu_s"] - r["stages"].get("tokenizer", 0.0))
                        / r["items"])):
      core_h = total * per / 3600
      print(f"  {label:22s} {per:9.4f} {_hours(core_h):>10s} {core_h:10,.0f} "
            + " ".join(f"{_hours(core_h / c):>10s}" for c in cores_list))
  tok = [(r["stages"]["tokenizer"], r["tokenizer_lines"]) for r in results.values()
         if "tokenizer" in r["stages"] and r["tokenizer_lines"]]
  if tok:
    s, n = tok[0]
    print(f"  tokenizer: {s:.1f} s for {n:,} lines here; it trains once, on one core, on at most "
          "2,000,000 lines (MAX_TOKENIZER_LINES), whatever the dataset size")
  m = info["modalities"]
  print(f"  caveat: synthetic media here are {info['bytes_per_item'] / 1024:.0f} KiB/item, images "
        f"{m['images']['dims'][0][0][0] if m['images']['dims'] else '?'} px, videos "
        f"{m['videos']['seconds_mean']:.1f} s at {m['videos']['rate_mean']:.0f} fps; real M5Product "
        "images are larger and videos longer and denser, so these are lower bounds "
        "(see --image_size, --video_seconds, --video_fps)")
  print(f"machine load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  app.run(main)
