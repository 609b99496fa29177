"""Grain input pipelines over the converted ArrayRecord dataset.

Training: source -> seeded global shuffle (a new order each epoch) -> repeat
-> this process's rows of each global batch -> decode/tokenize/mask (seeded
by global position) -> batch of the per-process batch size -> prefetch. The
global batches do not depend on the number of processes. The iterator is a Grain
`DatasetIterator` whose state is saved with every checkpoint, so a resumed
run sees exactly the batches it would have seen.

Evaluation: the split in order, unmasked, padded to whole batches (padding
rows have `index == -1` and no modality present).
"""
from __future__ import annotations

import os

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
  n = len(ds)
  b = local_batch_size(config.batch_size, count)
  if n < config.batch_size:
    raise ValueError(f"Split '{split}' has {n} records; fewer than one global batch of "
                     f"{config.batch_size}.")
  ds = ds.shuffle(seed=config.seed).repeat(None).map_with_index(lambda pos, x: (pos, x))
  ds = _ProcessRows(ds, index, count, b)
  ds = ds.map(_SeededByPosition(Preprocessor(config, _tokenizer_path(data_dir), train=True),
                                config.seed + 1))
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
