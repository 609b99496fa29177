"""The batch layout: the one contract between the input pipeline and the model.

Every batch is a flat dict of fixed-shape numpy/jax arrays (B = batch):

  text_ids        [B, Lt]  int32  [CLS] title tokens, MLM-masked input
  text_mask       [B, Lt]  bool   real (non-pad) tokens
  text_targets    [B, Lt]  int32  original ids (MLM targets)
  text_loss_mask  [B, Lt]  bool   positions picked for MLM
  table_ids       [B, Lp]  int32  [CLS] k1 v1 k2 v2 ... tokens, MEM-masked input
  table_mask      [B, Lp]  bool
  table_segment   [B, Lp]  int32  0 [CLS]/pad, 1 key token, 2 value token
  table_field     [B, Lp]  int32  index of the key/value pair (< max_fields)
  table_targets   [B, Lp]  int32
  table_loss_mask [B, Lp]  bool   tokens of the picked keys / values (MEM)
  image           [B, H, W, 3]     uint8
  image_zero      [B, Ni]  bool   patches zeroed at the input (MRM)
  image_loss_mask [B, Ni]  bool   patches picked for MRM
  video           [B, T, H, W, 3]  uint8  frames at 1 fps
  video_mask      [B, T]   bool   real frames
  video_zero      [B, T]   bool   frames zeroed at the input (MFM)
  video_loss_mask [B, T]   bool
  audio           [B, Ta, F] float32 log-mel, standardised
  audio_mask      [B, Na]  bool   audio patches holding real frames
  audio_zero      [B, Na]  bool   (MAM)
  audio_loss_mask [B, Na]  bool
  present         [B, 5]   bool   modality presence, order of m5p.modalities
  label           [B]      int32  category, -1 unknown
  fine_group      [B]      int32  instance group, -1 none
  index           [B]      int32  record index within its split (-1 for padding rows)

Absent modalities are zero-filled with all masks False. Ni = (H/patch)^2,
Na = (Ta/audio_patch[0]) * (F/audio_patch[1]).
"""
from __future__ import annotations

import ml_collections
import numpy as np


def num_image_patches(config: ml_collections.ConfigDict) -> int:
  side = config.data.image_size // config.model.patch_size
  return side * side


def audio_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  pt, pf = config.model.audio_patch
  return config.data.audio_frames // pt, config.data.n_mels // pf


def num_audio_patches(config: ml_collections.ConfigDict) -> int:
  t, f = audio_grid(config)
  return t * f


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of every batch field."""
  d, B = config.data, batch_size
  lt, lp, s, t = d.text_len, d.table_len, d.image_size, d.max_frames
  ni, na = num_image_patches(config), num_audio_patches(config)
  i32, b8 = np.dtype(np.int32), np.dtype(bool)
  return {
      "text_ids": ((B, lt), i32), "text_mask": ((B, lt), b8),
      "text_targets": ((B, lt), i32), "text_loss_mask": ((B, lt), b8),
      "table_ids": ((B, lp), i32), "table_mask": ((B, lp), b8),
      "table_segment": ((B, lp), i32), "table_field": ((B, lp), i32),
      "table_targets": ((B, lp), i32), "table_loss_mask": ((B, lp), b8),
      "image": ((B, s, s, 3), np.dtype(np.uint8)),
      "image_zero": ((B, ni), b8), "image_loss_mask": ((B, ni), b8),
      "video": ((B, t, s, s, 3), np.dtype(np.uint8)), "video_mask": ((B, t), b8),
      "video_zero": ((B, t), b8), "video_loss_mask": ((B, t), b8),
      "audio": ((B, d.audio_frames, d.n_mels), np.dtype(np.float32)),
      "audio_mask": ((B, na), b8), "audio_zero": ((B, na), b8),
      "audio_loss_mask": ((B, na), b8),
      "present": ((B, 5), b8),
      "label": ((B,), i32), "fine_group": ((B,), i32), "index": ((B,), i32),
  }


def random_batch(config: ml_collections.ConfigDict, batch_size: int, seed: int = 0,
                 present_prob: float = 0.8) -> dict[str, np.ndarray]:
  """A valid batch of random content: for model tests and benchmarks without data."""
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(config, batch_size)
  b = {}
  for name, (shape, dtype) in shapes.items():
    if dtype == np.uint8:
      b[name] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif dtype == np.float32:
      b[name] = rng.standard_normal(shape).astype(np.float32)
    elif dtype == bool:
      b[name] = rng.random(shape) < 0.5
    else:
      b[name] = np.zeros(shape, np.int32)
  B, vocab = batch_size, config.data.vocab_size
  for mod, length in (("text", config.data.text_len), ("table", config.data.table_len)):
    ids = rng.integers(5, vocab, (B, length)).astype(np.int32)
    ids[:, 0] = 2
    lengths = rng.integers(2, length + 1, B)
    mask = np.arange(length)[None] < lengths[:, None]
    b[f"{mod}_ids"] = np.where(mask, ids, 0).astype(np.int32)
    b[f"{mod}_targets"] = b[f"{mod}_ids"].copy()
    b[f"{mod}_mask"] = mask
    b[f"{mod}_loss_mask"] = mask & (rng.random((B, length)) < 0.15)
    b[f"{mod}_loss_mask"][:, 0] = False
  b["table_segment"] = np.where(b["table_mask"], 1 + (np.arange(config.data.table_len) % 2)[None], 0).astype(np.int32)
  b["table_segment"][:, 0] = 0
  b["table_field"] = np.minimum(np.arange(config.data.table_len) // 2, config.data.max_fields - 1)[None].repeat(B, 0).astype(np.int32)
  b["video_mask"] = np.arange(config.data.max_frames)[None] < rng.integers(1, config.data.max_frames + 1, B)[:, None]
  na = b["audio_mask"].shape[1]
  b["audio_mask"] = np.arange(na)[None] < rng.integers(1, na + 1, B)[:, None]
  for mod in ("image", "video", "audio"):
    valid = np.ones_like(b[f"{mod}_zero"]) if mod == "image" else b[f"{mod}_mask"]
    b[f"{mod}_loss_mask"] &= valid
    b[f"{mod}_zero"] = b[f"{mod}_loss_mask"] & (rng.random(valid.shape) < 0.9)
  b["present"] = rng.random((B, 5)) < present_prob
  b["present"][np.arange(B), rng.integers(0, 5, B)] = True  # At least one modality.
  b["label"] = rng.integers(0, 10, B).astype(np.int32)
  b["fine_group"] = rng.integers(0, 3 * B, B).astype(np.int32)
  b["index"] = np.arange(B, dtype=np.int32)
  return b
