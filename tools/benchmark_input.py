r"""Does the Grain input pipeline keep up with the train step? Measures both, and where input time goes.

  python tools/benchmark_input.py                      # demo data + scale_base data, grid 0,1,2 x 0,1,2
  python tools/benchmark_input.py --data_dir=DATA --compare_config= --workers=0 --threads=0,2

Prints (1) examples/s of `m5p.data.pipeline.train_dataset` (the full training
pipeline: shuffle, decode, tokenize, mask, pad, batch) for each
worker_count x read_threads, after warm-up batches; (2) examples/s of the
jitted train step of --config at its batch size on random batches (and of
--compare_config at a small batch, as CPU is too slow for its full batch),
plus the step fed by the pipeline itself; (3) a table of ratios and whether
the pipeline feeds >= --goal x what the --config train step consumes;
(4) a per-record breakdown of the pipeline's stages (read, parse, JPEG
decode, tokenize, mask, pad, batch), timed in one thread.

Without --data_dir a synthetic M5Product (real JPEG/MP4/MP3 media; see
m5p/data/synthetic.py) is generated and converted with each config's data
settings under --work_dir (a temporary folder unless given; reused when it
already holds them). The pipeline is measured alone: in training it shares
the cores with the step, which the 'fed' step figure shows.
"""
from __future__ import annotations

import collections
import contextlib
import logging as pylogging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

# Imported before flags are parsed: Grain defines absl flags its workers read.
from m5p.data import pipeline  # noqa: E402,F401

flags.DEFINE_string("config", "demo", "Config whose pipeline is measured and whose train step is the "
                    "reference consumer: a name in configs/, a path, optionally ':variant'.")
flags.DEFINE_string("data_dir", None, "Converted dataset for --config (default: generate + convert).")
flags.DEFINE_string("compare_config", "scale_base", "Second config: its data settings (image size, "
                    "frames, audio, text lengths) are measured too, and its train step; '' skips both.")
flags.DEFINE_string("compare_data_dir", None, "Converted dataset for --compare_config (default: "
                    "convert the same synthetic raw set with its settings).")
flags.DEFINE_string("work_dir", None, "Where generated data go (default: a temporary folder, removed "
                    "at the end). Reused when it already holds them.")
flags.DEFINE_integer("num_products", None, "Products of the generated set (default: --config's "
                     "data.synthetic_products, the set the demo trains on).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker processes (data.worker_count) to try.")
flags.DEFINE_list("threads", ["0", "1", "2"], "Read threads (data.read_threads) to try.")
flags.DEFINE_integer("num_batches", 20, "Timed batches per pipeline setting.")
flags.DEFINE_integer("warmup_batches", 3, "Batches read before timing (worker start-up, caches).")
flags.DEFINE_integer("compare_num_batches", 5, "Timed batches per setting for --compare_config.")
flags.DEFINE_integer("profile_records", 200, "Records timed stage by stage (0: no breakdown).")
flags.DEFINE_integer("steps", 3, "Timed train steps of --config (0: no step, hence no ratios).")
flags.DEFINE_integer("fed_steps", 5, "Train steps of --config fed by its pipeline at its own "
                     "data settings (0: skip).")
flags.DEFINE_integer("compare_batch_size", 2, "Batch of the --compare_config step measurement.")
flags.DEFINE_integer("compare_steps", 1, "Timed steps of --compare_config (0: skip its step; slow "
                     "on CPU: minutes to compile).")
flags.DEFINE_float("goal", 3.0, "Wanted ratio of pipeline examples/s to the train step's.")
FLAGS = flags.FLAGS

_PROFILE_WARMUP = 8  # Records read untimed before the per-stage profile.
_MAX_SHARDS = 8  # Generated sets are small; the configs' 256 shards would hold ~2 records each.


# ---------------------------------------------------------------------------
# Data.

def _data_tag(config: ml_collections.ConfigDict) -> str:
  d = config.data
  return f"s{d.image_size}_f{d.max_frames}_m{d.n_mels}_a{d.max_audio_seconds:g}_v{d.vocab_size}"


def make_dataset(config: ml_collections.ConfigDict, work_dir: str, num_products: int,
                 log: Callable[[str], None] = print) -> str:
  """Generates (once) a synthetic raw set and converts it with `config`'s data settings; returns it."""
  import tensorflow_datasets as tfds
  from m5p.data import convert, synthetic
  tfds.disable_progress_bar()
  raw = os.path.join(work_dir, "raw")
  done = synthetic.load_summary(raw)
  if not (done and done["params"].get("num_products") == num_products):
    t0 = time.perf_counter()
    synthetic.generate(raw, num_products, seed=0, overwrite=done is not None)
    log(f"generated {num_products} synthetic products in {time.perf_counter() - t0:.1f} s -> {raw}")
  out = os.path.join(work_dir, f"data_{_data_tag(config)}_n{num_products}")
  if not os.path.exists(os.path.join(out, convert.MANIFEST)):
    d = config.data
    t0 = time.perf_counter()
    convert.convert(raw, out, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                    max_audio_seconds=d.max_audio_seconds, num_shards=min(d.num_shards, _MAX_SHARDS),
                    vocab_size=d.vocab_size, overwrite=True, log=lambda *a: None)
    log(f"converted at {d.image_size} px / {d.max_frames} frames in {time.perf_counter() - t0:.1f} s "
        f"-> {out}")
  return out


# ---------------------------------------------------------------------------
# Pipeline throughput.

def _close(it) -> None:
  """Stops Grain's workers and threads, and waits for batches still being made.

  `close()` leaves running prefetch tasks to finish in the background; they
  would compete with the next measurement for the cores.
  """
  if hasattr(it, "close"):
    it.close()
  executor = getattr(it, "_executor", None)  # Grain 0.2's thread prefetch.
  if executor is not None:
    executor.shutdown(wait=True)


def cpu_seconds() -> float:
  """CPU time of this process (all threads) and its live children (Grain's workers).

  Beside wall time because the machine may be shared: CPU time says what
  the work costs, wall time what it got.
  """
  t = time.process_time()
  try:
    import psutil
    for child in psutil.Process().children(recursive=True):
      with contextlib.suppress(psutil.Error):
        c = child.cpu_times()
        t += c.user + c.system
  except ImportError:
    pass
  return t


def pipeline_rate(config: ml_collections.ConfigDict, data_dir: str, workers: int, threads: int,
                  num_batches: int, warmup_batches: int) -> dict[str, float]:
  """Examples/s of the training pipeline with these settings, timed after warm-up."""
  config = config.copy_and_resolve_references()
  config.data.worker_count, config.data.read_threads = workers, threads
  t0 = time.perf_counter()
  it = iter(pipeline.train_dataset(config, data_dir))
  try:
    for _ in range(warmup_batches):
      next(it)
    c1, t1 = cpu_seconds(), time.perf_counter()
    for _ in range(num_batches):
      next(it)
    c2, t2 = cpu_seconds(), time.perf_counter()
  finally:
    _close(it)
  n = num_batches * config.batch_size
  return {"examples_s": n / (t2 - t1), "warmup_s": t1 - t0, "seconds": t2 - t1,
          "cpu_ms": 1e3 * (c2 - c1) / n, "cores": (c2 - c1) / (t2 - t1)}


# ---------------------------------------------------------------------------
# Train step.

def measure_step(config: ml_collections.ConfigDict, batch_size: int, steps: int,
                 data_dir: str | None = None, fed_steps: int = 0) -> dict[str, float]:
  """Seconds of the jitted train step (as tools/benchmark.py, on a random batch).

  With `data_dir`, also `fed_steps` steps whose batches come from the training
  pipeline at the config's settings (host -> device copy included), started
  after compiling: the pipeline then works flat out beside the step (filling
  its prefetch buffer), the worst case of the two sharing the cores.
  """
  import jax
  from flax import linen as nn
  from m5p import optim, sharding, state as state_lib
  from m5p.data import batch_spec
  from m5p.models.scale import ScaleModel
  from m5p.train import jit_train_step

  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  t0 = time.perf_counter()
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  init_s = time.perf_counter() - t0
  batch_shard = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_shard)
           for k, v in batch_spec.random_batch(config, batch_size).items()}
  out: dict[str, float] = {"params_m": state_lib.num_params(state.params) / 1e6, "init_s": init_s}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    step = jit_train_step(model, tx, schedule, config, shardings, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    out["compile_s"] = time.perf_counter() - t0
    state, m = compiled(state, batch)  # Warm-up.
    jax.block_until_ready(m)
    times = []
    c0 = cpu_seconds()
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    out["cores"] = (cpu_seconds() - c0) / sum(times)
    out["step_s"] = statistics.median(times)
    out["examples_s"] = batch_size / out["step_s"]
    out["loss"] = float(m["loss"])
    if data_dir is not None and fed_steps > 0:
      feed = iter(pipeline.train_dataset(config, data_dir))
      try:
        state, m = compiled(state, {k: jax.device_put(v, batch_shard) for k, v in next(feed).items()})
        jax.block_until_ready(m)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(fed_steps):
          b = {k: jax.device_put(v, batch_shard) for k, v in next(feed).items()}
          state, m = compiled(state, b)
          jax.block_until_ready(m)  # As the training loop, which logs metrics.
        out["fed_step_s"] = (time.perf_counter() - t0) / fed_steps
        out["fed_cores"] = (cpu_seconds() - c0) / (out["fed_step_s"] * fed_steps)
        out["fed_examples_s"] = batch_size / out["fed_step_s"]
      finally:
        _close(feed)
  return out


# ---------------------------------------------------------------------------
# Per-stage profile.

class StageTimer:
  """Exclusive time per named stage: nested timed calls are not counted twice.

  The default clock is the thread's CPU time: on a shared, loaded machine
  wall time would also count the other processes' turns on the cores.
  """

  def __init__(self, clock: Callable[[], float] = time.thread_time):
    self.clock = clock
    self.enabled = True
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self._children: list[float] = []
    self._thread = threading.get_ident()  # Calls from other threads are not timed.

  def wrap(self, name: str, fn: Callable) -> Callable:
    def timed(*args, **kwargs):
      if not self.enabled or threading.get_ident() != self._thread:
        return fn(*args, **kwargs)
      self._children.append(0.0)
      t0 = self.clock()
      try:
        return fn(*args, **kwargs)
      finally:
        dt = self.clock() - t0
        self.seconds[name] += dt - self._children.pop()
        if self._children:
          self._children[-1] += dt
    return timed

  def time(self, name: str, fn: Callable, *args, **kwargs):
    return self.wrap(name, fn)(*args, **kwargs)


_DECODE_STAGE = {"image": "decode image JPEG", "video": "decode video frames JPEG",
                 "audio": "decode audio log-mel bytes"}


def _decode_stage(feature: str) -> str:
  if feature in _DECODE_STAGE:
    return _DECODE_STAGE[feature]
  return "decode precomputed features" if "_feature" in feature else "decode text/ids fields"


def profile_stages(config: ml_collections.ConfigDict, data_dir: str, num_records: int) -> dict[str, Any]:
  """Times each stage of reading + preprocessing `num_records` train records in one thread.

  Read = the ArrayRecord bytes; parse = tf.Example -> numpy; decode per TFDS
  feature; then the Preprocessor's methods, with tokenizer calls and masking
  draws taken out of them into stages of their own; batch = stacking each
  batch of the config's size as it fills (what Grain's batch does). A few records go
  through first, untimed: the first ones load libraries and fill caches.
  """
  from m5p.data import convert, masking
  from m5p.data.preprocess import Preprocessor
  from m5p.data.tokenizer import Tokenizer

  timer = StageTimer()
  src = convert.open_split(data_dir, config.data.train_split)
  n = min(num_records, len(src))
  pre = Preprocessor(config, convert.tokenizer_path(data_dir), train=True)
  tok = Tokenizer(pre.tokenizer_path)
  tok.encode = timer.wrap("tokenize (title, table)", tok.encode)
  pre._tokenizer = tok  # pylint: disable=protected-access
  for name, stage in (("_text", "text: ids, pad"), ("_table", "table: ids, segments, pad"),
                      ("_image", "image: resize if needed"), ("_video", "video: stack, pad frames"),
                      ("_audio", "audio: standardise, pad")):
    setattr(pre, name, timer.wrap(stage, getattr(pre, name)))
  raw_source = getattr(src, "data_source", None)
  features = getattr(getattr(src, "dataset_info", None), "features", None)
  rng = np.random.default_rng(0)

  def read(i: int) -> dict:
    if raw_source is None or features is None:  # Unknown data source: one stage for all of it.
      return timer.time("read + decode record", src.__getitem__, i)
    raw = timer.time("read record (ArrayRecord)", raw_source.__getitem__, i)
    parsed = timer.time("parse tf.Example -> numpy",
                        features._example_parser_np.parse_example, raw)  # pylint: disable=protected-access
    return {k: timer.time(_decode_stage(k), features[k].decode_example_np, v) for k, v in parsed.items()}

  stack = timer.wrap("batch (stack examples)", lambda c: {k: np.stack([e[k] for e in c]) for k in c[0]})
  b = max(1, config.batch_size)
  chunk, stats = [], collections.Counter()
  originals = {f: getattr(masking, f) for f in ("mlm", "mem", "zero_tokens")}
  try:
    for f, fn in originals.items():
      setattr(masking, f, timer.wrap("mask (MLM, MEM, zeroed tokens)", fn))
    timer.enabled = False
    for i in range(min(_PROFILE_WARMUP, len(src))):
      pre((i, read(i)), rng)
    timer.enabled = True
    t0 = time.perf_counter()
    for i in range(n):
      record = read(i)
      stats["image"] += len(record["image"]) > 0
      stats["video"] += len(record["video"]) > 0
      stats["frames"] += len(record["video"])
      stats["audio"] += len(record["audio"]) > 0
      stats["audio_rows"] += len(record["audio"])
      chunk.append(pre((i, record), rng))
      if len(chunk) == b or i == n - 1:  # Batched as made, as Grain does (the last batch short).
        stack(chunk)
        chunk = []
    wall = time.perf_counter() - t0
  finally:
    for f, fn in originals.items():
      setattr(masking, f, fn)
  return {"records": n, "seconds": dict(timer.seconds), "wall_s": wall, "stats": dict(stats)}


# ---------------------------------------------------------------------------
# Report.

def _machine() -> str:
  import jax
  cpus = os.cpu_count()
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = cpus
  load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
  devices = jax.devices()
  return (f"machine: {platform.platform()}, {platform.machine()}, {cpus} CPUs ({usable} usable), "
          f"Python {platform.python_version()}, load average {load}\n"
          f"JAX {jax.__version__} devices: {len(devices)} x {devices[0].device_kind} "
          f"({devices[0].platform})")


def _describe(config: ml_collections.ConfigDict, name: str) -> str:
  d = config.data
  return (f"{name}: batch {config.batch_size}, images/frames {d.image_size} px, {d.max_frames} frames, "
          f"audio {d.audio_frames}x{d.n_mels}, text {d.text_len}, table {d.table_len}, "
          f"default worker_count={d.worker_count} read_threads={d.read_threads}")


def _print_profile(name: str, prof: dict[str, Any], measured: float | None) -> None:
  n, secs, st = prof["records"], prof["seconds"], prof["stats"]
  total = sum(secs.values())
  print(f"\nWhere the time goes ({name}; {n} train records in one thread; thread CPU time per example):")
  print(f"  {'stage':34s} {'ms/example':>10s} {'share':>7s}")
  for stage, s in sorted(secs.items(), key=lambda kv: -kv[1]):
    print(f"  {stage:34s} {1e3 * s / n:10.3f} {100 * s / total:6.1f}%")
  print(f"  {'total (CPU)':34s} {1e3 * total / n:10.3f} {100.0:6.1f}%  = {n / total:.0f} examples/s "
        "per core")
  print(f"  {'total (wall, incl. timers)':34s} {1e3 * prof['wall_s'] / n:10.3f}")
  if measured:
    print(f"  the pipeline with 0 workers / 0 threads (one thread, wall) measured {1e3 / measured:.3f} "
          f"ms/example ({measured:.0f} examples/s): Grain's shuffle, indexing and iteration, and the "
          "machine's other load, make the difference")
  print(f"  records: image {st.get('image', 0)}/{n}, video {st.get('video', 0)}/{n} "
        f"(avg {st.get('frames', 0) / max(st.get('video', 0), 1):.1f} frames), audio "
        f"{st.get('audio', 0)}/{n} (avg {st.get('audio_rows', 0) / max(st.get('audio', 0), 1):.0f} "
        "log-mel rows before cropping)")


def _fmt_ratio(x: float | None) -> str:
  return f"{x:.1f}x" if x is not None and math.isfinite(x) else "-"


def main(argv):
  del argv
  from m5p.config_loader import load_config
  logging.set_verbosity(logging.WARNING)  # TFDS's per-open info lines.
  pylogging.getLogger("m5p").setLevel(pylogging.WARNING)

  print(_machine(), flush=True)
  config = load_config(FLAGS.config)
  compare = load_config(FLAGS.compare_config) if FLAGS.compare_config else None
  workers = [int(w) for w in FLAGS.workers]
  threads = [int(t) for t in FLAGS.threads]
  num_products = FLAGS.num_products or int(config.data.synthetic_products)

  with contextlib.ExitStack() as stack:
    work_dir = FLAGS.work_dir
    if work_dir is None and not (FLAGS.data_dir and (compare is None or FLAGS.compare_data_dir)):
      work_dir = tempfile.mkdtemp(prefix="m5p_bench_input_")
      stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
    data_dir = FLAGS.data_dir or make_dataset(config, work_dir, num_products)
    runs = [(FLAGS.config, config, data_dir, FLAGS.num_batches)]
    if compare is not None:
      compare_dir = FLAGS.compare_data_dir or make_dataset(compare, work_dir, num_products)
      runs.append((FLAGS.compare_config, compare, compare_dir, FLAGS.compare_num_batches))

    # 1. Pipeline throughput (before any JAX compile, so its threads do not compete).
    rates: dict[tuple[str, int, int], float] = {}
    costs: dict[tuple[str, int, int], dict[str, float]] = {}
    profiles = {}
    for name, cfg, ddir, nb in runs:
      print(f"\n{_describe(cfg, name)}\n  data: {ddir}", flush=True)
      if FLAGS.profile_records > 0:  # First: no Grain thread is left running yet.
        profiles[name] = profile_stages(cfg, ddir, FLAGS.profile_records)
      for w in workers:
        for t in threads:
          r = pipeline_rate(cfg, ddir, w, t, nb, FLAGS.warmup_batches)
          rates[(name, w, t)] = r["examples_s"]
          costs[(name, w, t)] = r
          print(f"  workers={w} threads={t}: {r['examples_s']:.1f} examples/s "
                f"({nb} batches in {r['seconds']:.2f} s, {r['cpu_ms']:.2f} CPU ms/example on "
                f"{r['cores']:.2f} cores; warm-up {r['warmup_s']:.1f} s)", flush=True)

    # 2. Train steps.
    steps: dict[str, dict[str, float]] = {}
    if FLAGS.steps > 0:
      print(f"\ntrain step {FLAGS.config} at batch {config.batch_size}...", flush=True)
      steps[FLAGS.config] = measure_step(config, config.batch_size, FLAGS.steps, data_dir,
                                         FLAGS.fed_steps)
    if compare is not None and FLAGS.compare_steps > 0:
      print(f"train step {FLAGS.compare_config} at batch {FLAGS.compare_batch_size} "
            "(CPU: minutes)...", flush=True)
      steps[FLAGS.compare_config] = measure_step(compare, FLAGS.compare_batch_size, FLAGS.compare_steps)

  # 3. Report.
  print("\nTrain step (jitted, random resident batch; median of timed steps after compile + 1 step):")
  print(f"  {'config':14s} {'batch':>5s} {'params':>8s} {'compile s':>9s} {'step ms':>10s} "
        f"{'examples/s':>10s} {'cores busy':>10s}")
  for name, s in steps.items():
    b = config.batch_size if name == FLAGS.config else FLAGS.compare_batch_size
    print(f"  {name:14s} {b:5d} {s['params_m']:7.1f}M {s['compile_s']:9.1f} {1e3 * s['step_s']:10.1f} "
          f"{s['examples_s']:10.2f} {s['cores']:10.2f}")
  ref = steps.get(FLAGS.config, {}).get("examples_s")
  if "fed_examples_s" in steps.get(FLAGS.config, {}):
    s = steps[FLAGS.config]
    print(f"  {FLAGS.config} fed by its pipeline (worker_count={config.data.worker_count}, "
          f"read_threads={config.data.read_threads}), {FLAGS.fed_steps} steps: "
          f"{1e3 * s['fed_step_s']:.1f} ms/step = {s['fed_examples_s']:.2f} examples/s "
          f"({100 * (s['fed_step_s'] / s['step_s'] - 1):+.0f}% vs the resident batch; "
          f"{s['fed_cores']:.2f} cores busy; started after compiling, so the pipeline was filling "
          "its prefetch buffer throughout: the worst case)")

  print(f"\nInput pipeline vs the {FLAGS.config} train step"
        + (f" ({ref:.2f} examples/s):" if ref else " (not measured):"))
  print(f"  {'data settings':14s} {'workers':>7s} {'threads':>7s} {'examples/s':>10s} "
        f"{'x ' + FLAGS.config + ' step':>14s} {'x own step':>10s} {'CPU ms/ex':>9s} {'cores busy':>10s}")
  for (name, w, t), r in rates.items():
    own = steps.get(name, {}).get("examples_s")
    c = costs[(name, w, t)]
    print(f"  {name:14s} {w:7d} {t:7d} {r:10.1f} {_fmt_ratio(r / ref if ref else None):>14s} "
          f"{_fmt_ratio(r / own if own else None):>10s} {c['cpu_ms']:9.2f} {c['cores']:10.2f}")

  if ref:
    need = FLAGS.goal * ref
    default = (FLAGS.config, int(config.data.worker_count), int(config.data.read_threads))
    mine = {k: v for k, v in rates.items() if k[0] == FLAGS.config}
    best = max(mine, key=mine.get)
    worst = min(mine, key=mine.get)
    print(f"\nGoal: the pipeline feeds >= {FLAGS.goal:g}x what the {FLAGS.config} train step consumes "
          f"(>= {need:.1f} examples/s).")
    if default in rates:
      ok = rates[default] >= need
      print(f"  {'HOLDS' if ok else 'DOES NOT HOLD'} at the config's own setting (workers={default[1]}, "
            f"threads={default[2]}): {rates[default]:.1f} examples/s = {rates[default] / ref:.1f}x")
    print(f"  best: workers={best[1]} threads={best[2]}: {mine[best]:.1f} examples/s = "
          f"{mine[best] / ref:.1f}x; worst: workers={worst[1]} threads={worst[2]}: "
          f"{mine[worst]:.1f} = {mine[worst] / ref:.1f}x; holds for "
          f"{sum(v >= need for v in mine.values())}/{len(mine)} settings")
    # CPU time per example does not depend on what else runs on the machine.
    s = steps[FLAGS.config]
    step_ms = 1e3 * s["step_s"] * s["cores"] / config.batch_size
    at = default if default in costs else min((k for k in costs if k[0] == FLAGS.config),
                                              key=lambda k: costs[k]["cpu_ms"])
    pipe_ms = costs[at]["cpu_ms"]
    r = step_ms / pipe_ms
    print(f"  CPU time per example (what other load on the machine changes least): pipeline "
          f"{pipe_ms:.2f} ms (workers={at[1]}, threads={at[2]}), train step {step_ms:.2f} ms on "
          f"{s['cores']:.2f} cores: core for core the pipeline makes {r:.1f}x what the step consumes; "
          f"one full core of pipeline would feed {r / max(s['cores'], 1e-9):.1f}x the step as measured "
          f"({'holds' if r / max(s['cores'], 1e-9) >= FLAGS.goal else 'does not hold'} by this measure)")
    for name, cfg, _, _ in runs[1:]:
      theirs = {k: v for k, v in rates.items() if k[0] == name}
      if theirs:
        b = max(theirs, key=theirs.get)
        print(f"  with {name}'s data settings, best {theirs[b]:.1f} examples/s = {theirs[b] / ref:.1f}x "
              f"the {FLAGS.config} step ({'holds' if theirs[b] >= need else 'does not hold'})")

  for name, prof in profiles.items():
    _print_profile(name, prof, rates.get((name, 0, 0)))
  print(f"\n{_machine().splitlines()[0]} (at the end)")


if __name__ == "__main__":
  app.run(main)
