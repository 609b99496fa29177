"""Masking rates of the masked tasks (SCALE.md section 4)."""
import numpy as np

from m5p.data import masking
from m5p.data.tokenizer import MASK_ID


def test_mlm_rates_and_cls_kept():
  rng = np.random.default_rng(0)
  n, length = 4000, 32
  ids = rng.integers(5, 1000, (n, length))
  valid = np.ones(length, bool)
  picked_all, masked_all, random_all, kept_all = 0, 0, 0, 0
  for row in ids:
    out, picked = masking.mlm(row.copy(), valid, rng, 0.15, 1000)
    assert not picked[0] and out[0] == row[0]
    assert (out[~picked] == row[~picked]).all()
    picked_all += picked.sum()
    masked_all += (out[picked] == MASK_ID).sum()
    kept_all += (out[picked] == row[picked]).sum()
  random_all = picked_all - masked_all - kept_all
  assert abs(picked_all / (n * (length - 1)) - 0.15) < 0.01
  assert abs(masked_all / picked_all - 0.8) < 0.02
  assert abs(kept_all / picked_all - 0.1) < 0.02  # A random draw equal to the original is rare.
  assert abs(random_all / picked_all - 0.1) < 0.02


def test_mem_masks_whole_keys_or_values():
  rng = np.random.default_rng(1)
  # [CLS] k0 k0 v0 k1 v1 v1 v1 pad
  ids = np.array([2, 10, 11, 12, 13, 14, 15, 16, 0])
  segment = np.array([0, 1, 1, 2, 1, 2, 2, 2, 0])
  field = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0])
  pairs, keys, values = 0, 0, 0
  for _ in range(4000):
    out, picked = masking.mem(ids, segment, field, 2, rng, 0.15)
    assert (out[picked] == MASK_ID).all() and (out[~picked] == ids[~picked]).all()
    assert not picked[0] and not picked[-1]
    for f in (0, 1):
      sel = picked & (field == f) & (segment > 0)
      if sel.any():
        pairs += 1
        segs = set(segment[sel])
        assert len(segs) == 1  # Only the key or only the value.
        whole = (field == f) & (segment == segs.pop())
        assert (sel == whole).all()  # ... and all of its tokens.
        keys += segment[sel][0] == 1
        values += segment[sel][0] == 2
  assert abs(pairs / 8000 - 0.15) < 0.015
  assert abs(keys / pairs - 0.5) < 0.05


def test_zero_tokens_rates():
  rng = np.random.default_rng(2)
  valid = np.arange(100) < 80
  zeroed_total, picked_total = 0, 0
  for _ in range(2000):
    zeroed, picked = masking.zero_tokens(valid, rng, 0.15)
    assert not picked[80:].any() and not (zeroed & ~picked).any()
    zeroed_total += zeroed.sum()
    picked_total += picked.sum()
  assert abs(picked_total / (2000 * 80) - 0.15) < 0.005
  assert abs(zeroed_total / picked_total - 0.9) < 0.01


def test_picks_over_the_cap_are_dropped_at_random_and_unmasked():
  """cap_picks keeps a random `slots` of a row's picks (every position can
  survive), restores the others' input ids and counts them; lm_slots lays
  the kept picks out in order with their original ids and weight 1."""
  from m5p.data import batch_spec
  rng = np.random.default_rng(3)
  ids = np.arange(10, 30)
  picked = np.zeros(20, bool)
  picked[[2, 5, 7, 11, 13, 17]] = True
  masked = np.where(picked, MASK_ID, ids)
  survivors = np.zeros(20, int)
  for _ in range(300):
    out, kept, dropped = masking.cap_picks(masked, ids, picked, 4, rng)
    assert dropped == 2 and kept.sum() == 4 and (kept <= picked).all()
    assert (out[kept] == MASK_ID).all() and (out[~kept] == ids[~kept]).all()
    survivors += kept
    positions, lm_ids, weights, extra = batch_spec.lm_slots(kept, ids, 5)
    assert extra == 0 and list(weights) == [1, 1, 1, 1, 0]
    assert (positions[:4] == np.flatnonzero(kept)).all() and (lm_ids[:4] == ids[kept]).all()
  assert (survivors[picked] > 0).all() and survivors[~picked].sum() == 0
  out, kept, dropped = masking.cap_picks(masked, ids, picked, 6, rng)  # Fits: unchanged.
  assert dropped == 0 and (out == masked).all() and (kept == picked).all()
