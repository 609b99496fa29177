"""Converting one shard: a contiguous range of a split's entries -> one ArrayRecord file.

A conversion is a list of independent `ShardJob`s (see `m5p.data.convert`):
shard i of a split with E entries and S shards holds entries
[E*i//S, E*(i+1)//S) in file order, less refused, duplicate and unusable
items. Each job streams its split file, decodes its items' media (in a
process pool, in item order), and writes

  <dataset_dir>/m5_product-<split>.array_record-<i>-of-<S>   (TFDS naming)
  <work_dir>/<split>-<i>-of-<S>.json                          its report

both atomically (temporary name, then rename), the report last: a shard is
done when its report exists. So a rerun after an interruption skips the
finished shards, and since a shard depends only on the raw input and the
settings, any mix of reruns, worker counts, job-array tasks or Beam workers
gives byte-identical files.

Records follow `m5p.data.schema.features`; nothing is pickled.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import time
from typing import Any, Callable, Iterator

import numpy as np
from array_record.python import array_record_module

from m5p.data import media, raw_layout, schema

DATASET_NAME = "m5_product"
ARRAY_RECORD_OPTIONS = "group_size:1"  # As TFDS writes them: fast random access.
EXAMPLES_PER_REASON = 5
_CHUNK = 8  # Items per decoding task.
_IN_FLIGHT_PER_WORKER = 4  # Chunks queued per worker.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Conversion settings that change the records (hence part of the dataset path)."""
  image_size: int = 32
  max_frames: int = 4
  n_mels: int = 80
  max_audio_seconds: float = 12.0

  @property
  def name(self) -> str:
    return (f"s{self.image_size}_f{self.max_frames}_m{self.n_mels}_"
            f"a{self.max_audio_seconds:g}").replace(".", "p")

  def as_tuple(self) -> tuple:
    return (self.image_size, self.max_frames, self.n_mels, self.max_audio_seconds)


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """Everything one shard needs; plain values, so it pickles to any Beam worker."""
  raw_dir: str
  split: str
  split_path: str
  shard: int
  num_shards: int
  start: int  # Entry indices [start, stop) of the split file.
  stop: int
  duplicates: tuple[int, ...]  # Entry indices (in range) whose id appeared earlier in the file.
  dataset_dir: str
  work_dir: str
  settings: Settings

  @property
  def file_name(self) -> str:
    return shard_file_name(self.split, self.shard, self.num_shards)

  @property
  def shard_path(self) -> str:
    return os.path.join(self.dataset_dir, self.file_name)

  @property
  def report_path(self) -> str:
    return os.path.join(self.work_dir, f"{self.split}-{self.shard:05d}-of-{self.num_shards:05d}.json")

  def is_done(self) -> bool:
    return os.path.exists(self.report_path) and os.path.exists(self.shard_path)


def shard_file_name(split: str, shard: int, num_shards: int) -> str:
  return f"{DATASET_NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


class Tally:
  """Counts by group and reason, with the first few example ids of each."""

  def __init__(self):
    self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self.examples: dict[str, dict[str, list[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))

  def add(self, group: str, reason: str, item_id: Any, count: int = 1,
          examples: list[str] | None = None) -> None:
    self.counts[group][reason] += count
    ex = self.examples[group][reason]
    for e in (examples if examples is not None else [str(item_id)]):
      if len(ex) < EXAMPLES_PER_REASON:
        ex.append(e)

  def report(self) -> dict[str, dict[str, dict[str, Any]]]:
    return {g: {r: {"count": n, "examples": self.examples[g][r]}
                for r, n in sorted(reasons.items())}
            for g, reasons in sorted(self.counts.items())}

  def merge(self, report: dict[str, dict[str, dict[str, Any]]]) -> None:
    for group, reasons in report.items():
      for reason, v in reasons.items():
        self.add(group, reason, None, v["count"], v["examples"])


# ---------------------------------------------------------------------------
# Side files every shard needs (cached per process: a Beam worker runs many shards).


@functools.lru_cache(maxsize=2)
def side_info(raw_dir: str) -> tuple[dict[str, str], dict[str, int], dict[str, tuple[str, ...]]]:
  """(group of item, id of group, id lists holding item) from fine_groups.json and splits/."""
  group_of = raw_layout.read_fine_groups(raw_dir)
  group_id = {g: i for i, g in enumerate(sorted(set(group_of.values())))}
  lists_of: dict[str, list[str]] = collections.defaultdict(list)
  for name, ids in raw_layout.read_id_lists(raw_dir).items():
    for item_id in dict.fromkeys(ids):
      lists_of[item_id].append(name)
  return group_of, group_id, {k: tuple(v) for k, v in lists_of.items()}


# ---------------------------------------------------------------------------
# Media decoding in a pool, in item order.


def _decode_chunk(paths_list: list[dict[str, str]], settings: tuple) -> list[media.ItemMedia]:
  return [media.decode_item_media(p, *settings) for p in paths_list]


def _chunked(it, n):
  it = iter(it)
  while chunk := list(itertools.islice(it, n)):
    yield chunk


class MediaDecoder:
  """Decodes items' media in `workers` processes (0: in this process), in order.

  A decoder that crashes its worker (FFmpeg on a hostile file, out of
  memory) costs only that item's media (fault 'crashed'): the chunk is
  retried one item at a time in a fresh pool. The output never depends on
  the worker count.
  """

  def __init__(self, workers: int, log: Callable[[str], None] = print):
    self.workers = workers
    self.log = log
    self._pool = None

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    if self._pool is None:  # spawn: no fork of a possibly threaded parent.
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context("spawn"))
    return self._pool

  def decode(self, items: Iterator[tuple[Any, dict[str, str]]], settings: tuple):
    """(item, paths) -> yields (item, ItemMedia) in the same order."""
    if self.workers <= 0:
      for item, paths in items:
        yield item, media.decode_item_media(paths, *settings)
      return
    pending: collections.deque = collections.deque()
    chunks = _chunked(items, _CHUNK)

    def submit(chunk=None) -> bool:
      chunk = chunk if chunk is not None else next(chunks, None)
      if chunk is None:
        return False
      fut = self._get_pool().submit(_decode_chunk, [p for _, p in chunk], settings)
      pending.append((chunk, fut))
      return True

    while len(pending) < self.workers * _IN_FLIGHT_PER_WORKER and submit():
      pass
    while pending:
      chunk, fut = pending.popleft()
      try:
        results = fut.result()
      except concurrent.futures.process.BrokenProcessPool:
        queued = [c for c, _ in pending]
        pending.clear()
        self.close()
        results = [self._decode_alone(item, paths, settings) for item, paths in chunk]
        for c in queued:
          submit(c)
      submit()
      for (item, _), decoded in zip(chunk, results):
        yield item, decoded

  def _decode_alone(self, item, paths: dict[str, str], settings: tuple) -> media.ItemMedia:
    try:
      return self._get_pool().submit(_decode_chunk, [paths], settings).result()[0]
    except concurrent.futures.process.BrokenProcessPool:
      self.close()
      self.log(f"{getattr(item, 'item_id', item)}: a media decoder crashed; its media are left out.")
      return media.ItemMedia([], [], np.zeros((0, settings[2]), np.float16),
                             [f"{m}:crashed" for m in sorted(paths)])


# ---------------------------------------------------------------------------
# One shard.


def _atomic_write_bytes(path: str, write: Callable[[str], None]) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


def _items(job: ShardJob, skipped: Tally) -> Iterator[raw_layout.RawItem]:
  """The shard's items: entries [start, stop) less refused and duplicate ones."""
  duplicates = set(job.duplicates)
  entries = itertools.islice(raw_layout.iter_entries(job.split_path), job.start, job.stop)
  for index, (raw_id, entry) in enumerate(entries, job.start):
    try:
      item = raw_layout.parse_item(raw_id, entry)
    except raw_layout.ItemRefused as e:
      skipped.add("", e.reason, e.example or raw_id)
      continue
    if index in duplicates:
      skipped.add("", "duplicate_id", item.item_id)
      continue
    yield item


def convert_shard(job: ShardJob, decoder: MediaDecoder | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the job's shard and report (unless done); returns the report."""
  if job.is_done():
    with open(job.report_path, encoding="utf-8") as f:
      return json.load(f)
  start = time.time()
  own_decoder = decoder is None
  decoder = decoder or MediaDecoder(0, log)
  group_of, group_id, lists_of = side_info(job.raw_dir)
  faults, skipped = Tally(), Tally()
  presence: collections.Counter = collections.Counter()
  labels: set[int] = set()
  audio_from_video = written = num_bytes = 0
  lookups = ((it, raw_layout.find_media(job.raw_dir, it.item_id)) for it in _items(job, skipped))
  lookup_faults: dict[int, list[str]] = {}

  def with_paths():
    for it, (paths, found_faults) in lookups:
      lookup_faults[id(it)] = found_faults
      yield it, paths

  os.makedirs(job.dataset_dir, exist_ok=True)
  os.makedirs(job.work_dir, exist_ok=True)
  tmp = f"{job.shard_path}.tmp{os.getpid()}"
  writer = array_record_module.ArrayRecordWriter(tmp, ARRAY_RECORD_OPTIONS)
  try:
    for item, m in decoder.decode(with_paths(), job.settings.as_tuple()):
      item_faults = item.faults + lookup_faults.pop(id(item)) + m.faults
      for fault in item_faults:
        modality, _, reason = fault.partition(":")
        faults.add(modality, reason, item.item_id)
      present = {"text": bool(item.title), "table": bool(item.table_keys),
                 "image": bool(m.image), "video": bool(m.video), "audio": len(m.audio) > 0,
                 **{name: name in m.features for name in schema.FEATURES}}
      if not any(present.values()):
        skipped.add("", "no_usable_modality", item.item_id)
        continue
      presence.update(k for k, v in present.items() if v)
      audio_from_video += int(m.audio_from_video)
      if item.label >= 0:
        labels.add(item.label)
      group = group_of.get(item.item_id, "")
      example = schema.example(item, m, faults=item_faults, group=group,
                               group_id=group_id[group] if group else -1,
                               lists=lists_of.get(item.item_id, ()))
      record = schema.serialize(example, job.settings.n_mels)
      writer.write(record)
      written += 1
      num_bytes += len(record)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  finally:
    if own_decoder:
      decoder.close()
  writer.close()
  os.replace(tmp, job.shard_path)
  report = {
      "split": job.split, "shard": job.shard, "num_shards": job.num_shards,
      "entries": [job.start, job.stop], "items_in": job.stop - job.start,
      "written": written, "num_bytes": num_bytes,
      "skipped": skipped.report().get("", {}), "faults": faults.report(),
      "presence": dict(sorted(presence.items())), "audio_from_video": audio_from_video,
      "labels": sorted(labels), "seconds": round(time.time() - start, 2),
  }
  skipped_n = sum(v["count"] for v in report["skipped"].values())
  if written + skipped_n != report["items_in"]:
    raise AssertionError(f"{job.file_name}: {report['items_in']} items in != {written} written "
                         f"+ {skipped_n} skipped")

  def write_report(path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(report, f, ensure_ascii=False, indent=1)

  _atomic_write_bytes(job.report_path, write_report)
  return report
