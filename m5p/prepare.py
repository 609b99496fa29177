"""Finds or makes the converted dataset a run trains on.

- `config.data.dir` holds a converted dataset (manifest.json): use it.
- else `config.data.raw_dir` is a raw M5Product layout: convert it into
  `config.data.dir` (or `<workdir>/data`).
- else: generate a synthetic M5Product into `<workdir>/raw` and convert it.
Each stage is skipped when its output is complete, so reruns are cheap.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from m5p.data import convert

log = logging.getLogger("m5p")


def _has_dataset(data_dir: str) -> bool:
  return bool(data_dir) and os.path.exists(os.path.join(data_dir, "manifest.json"))


def _is_stale(data_dir: str) -> bool:
  """A finished conversion whose records an older m5p wrote (another RECORD_VERSION)."""
  try:
    convert.load_manifest(data_dir)
  except ValueError:
    return True
  return False


def _convert(config: ml_collections.ConfigDict, raw_dir: str, data_dir: str,
             overwrite: bool = False) -> None:
  d = config.data
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  t0 = time.perf_counter()
  log.info("Converting %s -> %s", raw_dir, data_dir)
  convert.convert(raw_dir, data_dir, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                  max_audio_seconds=d.max_audio_seconds, num_shards=d.num_shards,
                  vocab_size=d.vocab_size, overwrite=overwrite, log=log.info)
  log.info("Conversion done in %.1fs.", time.perf_counter() - t0)


def _generate(config: ml_collections.ConfigDict, raw_dir: str) -> None:
  from m5p.data import synthetic
  n, seed = int(config.data.synthetic_products), int(config.data.synthetic_seed)
  done = synthetic.load_summary(raw_dir)
  if done and done["params"].get("num_products") == n and done["params"].get("seed") == seed:
    log.info("Using the synthetic M5Product already in %s.", raw_dir)
    return
  t0 = time.perf_counter()
  log.info("Generating a synthetic M5Product (%d products, seed %d) in %s", n, seed, raw_dir)
  synthetic.generate(raw_dir, n, seed, log_every=200, overwrite=done is not None)
  log.info("Synthetic data written in %.1fs.", time.perf_counter() - t0)


def ensure_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Returns the directory of a converted dataset, making it first if needed."""
  d = config.data
  data_dir = d.dir or os.path.join(workdir, "data")
  # The run's own conversion (no data.dir), written by an older m5p: convert again.
  stale = not d.dir and _has_dataset(data_dir) and _is_stale(data_dir)
  if stale and jax.process_index() == 0:
    log.info("%s holds records of an older m5p version; converting again.", data_dir)
  if jax.process_index() == 0 and (stale or not _has_dataset(data_dir)):
    if d.raw_dir:
      _convert(config, d.raw_dir, data_dir, overwrite=stale)
    elif d.dir:
      raise FileNotFoundError(f"config.data.dir={d.dir!r} holds no manifest.json, and no "
                              "config.data.raw_dir was given to convert from.")
    else:
      raw_dir = os.path.join(workdir, "raw")
      _generate(config, raw_dir)
      _convert(config, raw_dir, data_dir, overwrite=stale)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("m5p_dataset_ready")
  return data_dir
