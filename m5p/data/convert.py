"""Raw M5Product layout -> tokenizer + TFDS ArrayRecord dataset + manifest.

`convert()` writes, under `output_dir`:

  conversion/plan.json    the settings and the shard plan (written first; a
                          rerun with other settings is refused)
  conversion/<split>-<i>-of-<S>.json   one report per finished shard
  tfds/m5_product/<config>/<version>/  the ArrayRecord shards, then TFDS's
                          dataset_info.json and features.json
  tokenizer.model         SentencePiece model trained on the train split's text
  manifest.json           what was written and what went wrong (written last:
                          its presence means the conversion finished)

Shards are independent jobs (`m5p.data.shards`), run here one after the
other with a pool of media decoders (`workers`), or split over the tasks
of a cluster job array (`num_tasks`, `task_index`), or on Apache Beam
(`beam_runner`: DirectRunner here, Dataflow/Flink/Spark at scale). A rerun
skips finished shards; the output is byte-identical however it was run.

`load_manifest()` and `open_split()` are how the input pipeline finds it.
Reading needs no TensorFlow: `open_split` returns TFDS's ArrayRecord data
source, whose items are dicts of numpy values (see `open_split`).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from m5p.data import raw_layout, schema, shards
from m5p.data.raw_layout import ConversionError
from m5p.data.tokenizer import train_tokenizer

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TFDS_SUBDIR = "tfds"
WORK_SUBDIR = "conversion"
PLAN = "plan.json"
MAX_TOKENIZER_LINES = 2_000_000
MODALITY_ORDER = ("text", "table", "image", "video", "audio")

__all__ = ["ConversionError", "convert", "load_manifest", "open_split", "tokenizer_path"]


def _tokenizer_lines(split_paths: list[str], cap: int) -> Iterator[str]:
  """Titles, table keys and values of the items, one a line, at most `cap`."""

  def lines():
    for path in split_paths:
      for raw_id, entry in raw_layout.iter_entries(path):
        try:
          item = raw_layout.parse_item(raw_id, entry)
        except raw_layout.ItemRefused:
          continue
        if item.title:
          yield item.title
        yield from item.table_keys
        yield from item.table_values

  return itertools.islice(lines(), cap)


def _id_hash(item_id: str) -> int:
  import hashlib
  return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "little")


def _scan_split(path: str) -> tuple[int, list[int]]:
  """(number of entries, indices of entries whose id appeared earlier).

  One streamed pass that also finds broken JSON before any decoding. Ids are
  kept as 8-byte hashes (50 MB for 6M items), so memory stays small.
  """
  hashes, indices = [], []
  n = 0
  for n, (raw_id, _) in enumerate(raw_layout.iter_entries(path), 1):
    try:
      item_id = raw_layout.check_item_id(raw_id)
    except raw_layout.ItemRefused:
      continue  # Refused in its shard, not a duplicate.
    hashes.append(_id_hash(item_id))
    indices.append(n - 1)
  if not hashes:
    return n, []
  h = np.asarray(hashes, np.uint64)
  _, first = np.unique(h, return_index=True)
  dup = np.ones(len(h), bool)
  dup[first] = False
  return n, [int(i) for i in np.asarray(indices)[dup]]


def _plan(raw_dir: str, settings: shards.Settings, num_shards: int, vocab_size: int,
          log: Callable[[str], None]) -> dict[str, Any]:
  split_paths = raw_layout.find_splits(raw_dir)
  raw_layout.read_id_lists(raw_dir)  # Fail now, not after hours of decoding.
  raw_layout.read_fine_groups(raw_dir)
  t0 = time.time()
  splits = {}
  for split, path in split_paths.items():
    entries, duplicates = _scan_split(path)
    splits[split] = {"path": os.path.basename(path), "entries": entries,
                     "shards": max(1, min(num_shards, entries)), "duplicates": duplicates}
  counts = ", ".join(f"{s} {v['entries']}" for s, v in splits.items())
  log(f"splits: {counts} items "
      f"(read in {time.time() - t0:.1f} s)")
  return {"record_version": schema.RECORD_VERSION, "raw_dir": os.path.abspath(raw_dir),
          "settings": {"image_size": settings.image_size, "max_frames": settings.max_frames,
                       "n_mels": settings.n_mels, "max_audio_seconds": settings.max_audio_seconds},
          "num_shards": num_shards, "vocab_size": vocab_size, "splits": splits}


def _dataset_dir(output_dir: str, settings: shards.Settings) -> str:
  return os.path.join(output_dir, TFDS_SUBDIR, shards.DATASET_NAME, settings.name,
                      schema.RECORD_VERSION)


def _jobs(plan: dict[str, Any], output_dir: str, settings: shards.Settings) -> list[shards.ShardJob]:
  jobs = []
  for split, s in plan["splits"].items():
    n, count = s["entries"], s["shards"]
    dups = np.asarray(s["duplicates"], np.int64)
    for i in range(count):
      start, stop = n * i // count, n * (i + 1) // count
      jobs.append(shards.ShardJob(
          raw_dir=plan["raw_dir"], split=split, split_path=os.path.join(plan["raw_dir"], s["path"]),
          shard=i, num_shards=count, start=start, stop=stop,
          duplicates=tuple(int(d) for d in dups[(dups >= start) & (dups < stop)]),
          dataset_dir=_dataset_dir(output_dir, settings),
          work_dir=os.path.join(output_dir, WORK_SUBDIR), settings=settings))
  return jobs


def _load_or_write_plan(raw_dir: str, output_dir: str, settings: shards.Settings, num_shards: int,
                        vocab_size: int, overwrite: bool, log: Callable[[str], None]) -> dict:
  """The plan of the conversion in `output_dir`: resumed if it matches, else new."""
  plan_path = os.path.join(output_dir, WORK_SUBDIR, PLAN)
  finished = os.path.exists(os.path.join(output_dir, MANIFEST))
  if overwrite:
    for name in (MANIFEST, TOKENIZER, TFDS_SUBDIR, WORK_SUBDIR):
      path = os.path.join(output_dir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  elif finished:
    raise ConversionError(
        f"{output_dir} already holds a conversion (manifest.json); choose another output "
        "folder or pass overwrite=True.")
  elif os.path.exists(os.path.join(output_dir, TFDS_SUBDIR)) and not os.path.exists(plan_path):
    raise ConversionError(
        f"{output_dir} holds records of another conversion (tfds/ without conversion/plan.json); "
        "choose another output folder or pass overwrite=True.")
  plan = _plan(raw_dir, settings, num_shards, vocab_size, log)
  if os.path.exists(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      old = json.load(f)
    if old != plan:
      changed = sorted(k for k in plan if old.get(k) != plan[k])
      raise ConversionError(
          f"{output_dir} holds an unfinished conversion with other inputs or settings "
          f"({', '.join(changed)} differ); rerun it as it was, or pass overwrite=True.")
    done = sum(j.is_done() for j in _jobs(plan, output_dir, settings))
    log(f"resuming the conversion in {output_dir}: {done} shards already done")
    return plan
  os.makedirs(os.path.dirname(plan_path), exist_ok=True)
  tmp = f"{plan_path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(plan, f, ensure_ascii=False, indent=1)
  os.replace(tmp, plan_path)
  return plan


def _run_local(jobs: Sequence[shards.ShardJob], workers: int, log: Callable[[str], None]) -> None:
  decoder = shards.MediaDecoder(workers, log)
  start = time.time()
  items = sum(j.stop - j.start for j in jobs)
  done_items = 0
  try:
    for k, job in enumerate(jobs, 1):
      report = shards.convert_shard(job, decoder, log)
      done_items += job.stop - job.start
      rate = done_items / max(time.time() - start, 1e-9)
      log(f"{job.file_name}: {report['items_in']} items, {report['written']} written "
          f"({report['seconds']:.1f} s); {k}/{len(jobs)} shards, {rate:.1f} items/s, "
          f"about {(items - done_items) / max(rate, 1e-9) / 60:.1f} min left")
  finally:
    decoder.close()


def _beam_convert_shard(job: shards.ShardJob) -> str:
  """A Beam task: one shard, media decoded in the Beam worker's own process."""
  shards.convert_shard(job, None, log=lambda msg: None)
  return job.file_name


def _run_beam(jobs: Sequence[shards.ShardJob], runner: str, options: Sequence[str],
              log: Callable[[str], None]) -> None:
  try:
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError("beam_runner needs Apache Beam: pip install 'm5p[beam]'") from None
  log(f"running {len(jobs)} shards on Beam's {runner}")
  with beam.Pipeline(runner=runner, options=PipelineOptions(list(options))) as p:
    _ = (p | "Shards" >> beam.Create(list(jobs)) | "Spread" >> beam.Reshuffle()
         | "Convert" >> beam.Map(_beam_convert_shard))


def _train_tokenizer(plan: dict, output_dir: str, vocab_size: int,
                     log: Callable[[str], None]) -> list[str]:
  paths = {s: os.path.join(plan["raw_dir"], v["path"]) for s, v in plan["splits"].items()}
  tok_splits = ["train"] if "train" in paths else list(paths)
  t0 = time.time()
  lines = list(_tokenizer_lines([paths[s] for s in tok_splits], MAX_TOKENIZER_LINES))
  if not any(l.strip() for l in lines) and tok_splits != list(paths):
    tok_splits = list(paths)
    lines = list(_tokenizer_lines([paths[s] for s in tok_splits], MAX_TOKENIZER_LINES))
  if not any(l.strip() for l in lines):
    raise ConversionError(f"{plan['raw_dir']}: no title or table text in any split to train the "
                          "tokenizer on.")
  try:
    train_tokenizer(lines, vocab_size, os.path.join(output_dir, TOKENIZER))
  except RuntimeError as e:  # SentencePiece: e.g. vocab_size below 256 bytes + characters.
    raise ConversionError(f"tokenizer training failed with vocab_size={vocab_size}: {e}") from None
  log(f"tokenizer: {len(lines)} lines of {'+'.join(tok_splits)} in {time.time() - t0:.1f} s "
      f"-> {TOKENIZER}")
  return tok_splits


def _finalize(plan: dict, jobs: Sequence[shards.ShardJob], output_dir: str,
              settings: shards.Settings, t_start: float, log: Callable[[str], None]) -> dict:
  """Tokenizer, TFDS metadata and manifest from the finished shards' reports."""
  reports = {}
  for job in jobs:
    with open(job.report_path, encoding="utf-8") as f:
      reports[job] = json.load(f)
  tok_splits = _train_tokenizer(plan, output_dir, plan["vocab_size"], log)
  faults, skipped = shards.Tally(), shards.Tally()
  by_split: dict[str, list] = {}
  for job, r in reports.items():
    by_split.setdefault(job.split, []).append((job, r))
    faults.merge(r["faults"])
    skipped.merge({"": r["skipped"]})
  split_infos, empty_splits, labels = [], [], set()
  presence, audio_from_video = {}, {}
  dataset_dir = _dataset_dir(output_dir, settings)
  for split, items in by_split.items():
    lengths = [r["written"] for _, r in items]
    if not sum(lengths):
      empty_splits.append(split)
      for job, _ in items:
        os.remove(job.shard_path)
      log(f"{split}: no usable item; the split is left out.")
      continue
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=sum(r["num_bytes"] for _, r in items),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=dataset_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=shards.DATASET_NAME, split=split, filetype_suffix="array_record")))
    names = list(MODALITY_ORDER) + list(schema.FEATURES)
    presence[split] = {m: sum(r["presence"].get(m, 0) for _, r in items) for m in names}
    audio_from_video[split] = sum(r["audio_from_video"] for _, r in items)
    for _, r in items:
      labels.update(r["labels"])
  if not split_infos:
    raise ConversionError(f"{plan['raw_dir']}: no split has a usable item.")
  tfds.folder_dataset.write_metadata(
      data_dir=dataset_dir, features=schema.features(settings.n_mels), split_infos=split_infos,
      version=schema.RECORD_VERSION, check_data=False,
      description="M5Product e-commerce products in five modalities, converted by m5p.")
  items_in = sum(r["items_in"] for r in reports.values())
  written = sum(r["written"] for r in reports.values())
  skipped_n = sum(v["count"] for v in skipped.report().get("", {}).values())
  if items_in != written + skipped_n:
    raise AssertionError(f"lost items: {items_in} in != {written} written + {skipped_n} skipped")
  group_of, _, _ = shards.side_info(plan["raw_dir"])
  id_lists = raw_layout.read_id_lists(plan["raw_dir"])
  manifest = {
      "record_version": schema.RECORD_VERSION,
      "dataset_dir": os.path.relpath(dataset_dir, output_dir),
      "tokenizer": TOKENIZER,
      "splits": {s.name: int(sum(s.shard_lengths)) for s in sorted(split_infos, key=lambda s: s.name)},
      "shards": {s.name: len(s.shard_lengths) for s in sorted(split_infos, key=lambda s: s.name)},
      "conversion": {
          **plan["settings"], "frames_per_second": 1.0,
          "audio_sample_rate": schema.AUDIO_SAMPLE_RATE, "audio_n_fft": schema.AUDIO_N_FFT,
          "audio_hop": schema.AUDIO_HOP, "num_shards": plan["num_shards"],
          "vocab_size": plan["vocab_size"], "tokenizer_splits": tok_splits,
          "raw_dir": plan["raw_dir"], "seconds": round(time.time() - t_start, 1),
          "shard_seconds": round(sum(r["seconds"] for r in reports.values()), 1),
      },
      "presence": dict(sorted(presence.items())),
      "audio_from_video": dict(sorted(audio_from_video.items())),
      "faults": faults.report(),
      "skipped": skipped.report().get("", {}),
      "empty_splits": sorted(empty_splits),
      "items_in": items_in,
      "items_written": written,
      "num_categories": (max(labels) + 1) if labels else 0,
      "labels_seen": len(labels),
      "fine_groups": len(set(group_of.values())),
  }
  if id_lists:
    manifest["splits_files"] = id_lists
  tmp = os.path.join(output_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, ensure_ascii=False, indent=1)
  os.replace(tmp, os.path.join(output_dir, MANIFEST))
  return manifest


def convert(raw_dir: str, output_dir: str, *, image_size: int, max_frames: int, n_mels: int,
            max_audio_seconds: float, num_shards: int, vocab_size: int,
            workers: int | None = None, overwrite: bool = False,
            num_tasks: int = 1, task_index: int = 0, beam_runner: str | None = None,
            beam_options: Sequence[str] = (),
            log: Callable[[str], None] = print) -> dict[str, Any] | None:
  """Converts the raw layout at `raw_dir` into `output_dir`; returns the manifest.

  Args:
    raw_dir: the raw M5Product layout (shared/M5PRODUCT_LAYOUT.md).
    output_dir: created if needed. An unfinished conversion there with the
      same inputs and settings is resumed (finished shards are kept); a
      finished one, or one with other settings, is refused unless
      `overwrite`.
    image_size, max_frames, n_mels, max_audio_seconds: what records store
      (square JPEG side, 1 fps frames kept, log-mel bins, seconds of audio).
    num_shards: ArrayRecord shards per split (fewer for a split with fewer
      items); shards are the unit of work and of resumption.
    vocab_size: SentencePiece vocabulary (a small corpus may give fewer).
    workers: media-decoding processes; None = os.cpu_count(); 0 = decode in
      this process (then a crashing decoder ends the conversion; with workers
      it only costs that item's media, fault 'crashed'). The records do not
      depend on it. Beam tasks always decode in their own process.
    overwrite: replace an earlier conversion in `output_dir`.
    num_tasks, task_index: with num_tasks > 1, convert only the shards
      k with k % num_tasks == task_index (a job-array task) and return None;
      a final run with num_tasks=1 skips the finished shards and finishes.
    beam_runner: run the shards on Apache Beam (e.g. 'DirectRunner',
      'DataflowRunner'; needs `pip install m5p[beam]` and an `output_dir`
      every worker can write), with `beam_options` as Beam command-line flags.
    log: progress and summary lines.

  Counts in the manifest: `faults` and `presence` count items (an item with
  two empty table values counts once under table/empty_value); `faults`
  include items later skipped; `items_in == items_written + skipped`.

  Raises:
    ConversionError: missing `raw_dir`, no split file, unreadable JSON (the
      message names the file), no usable item, or a conflicting earlier
      conversion.
  """
  t_start = time.time()
  raw_layout.check_root(raw_dir)
  if not 0 <= task_index < num_tasks:
    raise ConversionError(f"task_index {task_index} is not in [0, num_tasks={num_tasks}).")
  settings = shards.Settings(image_size, max_frames, n_mels, float(max_audio_seconds))
  os.makedirs(output_dir, exist_ok=True)
  plan = _load_or_write_plan(raw_dir, output_dir, settings, num_shards, vocab_size,
                             overwrite and task_index == 0, log)
  jobs = _jobs(plan, output_dir, settings)
  todo = [j for k, j in enumerate(jobs) if k % num_tasks == task_index and not j.is_done()]
  if workers is None:
    workers = os.cpu_count() or 1
  t0 = time.time()
  if beam_runner:
    _run_beam(todo, beam_runner, beam_options, log)
  elif todo:
    _run_local(todo, workers, log)
  if todo:
    n = sum(j.stop - j.start for j in todo)
    dt = max(time.time() - t0, 1e-9)
    log(f"records: {len(todo)} shards, {n} items in {dt:.1f} s ({n / dt:.1f} items/s, "
        f"{'Beam ' + beam_runner if beam_runner else f'{workers} workers'})")
  if num_tasks > 1:
    left = sum(not j.is_done() for j in jobs)
    log(f"task {task_index}/{num_tasks} done; {left} of {len(jobs)} shards left in all. "
        "When all tasks are done, run once more without num_tasks to finish.")
    return None
  missing = [j.file_name for j in jobs if not j.is_done()]
  if missing:
    raise ConversionError(f"{len(missing)} shards are not done (e.g. {missing[0]}).")
  manifest = _finalize(plan, jobs, output_dir, settings, t_start, log)
  log(f"done: {manifest['items_in']} items in, {manifest['items_written']} written, "
      f"{manifest['items_in'] - manifest['items_written']} skipped, in {time.time() - t_start:.1f} s")
  return manifest


def load_manifest(data_dir: str) -> dict[str, Any]:
  """The manifest of a converted dataset; checks its record version."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} not found: {data_dir!r} holds no converted dataset "
        "(make one with tools/convert_m5product.py).")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("record_version") != schema.RECORD_VERSION:
    raise ValueError(
        f"{path}: records are version {manifest.get('record_version')}, this code reads "
        f"{schema.RECORD_VERSION}; convert the raw data again.")
  return manifest


def tokenizer_path(data_dir: str) -> str:
  return os.path.join(data_dir, load_manifest(data_dir)["tokenizer"])


def open_split(data_dir: str, split: str):
  """TFDS's random-access data source for `split` (feeds grain.MapDataset.source).

  `len(src)` is the number of records and `src[i]` a dict (TFDS 4.9.10):
    item_id, title, fine_group: bytes (b'' when there is none)
    label, fine_group_id: Python int (-1: unknown / no group)
    table_keys, table_values: lists of bytes, one per pair (may be empty)
    image: list of 0 or 1 uint8 arrays [S, S, 3]
    video: list of 0..max_frames uint8 arrays [S, S, 3] (1 fps)
    audio: float16 array [T, n_mels] log-mel (T = 0 when absent)
    faults: list of bytes like b'image:truncated' (usually empty)
  An absent modality is an empty field: b'' title, no pairs, [] image or
  video, 0 audio rows; `faults` says when that is due to a damaged file.
  """
  manifest = load_manifest(data_dir)
  if split not in manifest["splits"]:
    raise KeyError(f"{data_dir}: no split {split!r}; it has {sorted(manifest['splits'])}")
  builder = tfds.builder_from_directory(os.path.join(data_dir, manifest["dataset_dir"]))
  return builder.as_data_source(split)
