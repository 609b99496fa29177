"""Grain input pipelines over the converted ArrayRecord dataset.

Training: source -> seeded global shuffle (a new order each epoch) -> repeat
-> this process's rows of each global batch -> decode/tokenize/mask (seeded
by global position) -> batch of the per-process batch size -> prefetch. The
global batches do not depend on the number of processes. The iterator is a Grain
`DatasetIterator` whose state is saved with every checkpoint, so a resumed
run sees exactly the batches it would have seen.

Train-time filters (`config.data.train_list`, `config.data.train_complete_only`)
keep a subset of the split's records, found by one scan of the split at start
(`record_selection`); the stream above then runs over that subset. For
config.task='classify' nothing is masked (the masked tasks are not trained).

Evaluation: the split in order, unmasked, padded to whole batches (padding
rows have `index == -1` and no modality present).
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from m5p.data import convert
from m5p.data.preprocess import Preprocessor


def _indexed_source(data_dir: str, split: str) -> grain.MapDataset:
  source = convert.open_split(data_dir, split)
  return grain.MapDataset.source(source).map_with_index(lambda i, r: (i, r))


def _tokenizer_path(data_dir: str) -> str:
  return os.path.join(data_dir, convert.load_manifest(data_dir)["tokenizer"])


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  # Elements here are whole batches: buffer `prefetch` of them (at least one per thread).
  threads = max(int(config.data.read_threads), 0)
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(int(config.data.prefetch), threads, 1))


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise ValueError(f"batch_size {global_batch} is not divisible by the {count} processes.")
  return global_batch // count


class _ProcessRows(grain.MapDataset):
  """Process p's rows of every global batch of a global stream.

  Local element k is global element (k // b) * B + p * b + k % b (b = B / P
  rows per process), so the global batch at each step is the same for any
  number of processes: a run on 2 hosts sees exactly the batches of a run
  on 1, and each process reads only its own rows.
  """

  def __init__(self, parent: grain.MapDataset, index: int, count: int, local_batch: int):
    super().__init__(parent)
    self._index, self._count, self._b = index, count, local_batch

  def __len__(self) -> int:
    return len(self._parent) // (self._b * self._count) * self._b

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    g = (k // self._b) * self._b * self._count + self._index * self._b + k % self._b
    return self._parent[g]

  def __str__(self) -> str:
    return f"_ProcessRows(process={self._index}/{self._count}, rows={self._b})"


class _Subset(grain.MapDataset):
  """The parent's elements at `rows` (record indices), in that order."""

  def __init__(self, parent: grain.MapDataset, rows: np.ndarray):
    super().__init__(parent)
    self._rows = np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    return self._parent[int(self._rows[k % len(self._rows)])]  # Grain wraps indices.

  def __str__(self) -> str:
    return f"_Subset(rows={len(self._rows)})"


def _list_names(value: Any) -> set[str]:
  return {v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value}


# (data_dir, split, list, complete_only, config json) -> (rows, labels): a run
# scans once even though training and the classification floor both ask.
_SELECTIONS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def record_selection(config: ml_collections.ConfigDict, data_dir: str, split: str,
                     list_name: str = "", complete_only: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(record indices, labels) of the records of `split` whose `lists` hold
  `list_name` ('' = any) and, with `complete_only`, that have all five
  modalities (as the Preprocessor finds them, so exactly what the model sees).

  One threaded scan of the split, decoding every record (about 1 s per 1000
  demo-size records); each process scans the whole split, so every process
  gets the same selection. Raises ValueError when nothing is left.
  """
  key = (os.path.abspath(data_dir), split, list_name, bool(complete_only),
         config.to_json() if complete_only else "")
  if key in _SELECTIONS:
    return _SELECTIONS[key]
  if list_name and list_name not in convert.load_manifest(data_dir).get("splits_files", {}):
    raise ValueError(f"{data_dir}: the dataset has no id list {list_name!r} (splits/"
                     f"{list_name}_ids.txt); its lists: "
                     f"{sorted(convert.load_manifest(data_dir).get('splits_files', {}))}")
  pre = Preprocessor(config, _tokenizer_path(data_dir), train=False) if complete_only else None

  def check(indexed):
    index, record = indexed
    keep = not list_name or list_name in _list_names(record["lists"])
    if keep and pre is not None:
      keep = bool(pre(indexed, np.random.default_rng(0))["present"].all())
    return index, keep, int(record["label"])

  rows, labels = [], []
  threads = max(int(config.data.read_threads), 1)
  scan = _indexed_source(data_dir, split).map(check).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads))
  for index, keep, label in scan:
    if keep:
      rows.append(index)
      labels.append(label)
  if not rows:
    raise ValueError(f"split {split!r} of {data_dir} has no record with "
                     + " and ".join(filter(None, [list_name and f"list {list_name!r}",
                                                  complete_only and "all five modalities"])))
  _SELECTIONS[key] = (np.asarray(rows, np.int64), np.asarray(labels, np.int32))
  return _SELECTIONS[key]


def _training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the training examples are made with: no masking for 'classify'
  (the masked tasks are not trained, and masked inputs would only blur them)."""
  if config.get("task", "pretrain") != "classify":
    return config
  unmasked = ml_collections.ConfigDict(config.to_dict())
  unmasked.loss.mask_prob = 0.0
  return unmasked


class _SeededByPosition:
  """Preprocesses (global position, (record index, record)) with an rng seeded by
  (seed, global position): masking does not depend on the process layout either."""

  def __init__(self, pre: Preprocessor, seed: int):
    self.pre, self.seed = pre, seed

  def __call__(self, positioned):
    position, indexed = positioned
    return self.pre(indexed, np.random.default_rng([self.seed, position]))


def train_dataset(config: ml_collections.ConfigDict, data_dir: str, split: str | None = None, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """The endless, shuffled, masked training stream of this process's batches.

  One global stream for all processes: the split shuffled with the seed (a
  new order each epoch), cut into global batches of `config.batch_size`;
  process p of P reads and preprocesses only rows [p*b, (p+1)*b) of each
  (b = batch_size / P), and the trainer assembles the global batch with
  `jax.make_array_from_process_local_data`. So every record is read by
  exactly one process per epoch, and the global batches (masking included)
  are the same for any number of processes. `process_index`/`process_count`
  default to JAX's (tests pass them to simulate several hosts).
  """
  split = split or config.data.train_split
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  ds = _indexed_source(data_dir, split)
  list_name = str(config.data.get("train_list", ""))
  complete_only = bool(config.data.get("train_complete_only", False))
  if list_name or complete_only:  # Record indices stay those of the split.
    ds = _Subset(ds, record_selection(config, data_dir, split, list_name, complete_only)[0])
  n = len(ds)
  b = local_batch_size(config.batch_size, count)
  if n < config.batch_size:
    raise ValueError(f"Split '{split}' has {n} records (after the train_list / complete-only "
                     f"filters); fewer than one global batch of {config.batch_size}.")
  ds = ds.shuffle(seed=config.seed).repeat(None).map_with_index(lambda pos, x: (pos, x))
  ds = _ProcessRows(ds, index, count, b)
  pre = Preprocessor(_training_config(config), _tokenizer_path(data_dir), train=True)
  ds = ds.map(_SeededByPosition(pre, config.seed + 1))
  ds = ds.batch(b, drop_remainder=True)
  it = ds.to_iter_dataset(_read_options(config))
  if config.data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.data.worker_count)))
  return it


def _pad_rows(batch: dict, size: int) -> dict:
  """Pads a last, short batch with empty rows (index -1, nothing present)."""
  n = len(batch["index"])
  if n == size:
    return batch
  fills = {"index": -1, "label": -1, "fine_group": -1, "item_id": b""}
  return {k: np.concatenate([v, np.full((size - n,) + v.shape[1:], fills.get(k, 0), v.dtype)])
          for k, v in batch.items()}


def _empty_batch(config: ml_collections.ConfigDict, size: int) -> dict:
  """A batch of padding rows only (keeps every process at the same number of batches)."""
  from m5p.data import batch_spec  # pylint: disable=import-outside-toplevel
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_spec.batch_shapes(config, size).items()}
  batch["item_id"] = np.full((size,), b"", object)
  return _pad_rows({k: v[:0] for k, v in batch.items()}, size)


def eval_batches(config: ml_collections.ConfigDict, data_dir: str, split: str,
                 batch_size: int | None = None):
  """Yields unmasked, whole batches of the split in record order (this process's share).

  Process p takes records p, p + P, ...; every process yields the same
  number of batches (padding rows have index -1), as the collectives that
  embed them need. Batches carry an extra host-only field `item_id` (bytes).
  """
  batch_size = batch_size or int(config.eval.batch_size)
  local = local_batch_size(batch_size)
  source = _indexed_source(data_dir, split)
  count = jax.process_count()
  num_batches = -(-(-(-len(source) // count)) // local)  # ceil(ceil(n / P) / b), the same everywhere.
  ds = source[jax.process_index()::count]
  pre = Preprocessor(config, _tokenizer_path(data_dir), train=False)

  def process(indexed):
    ex = pre(indexed, np.random.default_rng(0))
    ex["item_id"] = np.asarray(indexed[1]["item_id"] if isinstance(indexed[1]["item_id"], bytes)
                               else str(indexed[1]["item_id"]).encode())
    return ex

  ds = ds.map(process).batch(local, drop_remainder=False)
  yielded = 0
  for batch in ds.to_iter_dataset(_read_options(config)):
    yielded += 1
    yield _pad_rows(batch, local)
  for _ in range(num_batches - yielded):
    yield _empty_batch(config, local)
