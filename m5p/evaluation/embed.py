"""Embeds a whole split with the model, sharded like training, gathered to the host."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from m5p import distributed, sharding
from m5p.data import pipeline

EMBEDDING_KEYS = ("fused", "pooled", "z", "present")


def make_embed_fn(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable:
  def embed(params, batch):
    out = model.apply({"params": params}, batch, train=False)
    return {k: out[k] for k in EMBEDDING_KEYS}

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(getattr(model, "config", None))):
    return jax.jit(embed, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def _gather_bytes(values: np.ndarray) -> np.ndarray:
  """All processes' byte strings (e.g. item ids), concatenated in process order."""
  lengths = np.array([len(v) for v in values], np.int32)
  width = max(int(np.asarray(multihost_utils.process_allgather(
      np.int32(lengths.max(initial=0)))).max()), 1)
  codes = np.zeros((len(values), width), np.uint8)
  for i, v in enumerate(values):
    codes[i, :len(v)] = np.frombuffer(v, np.uint8)
  codes = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
  lengths = np.asarray(multihost_utils.process_allgather(lengths, tiled=True))
  return np.array([bytes(row[:n]) for row, n in zip(codes, lengths)], object)


def embed_split(embed_fn: Callable, params: Any, config: ml_collections.ConfigDict, mesh: Mesh,
                data_dir: str, split: str,
                keep_modalities: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Returns {'fused','pooled','z','present','label','fine_group','index','item_id'} per record.

  `keep_modalities` [5] bool: embed as if the products had only those
  modalities (the others are marked absent: any-modality retrieval).
  """
  batch_shard = sharding.batch_sharding(mesh)
  chunks: dict[str, list] = {}
  for batch in pipeline.eval_batches(config, data_dir, split):
    host = {"label": batch["label"], "fine_group": batch["fine_group"], "index": batch["index"],
            "item_id": batch.pop("item_id")}
    if keep_modalities is not None:
      batch["present"] = batch["present"] & np.asarray(keep_modalities, bool)[None]
    device_batch = {k: jax.make_array_from_process_local_data(batch_shard, v) for k, v in batch.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
      if not chunks and jax.process_count() > 1:  # Compile, then start together (see barrier).
        embed_fn.lower(params, device_batch).compile()
        distributed.barrier("embed_compiled")
      out = embed_fn(params, device_batch)
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(jax.device_get(v)))
    if jax.process_count() > 1:
      ids = host.pop("item_id")
      host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in host.items()}
      host["item_id"] = _gather_bytes(ids)
    for k, v in host.items():
      chunks.setdefault(k, []).append(v)
  result = {k: np.concatenate(v) for k, v in chunks.items()}
  keep = result["index"] >= 0  # Drop padding rows.
  return {k: v[keep] for k, v in result.items()}
