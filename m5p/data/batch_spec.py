"""The batch layout: the one contract between the input pipeline and the model.

Every batch is a flat dict of fixed-shape numpy/jax arrays (B = batch):

  text_ids        [B, Lt]  int32  [CLS] title tokens, MLM-masked input
  text_mask       [B, Lt]  bool   real (non-pad) tokens
  text_lm_positions [B, Pt] int32 positions picked for MLM (BERT's
                                  masked_lm_positions; Pt = max_predictions.text)
  text_lm_ids     [B, Pt]  int32  their original ids (the MLM targets)
  text_lm_weights [B, Pt]  float32 1 for a real pick, 0 for an empty slot
  text_lm_dropped [B]      int32  picks beyond the Pt slots (unmasked again, not predicted)
  table_ids       [B, Lp]  int32  [CLS] k1 v1 k2 v2 ... tokens, MEM-masked input
  table_mask      [B, Lp]  bool
  table_segment   [B, Lp]  int32  0 [CLS]/pad, 1 key token, 2 value token
  table_field     [B, Lp]  int32  index of the key/value pair (< max_fields)
  table_lm_positions, table_lm_ids, table_lm_weights [B, Pp], table_lm_dropped [B]:
                                  the same for MEM (tokens of the picked keys / values)
  image           [B, H, W, 3]     uint8   ('features' stem: [B, Ni, Di] float32)
  image_mask      [B, Ni]  bool   real image tokens (patches: all, when present)
  image_zero      [B, Ni]  bool   patches zeroed at the input (MRM)
  image_loss_mask [B, Ni]  bool   patches picked for MRM
  video           [B, T, H, W, 3]  uint8  frames at 1 fps ('features': [B, T, Dv] float32)
  video_mask      [B, T]   bool   real frames
  video_zero      [B, T]   bool   frames zeroed at the input (MFM)
  video_loss_mask [B, T]   bool
  audio           [B, Ta, F] float32 log-mel, standardised ('features': [B, Na, Da])
  audio_mask      [B, Na]  bool   audio patches holding real frames
  audio_zero      [B, Na]  bool   (MAM)
  audio_loss_mask [B, Na]  bool
  present         [B, 5]   bool   modality presence, order of m5p.modalities
  label           [B]      int32  category, -1 unknown
  fine_group      [B]      int32  instance group, -1 none
  index           [B]      int32  record index within its split (-1 for padding rows)

Absent modalities are zero-filled with all masks False. The model needs only
`MODEL_INPUTS` (what serving feeds); the rest are training targets and
input masking (`TRAINING_FIELDS`) and bookkeeping. Ni = (H/patch)^2,
Na = (Ta/audio_patch[0]) * (F/audio_patch[1]), T = max_frames; with a
'features' stem (config.model.stem) the modality's field holds its
precomputed features cut or padded to config.data.features[m] = (tokens,
dim), and Ni / T / Na are those token counts.
"""
from __future__ import annotations

import ml_collections
import numpy as np


STEMS = ("media", "features")
LM_SEQUENCES = ("text", "table")  # The sequences the LM head predicts picks of (MLM, MEM).

# The fields the model reads to embed a product (evaluation, serving).
MODEL_INPUTS = ("present", "text_ids", "text_mask", "table_ids", "table_mask", "table_segment",
                "table_field", "image", "image_mask", "video", "video_mask", "audio", "audio_mask")
# Training only: the masked tasks' picks, targets and input masking.
TRAINING_FIELDS = tuple(f"{s}_lm_{f}" for s in LM_SEQUENCES
                        for f in ("positions", "ids", "weights", "dropped")) + tuple(
    f"{m}_{f}" for m in ("image", "video", "audio") for f in ("zero", "loss_mask"))


def max_predictions(config: ml_collections.ConfigDict, sequence: str) -> int:
  """Pick slots per sequence for MLM ('text') / MEM ('table'):
  config.loss.max_predictions, at most the sequence's length."""
  value = int(config.loss.max_predictions[sequence])
  if value < 1:
    raise ValueError(f"config.loss.max_predictions.{sequence}={value}: expected >= 1")
  return min(value, int(config.data.text_len if sequence == "text" else config.data.table_len))


def stem(config: ml_collections.ConfigDict, modality: str) -> str:
  """config.model.stem[modality] ('media' when the config predates stems), checked."""
  stems = config.model.get("stem", None)
  value = stems.get(modality, "media") if stems is not None else "media"
  if value not in STEMS:
    raise ValueError(f"config.model.stem.{modality}={value!r}: expected one of {STEMS}")
  return value


def feature_shape(config: ml_collections.ConfigDict, modality: str) -> tuple[int, int]:
  """(tokens, dim) of a 'features' stem's input."""
  tokens, dim = (int(v) for v in config.data.features[modality])
  if tokens < 1 or dim < 1:
    raise ValueError(f"config.data.features.{modality}={(tokens, dim)}: expected positive sizes")
  return tokens, dim


def num_image_patches(config: ml_collections.ConfigDict) -> int:
  """Image tokens (without the CLS): patches, or feature regions."""
  if stem(config, "image") == "features":
    return feature_shape(config, "image")[0]
  side = config.data.image_size // config.model.patch_size
  return side * side


def num_video_frames(config: ml_collections.ConfigDict) -> int:
  """Video tokens (without the CLS): frames, or feature rows."""
  if stem(config, "video") == "features":
    return feature_shape(config, "video")[0]
  return int(config.data.max_frames)


def audio_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  pt, pf = config.model.audio_patch
  return config.data.audio_frames // pt, config.data.n_mels // pf


def num_audio_patches(config: ml_collections.ConfigDict) -> int:
  """Audio tokens (without the CLS): log-mel patches, or feature rows."""
  if stem(config, "audio") == "features":
    return feature_shape(config, "audio")[0]
  t, f = audio_grid(config)
  return t * f


def lm_slots(picked: np.ndarray, targets: np.ndarray, slots: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.int32]:
  """One sequence's picks [L] bool and original ids [L] -> (positions [slots]
  int32, ids [slots] int32, weights [slots] float32, dropped): the picked
  positions in order, then empty slots (position 0, id 0, weight 0); picks
  beyond `slots` are counted in `dropped` (the pipeline caps them first, see
  masking.cap_picks, so this is 0 there)."""
  where = np.flatnonzero(picked)
  kept = where[:slots]
  positions = np.zeros(slots, np.int32)
  positions[:len(kept)] = kept
  ids = np.zeros(slots, np.int32)
  ids[:len(kept)] = targets[kept]
  weights = (np.arange(slots) < len(kept)).astype(np.float32)
  return positions, ids, weights, np.int32(len(where) - len(kept))


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of every batch field."""
  d, B = config.data, batch_size
  lt, lp, s = d.text_len, d.table_len, d.image_size
  ni, t, na = num_image_patches(config), num_video_frames(config), num_audio_patches(config)
  pt, pp = max_predictions(config, "text"), max_predictions(config, "table")
  i32, b8, f32 = np.dtype(np.int32), np.dtype(bool), np.dtype(np.float32)
  media = {
      "image": ((B, ni, feature_shape(config, "image")[1]), f32)
      if stem(config, "image") == "features" else ((B, s, s, 3), np.dtype(np.uint8)),
      "video": ((B, t, feature_shape(config, "video")[1]), f32)
      if stem(config, "video") == "features" else ((B, t, s, s, 3), np.dtype(np.uint8)),
      "audio": ((B, na, feature_shape(config, "audio")[1]), f32)
      if stem(config, "audio") == "features" else ((B, d.audio_frames, d.n_mels), f32),
  }
  return {
      "text_ids": ((B, lt), i32), "text_mask": ((B, lt), b8),
      "text_lm_positions": ((B, pt), i32), "text_lm_ids": ((B, pt), i32),
      "text_lm_weights": ((B, pt), f32), "text_lm_dropped": ((B,), i32),
      "table_ids": ((B, lp), i32), "table_mask": ((B, lp), b8),
      "table_segment": ((B, lp), i32), "table_field": ((B, lp), i32),
      "table_lm_positions": ((B, pp), i32), "table_lm_ids": ((B, pp), i32),
      "table_lm_weights": ((B, pp), f32), "table_lm_dropped": ((B,), i32),
      "image": media["image"], "image_mask": ((B, ni), b8),
      "image_zero": ((B, ni), b8), "image_loss_mask": ((B, ni), b8),
      "video": media["video"], "video_mask": ((B, t), b8),
      "video_zero": ((B, t), b8), "video_loss_mask": ((B, t), b8),
      "audio": media["audio"],
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
    if name in TRAINING_FIELDS and name.endswith(("_lm_positions", "_lm_ids", "_lm_weights",
                                                  "_lm_dropped")):
      continue  # Set below, from the masks.
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
    b[f"{mod}_mask"] = mask
    picked = mask & (rng.random((B, length)) < 0.15)
    picked[:, 0] = False
    slots = max_predictions(config, mod)
    fields = [lm_slots(p, t, slots) for p, t in zip(picked, b[f"{mod}_ids"])]
    for k, name in enumerate(("positions", "ids", "weights", "dropped")):
      b[f"{mod}_lm_{name}"] = np.stack([f[k] for f in fields])
  b["table_segment"] = np.where(b["table_mask"], 1 + (np.arange(config.data.table_len) % 2)[None], 0).astype(np.int32)
  b["table_segment"][:, 0] = 0
  b["table_field"] = np.minimum(np.arange(config.data.table_len) // 2, config.data.max_fields - 1)[None].repeat(B, 0).astype(np.int32)
  for mod in ("image", "video", "audio"):
    n = b[f"{mod}_mask"].shape[1]
    if mod == "image" and stem(config, "image") == "media":
      b["image_mask"] = np.ones((B, n), bool)  # Every patch of an image is real.
    else:
      b[f"{mod}_mask"] = np.arange(n)[None] < rng.integers(1, n + 1, B)[:, None]
    valid = b[f"{mod}_mask"]
    b[f"{mod}_loss_mask"] &= valid
    b[f"{mod}_zero"] = b[f"{mod}_loss_mask"] & (rng.random(valid.shape) < 0.9)
  b["present"] = rng.random((B, 5)) < present_prob
  b["present"][np.arange(B), rng.integers(0, 5, B)] = True  # At least one modality.
  b["label"] = rng.integers(0, 10, B).astype(np.int32)
  b["fine_group"] = rng.integers(0, 3 * B, B).astype(np.int32)
  b["index"] = np.arange(B, dtype=np.int32)
  return b
