"""TFDS builder `m5_product`: the raw M5Product layout -> ArrayRecord records.

The raw layout (shared/M5PRODUCT_LAYOUT.md) is the builder's `manual_dir`;
one split per `<split>_id_label.json[l]` file. Each example follows
`m5p.data.schema.features`: media are decoded, resized and re-encoded by
`m5p.data.media` (JPEG bytes, float16 log-mel), so no TensorFlow is needed
to build or read. Damaged media leave their modality empty and add
'modality:reason' to the record's `faults`; an item with no usable modality
is skipped. Everything is counted in `builder.stats`.

Media decoding runs in a pool of `workers` processes, in bounded chunks and
in item order, so the output does not depend on the worker count.
`m5p.data.convert.convert` is the entry point; it also sets the shard count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from m5p.data import media, raw_layout, schema

_CHUNK = 8  # Items per worker task.
_IN_FLIGHT_PER_WORKER = 4  # Chunks queued per worker.
_EXAMPLES_PER_REASON = 5


@dataclasses.dataclass(eq=False)
class M5ProductConfig(tfds.core.BuilderConfig):
  """Conversion settings that change the records (hence part of the path)."""
  image_size: int = 32
  max_frames: int = 4
  n_mels: int = 80
  max_audio_seconds: float = 12.0

  @classmethod
  def from_settings(cls, image_size: int, max_frames: int, n_mels: int,
                    max_audio_seconds: float) -> "M5ProductConfig":
    name = f"s{image_size}_f{max_frames}_m{n_mels}_a{max_audio_seconds:g}".replace(".", "p")
    return cls(name=name, image_size=image_size, max_frames=max_frames, n_mels=n_mels,
               max_audio_seconds=max_audio_seconds,
               description=(f"images/frames {image_size}px JPEG, <= {max_frames} frames at 1 fps, "
                            f"{n_mels}-mel log-mel of <= {max_audio_seconds:g} s"))


class Tally:
  """Counts by reason, with the first few example ids of each."""

  def __init__(self):
    self.counts: dict[str, dict[str, int]] = collections.defaultdict(collections.Counter)
    self.examples: dict[str, dict[str, list[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))

  def add(self, group: str, reason: str, item_id: Any) -> None:
    self.counts[group][reason] += 1
    ex = self.examples[group][reason]
    if len(ex) < _EXAMPLES_PER_REASON:
      ex.append(str(item_id))

  def report(self) -> dict[str, dict[str, dict[str, Any]]]:
    return {g: {r: {"count": n, "examples": self.examples[g][r]}
                for r, n in sorted(reasons.items())}
            for g, reasons in sorted(self.counts.items())}


@dataclasses.dataclass
class ConversionStats:
  items_in: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  presence: dict = dataclasses.field(
      default_factory=lambda: collections.defaultdict(collections.Counter))
  audio_from_video: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  faults: Tally = dataclasses.field(default_factory=Tally)  # group = modality.
  skipped: Tally = dataclasses.field(default_factory=Tally)  # group = '' (one level).
  labels: set = dataclasses.field(default_factory=set)
  empty_splits: list = dataclasses.field(default_factory=list)

  def skipped_report(self) -> dict[str, dict[str, Any]]:
    return self.skipped.report().get("", {})

  def skipped_total(self) -> int:
    return sum(self.skipped.counts[""].values())


def _decode_chunk(paths_list: list[dict[str, str]], settings: tuple) -> list[media.ItemMedia]:
  return [media.decode_item_media(p, *settings) for p in paths_list]


def _chunked(it, n):
  it = iter(it)
  while chunk := list(itertools.islice(it, n)):
    yield chunk


class M5Product(tfds.core.GeneratorBasedBuilder):
  """M5Product products: title, table, image, video frames, audio log-mel, label."""

  VERSION = tfds.core.Version(schema.RECORD_VERSION)
  RELEASE_NOTES = {schema.RECORD_VERSION: "First m5p record layout."}
  BUILDER_CONFIGS = [M5ProductConfig.from_settings(32, 4, 80, 12.0)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Point manual_dir at the raw M5Product layout described in "
      "shared/M5PRODUCT_LAYOUT.md (<split>_id_label.json[l], images/, videos/, audios/).")

  def __init__(self, *, workers: int = 0, log: Callable[[str], None] | None = None,
               log_every_s: float = 10.0, **kwargs):
    self.workers = workers
    self.log = log or (lambda msg: None)
    self.log_every_s = log_every_s
    self.stats = ConversionStats()
    self.expected_items: dict[str, int] = {}  # For progress lines, when known.
    self._pool = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="M5Product e-commerce products in five modalities, converted by m5p.",
        features=schema.features(self.builder_config.n_mels),
        supervised_keys=None,
    )

  # -- splits ---------------------------------------------------------------

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    raw_layout.check_root(root)
    self._root = root
    groups = raw_layout.read_fine_groups(root)
    names = sorted(set(groups.values()))
    self._group_of = groups
    self._group_id = {g: i for i, g in enumerate(names)}
    out = {}
    for split, path in raw_layout.find_splits(root).items():
      if self._has_text_item(path):
        out[split] = self._generate_examples(split, path)
        continue
      # No item with text: only media can keep items, so find out now (a
      # split with no example at all would make TFDS fail).
      examples = list(self._generate_examples(split, path))
      if examples:
        out[split] = iter(examples)
      else:
        self.stats.empty_splits.append(split)
        self.log(f"{split}: no usable item; the split is left out.")
    if not out:
      raise raw_layout.ConversionError(f"{root}: no split has a usable item.")
    return out

  @staticmethod
  def _has_text_item(path: str) -> bool:
    for raw_id, entry in raw_layout.iter_entries(path):
      try:
        item = raw_layout.parse_item(raw_id, entry)
      except raw_layout.ItemRefused:
        continue
      if item.title or item.table_keys:
        return True
    return False

  # -- examples -------------------------------------------------------------

  def _items(self, split: str, path: str) -> Iterator[raw_layout.RawItem]:
    seen = set()
    for raw_id, entry in raw_layout.iter_entries(path):
      self.stats.items_in[split] += 1
      try:
        item = raw_layout.parse_item(raw_id, entry)
      except raw_layout.ItemRefused as e:
        self.stats.skipped.add("", e.reason, raw_id)
        continue
      if item.item_id in seen:
        self.stats.skipped.add("", "duplicate_id", item.item_id)
        continue
      seen.add(item.item_id)
      yield item

  def _decoded(self, items: Iterator[raw_layout.RawItem]):
    """Yields (item, lookup faults, ItemMedia) in item order."""
    c = self.builder_config
    settings = (c.image_size, c.max_frames, c.n_mels, c.max_audio_seconds)

    def lookup(chunk):
      found = [raw_layout.find_media(self._root, it.item_id) for it in chunk]
      return chunk, found

    if self.workers <= 0:
      for chunk in _chunked(items, _CHUNK):
        chunk, found = lookup(chunk)
        for it, (paths, faults) in zip(chunk, found):
          yield it, faults, media.decode_item_media(paths, *settings)
      return
    pending = collections.deque()
    chunks = _chunked(items, _CHUNK)

    def submit(chunk=None, found=None):
      if chunk is None:
        chunk = next(chunks, None)
        if chunk is None:
          return False
        chunk, found = lookup(chunk)
      fut = self._get_pool().submit(_decode_chunk, [p for p, _ in found], settings)
      pending.append((chunk, found, fut))
      return True

    while len(pending) < self.workers * _IN_FLIGHT_PER_WORKER and submit():
      pass
    while pending:
      chunk, found, fut = pending.popleft()
      try:
        results = fut.result()
      except concurrent.futures.process.BrokenProcessPool:
        # A decoder crashed its worker (FFmpeg on a hostile file, out of
        # memory): find the item one at a time in a fresh pool, then requeue
        # the chunks the broken pool was holding, in order.
        queued = [(c, f) for c, f, _ in pending]
        pending.clear()
        self._reset_pool()
        results = [self._decode_alone(it, paths, settings)
                   for it, (paths, _) in zip(chunk, found)]
        for c, f in queued:
          submit(c, f)
      submit()
      for it, (_, faults), decoded in zip(chunk, found, results):
        yield it, faults, decoded

  def _decode_alone(self, item, paths: dict[str, str], settings: tuple) -> media.ItemMedia:
    try:
      return self._get_pool().submit(_decode_chunk, [paths], settings).result()[0]
    except concurrent.futures.process.BrokenProcessPool:
      self._reset_pool()
      self.log(f"{item.item_id}: a media decoder crashed; its media are left out.")
      return media.ItemMedia([], [], np.zeros((0, settings[2]), np.float16),
                             [f"{m}:crashed" for m in sorted(paths)])

  def _reset_pool(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
    """One pool for all splits (spawn: no fork of a possibly threaded parent)."""
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context("spawn"))
    return self._pool

  def download_and_prepare(self, *args, **kwargs):
    try:
      return super().download_and_prepare(*args, **kwargs)
    finally:
      self._reset_pool()

  def _generate_examples(self, split: str, path: str):
    stats = self.stats
    presence = stats.presence[split]
    start = last = time.time()
    done = 0  # Items out of decoding (reading runs ahead of it).
    for item, lookup_faults, m in self._decoded(self._items(split, path)):
      done += 1
      faults = item.faults + lookup_faults + m.faults
      for f in faults:
        modality, _, reason = f.partition(":")
        stats.faults.add(modality, reason, item.item_id)
      present = {"text": bool(item.title), "table": bool(item.table_keys),
                 "image": bool(m.image), "video": bool(m.video), "audio": len(m.audio) > 0}
      if not any(present.values()):
        stats.skipped.add("", "no_usable_modality", item.item_id)
        continue
      for k, v in present.items():
        presence[k] += int(v)
      stats.audio_from_video[split] += int(m.audio_from_video)
      if item.label >= 0:
        stats.labels.add(item.label)
      group = self._group_of.get(item.item_id, "")
      stats.written[split] += 1
      yield item.item_id, {
          "item_id": item.item_id,
          "label": np.int32(item.label),
          "fine_group": group,
          "fine_group_id": np.int32(self._group_id[group] if group else -1),
          "title": item.title,
          "table_keys": item.table_keys,
          "table_values": item.table_values,
          "image": m.image,
          "video": m.video,
          "audio": m.audio,
          "faults": faults,
      }
      now = time.time()
      if now - last >= self.log_every_s:
        last = now
        total = self.expected_items.get(split)
        rate = done / (now - start)
        eta = f", about {(total - done) / max(rate, 1e-9) / 60:.1f} min left" if total else ""
        self.log(f"{split}: {done}{f'/{total}' if total else ''} items decoded, "
                 f"{stats.written[split]} written, {rate:.1f} items/s{eta}")
    n, dt = stats.items_in[split], max(time.time() - start, 1e-9)
    self.log(f"{split}: done, {n} items read, {stats.written[split]} written "
             f"in {dt:.1f} s ({n / dt:.1f} items/s)")
