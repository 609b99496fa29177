"""Raw M5Product layout -> tokenizer + TFDS ArrayRecord dataset + manifest.

`convert()` writes, under `output_dir`:

  tokenizer.model   SentencePiece model trained on the train split's text
  tfds/m5_product/<config>/<version>/   the TFDS dataset (ArrayRecord shards)
  manifest.json     what was written and what went wrong (written last: its
                    presence means the conversion finished)

`load_manifest()` and `open_split()` are how the input pipeline finds it.
Reading needs no TensorFlow: `open_split` returns TFDS's ArrayRecord data
source, whose items are dicts of numpy values (see `open_split`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import shard_utils

from m5p.data import raw_layout, schema
from m5p.data.m5product_builder import M5Product, M5ProductConfig
from m5p.data.raw_layout import ConversionError
from m5p.data.tokenizer import train_tokenizer

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TFDS_SUBDIR = "tfds"
MAX_TOKENIZER_LINES = 2_000_000
MODALITY_ORDER = ("text", "table", "image", "video", "audio")

__all__ = ["ConversionError", "convert", "load_manifest", "open_split", "tokenizer_path"]


# TFDS 4.9.10 takes one shard count for every split (DownloadConfig.num_shards)
# and fails when a split has fewer examples than shards. This config makes the
# count an upper bound per split: min(num_shards, num_examples).
@dataclasses.dataclass(frozen=True)
class _AtMostShardConfig(shard_utils.ShardConfig):

  def get_number_shards(self, total_size: int, num_examples: int,
                        uses_precise_sharding: bool = True) -> int:
    if self.num_shards:
      return max(1, min(self.num_shards, num_examples))
    return super().get_number_shards(total_size, num_examples, uses_precise_sharding)


@dataclasses.dataclass(eq=False)
class _DownloadConfig(tfds.download.DownloadConfig):

  def get_shard_config(self) -> shard_utils.ShardConfig:
    return _AtMostShardConfig(num_shards=self.num_shards, min_shard_size=self.min_shard_size,
                              max_shard_size=self.max_shard_size)


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


def _remove_empty_tree(path: str) -> None:
  """Removes `path` if it holds nothing but empty folders."""
  if not os.path.isdir(path):
    return
  for dirpath, _, files in os.walk(path):
    if files:
      return
  shutil.rmtree(path)


def _clear_previous(output_dir: str, overwrite: bool) -> None:
  targets = [os.path.join(output_dir, n) for n in (MANIFEST, TOKENIZER, TFDS_SUBDIR)]
  existing = [t for t in targets if os.path.exists(t)]
  if existing and not overwrite:
    what = "a conversion" if os.path.exists(targets[0]) else "an unfinished conversion"
    raise ConversionError(
        f"{output_dir} already holds {what} ({', '.join(map(os.path.basename, existing))}); "
        "choose another output folder or pass overwrite=True.")
  for t in existing:
    shutil.rmtree(t) if os.path.isdir(t) else os.remove(t)


def convert(raw_dir: str, output_dir: str, *, image_size: int, max_frames: int, n_mels: int,
            max_audio_seconds: float, num_shards: int, vocab_size: int,
            workers: int | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Converts the raw layout at `raw_dir` into `output_dir`; returns the manifest.

  Args:
    raw_dir: the raw M5Product layout (shared/M5PRODUCT_LAYOUT.md).
    output_dir: created if needed; must not hold a conversion unless
      `overwrite`.
    image_size, max_frames, n_mels, max_audio_seconds: what records store
      (square JPEG side, 1 fps frames kept, log-mel bins, seconds of audio).
    num_shards: ArrayRecord shards per split (fewer for a split with fewer
      examples).
    vocab_size: SentencePiece vocabulary (a small corpus may give fewer).
    workers: media-decoding processes; None = os.cpu_count(); 0 = decode in
      this process (then a crashing decoder ends the conversion; with workers
      it only costs that item's media, fault 'crashed'). The records do not
      depend on it.
    overwrite: replace an earlier conversion in `output_dir`.
    log: progress and summary lines.

  Counts in the manifest: `faults` and `presence` count items (an item with
  two empty table values counts once under table/empty_value); `faults`
  include items later skipped; `items_in == items_written + skipped`.

  Raises:
    ConversionError: missing `raw_dir`, no split file, unreadable JSON (the
      message names the file), no usable item, or an earlier conversion.
  """
  t_start = time.time()
  raw_layout.check_root(raw_dir)
  split_paths = raw_layout.find_splits(raw_dir)
  id_lists = raw_layout.read_id_lists(raw_dir)
  raw_layout.read_fine_groups(raw_dir)  # Fail now, not after hours of decoding.
  # Reading every split file once up front finds broken JSON before any
  # decoding and gives the totals for progress lines.
  t0 = time.time()
  totals = {s: sum(1 for _ in raw_layout.iter_entries(p)) for s, p in split_paths.items()}
  log(f"splits: {', '.join(f'{s} {n}' for s, n in totals.items())} items "
      f"(read in {time.time() - t0:.1f} s)")
  os.makedirs(output_dir, exist_ok=True)
  _clear_previous(output_dir, overwrite)
  if workers is None:
    workers = os.cpu_count() or 1

  # 1. Tokenizer, on the train split's text (all splits if there is no 'train').
  tok_splits = ["train"] if "train" in split_paths else list(split_paths)
  t0 = time.time()
  lines = list(_tokenizer_lines([split_paths[s] for s in tok_splits], MAX_TOKENIZER_LINES))
  if not any(l.strip() for l in lines) and tok_splits != list(split_paths):
    tok_splits = list(split_paths)
    lines = list(_tokenizer_lines([split_paths[s] for s in tok_splits], MAX_TOKENIZER_LINES))
  if not any(l.strip() for l in lines):
    raise ConversionError(f"{raw_dir}: no title or table text in any split to train the tokenizer on.")
  try:
    train_tokenizer(lines, vocab_size, os.path.join(output_dir, TOKENIZER))
  except RuntimeError as e:  # SentencePiece: e.g. vocab_size below 256 bytes + characters.
    raise ConversionError(f"tokenizer training failed with vocab_size={vocab_size}: {e}") from None
  log(f"tokenizer: {len(lines)} lines of {'+'.join(tok_splits)} in {time.time() - t0:.1f} s "
      f"-> {TOKENIZER}")
  del lines

  # 2. Records.
  config = M5ProductConfig.from_settings(image_size, max_frames, n_mels, max_audio_seconds)
  if config.name in {c.name for c in M5Product.BUILDER_CONFIGS}:
    config = config.name  # TFDS refuses a custom config named like a predefined one.
  builder = M5Product(data_dir=os.path.join(output_dir, TFDS_SUBDIR), config=config,
                      file_format="array_record", workers=workers, log=log)
  builder.expected_items = totals
  t0 = time.time()
  builder.download_and_prepare(download_config=_DownloadConfig(
      manual_dir=raw_dir, num_shards=num_shards, try_download_gcs=False))
  build_s = time.time() - t0
  _remove_empty_tree(os.path.join(output_dir, TFDS_SUBDIR, "downloads"))  # TFDS makes it anyway.

  # 3. Manifest.
  st = builder.stats
  items_in = sum(st.items_in.values())
  written = sum(st.written.values())
  skipped = st.skipped_total()
  if items_in != written + skipped:
    raise AssertionError(f"lost items: {items_in} in != {written} written + {skipped} skipped")
  splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
  if sum(splits.values()) != written:
    raise AssertionError(f"TFDS wrote {splits} but {written} examples were yielded")
  groups = sorted(set(builder._group_of.values()))  # pylint: disable=protected-access
  manifest = {
      "record_version": schema.RECORD_VERSION,
      "dataset_dir": os.path.relpath(os.fspath(builder.data_dir), output_dir),
      "tokenizer": TOKENIZER,
      "splits": dict(sorted(splits.items())),
      "conversion": {
          "image_size": image_size, "max_frames": max_frames, "frames_per_second": 1.0,
          "n_mels": n_mels, "max_audio_seconds": max_audio_seconds,
          "audio_sample_rate": schema.AUDIO_SAMPLE_RATE, "audio_n_fft": schema.AUDIO_N_FFT,
          "audio_hop": schema.AUDIO_HOP, "num_shards": num_shards, "vocab_size": vocab_size,
          "tokenizer_splits": tok_splits, "raw_dir": os.path.abspath(raw_dir),
          "seconds": round(time.time() - t_start, 1),
      },
      "presence": {s: {m: int(st.presence[s][m]) for m in MODALITY_ORDER}
                   for s in sorted(splits)},
      "audio_from_video": {s: int(st.audio_from_video[s]) for s in sorted(splits)},
      "faults": st.faults.report(),
      "skipped": st.skipped_report(),
      "empty_splits": st.empty_splits,
      "items_in": items_in,
      "items_written": written,
      "num_categories": (max(st.labels) + 1) if st.labels else 0,
      "labels_seen": len(st.labels),
      "fine_groups": len(groups),
  }
  if id_lists:
    manifest["splits_files"] = id_lists
  tmp = os.path.join(output_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, ensure_ascii=False, indent=1)
  os.replace(tmp, os.path.join(output_dir, MANIFEST))
  log(f"records: {items_in} items in, {written} written, {skipped} skipped, "
      f"in {build_s:.1f} s ({items_in / max(build_s, 1e-9):.1f} items/s, {workers} workers)")
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
