"""Masking for the five masked tasks (SCALE.md section 4), on the host, in numpy.

Every function takes the example's `np.random.Generator` (Grain's random_map
seeds it from the pipeline seed and the element index), so masks are
deterministic and resume exactly.
"""
from __future__ import annotations

import numpy as np

from m5p.data.tokenizer import MASK_ID

FIRST_REGULAR_ID = 5  # Ids below are special (pad, unk, cls, sep, mask).


def mlm(ids: np.ndarray, valid: np.ndarray, rng: np.random.Generator, prob: float,
        vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking: pick `prob` of the real tokens (never [CLS] at 0); 80% -> [MASK],
  10% -> a random token, 10% kept. Returns (masked ids, picked positions)."""
  picked = valid & (rng.random(ids.shape) < prob)
  picked[0] = False
  action = rng.random(ids.shape)
  random_ids = rng.integers(FIRST_REGULAR_ID, vocab_size, ids.shape)
  out = np.where(picked & (action < 0.8), MASK_ID, ids)
  out = np.where(picked & (action >= 0.8) & (action < 0.9), random_ids, out)
  return out.astype(np.int32), picked


def mem(ids: np.ndarray, segment: np.ndarray, field: np.ndarray, num_fields: int,
        rng: np.random.Generator, prob: float) -> tuple[np.ndarray, np.ndarray]:
  """Masked entity modelling: each key/value pair is picked with `prob`; of a picked
  pair, all key tokens or all value tokens (50/50) become [MASK]."""
  pair_picked = rng.random(num_fields) < prob
  mask_value = rng.random(num_fields) < 0.5  # Else mask the key.
  real = segment > 0
  f = np.clip(field, 0, max(num_fields - 1, 0))
  if num_fields == 0:
    return ids.copy(), np.zeros_like(real)
  target_segment = np.where(mask_value[f], 2, 1)
  picked = real & pair_picked[f] & (segment == target_segment)
  return np.where(picked, MASK_ID, ids).astype(np.int32), picked


def cap_picks(masked: np.ndarray, original: np.ndarray, picked: np.ndarray, slots: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
  """At most `slots` picks per sequence (config.loss.max_predictions): a row
  with more keeps a random `slots` of them and gets its other picked tokens
  back unmasked, so no input token is corrupted without being predicted (as
  BERT caps at max_predictions_per_seq). Returns (masked ids, picked, how
  many picks were dropped); the rng is only drawn from when a row overflows."""
  where = np.flatnonzero(picked)
  extra = len(where) - slots
  if extra <= 0:
    return masked, picked, 0
  dropped = rng.choice(where, size=extra, replace=False)
  picked = picked.copy()
  picked[dropped] = False
  masked = masked.copy()
  masked[dropped] = original[dropped]
  return masked, picked, int(extra)


def zero_tokens(valid: np.ndarray, rng: np.random.Generator, prob: float,
                zero_frac: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
  """MRM/MFM/MAM: pick `prob` of the valid tokens; zero `zero_frac` of the picked
  ones at the input and keep the rest. Returns (zeroed, picked)."""
  picked = valid & (rng.random(valid.shape) < prob)
  zeroed = picked & (rng.random(valid.shape) < zero_frac)
  return zeroed, picked
