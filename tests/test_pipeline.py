"""The Grain pipeline: fixed shapes, determinism, exact resume."""
import jax
import numpy as np

from conftest import tiny_config
from m5p.data import batch_spec, pipeline


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_match_the_batch_spec(tiny_dataset):
  c = tiny_config()
  batch = next(iter(pipeline.train_dataset(c, tiny_dataset)))
  spec = batch_spec.batch_shapes(c, c.batch_size)
  assert set(batch) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  assert batch["present"].any(1).all()  # Every product has at least one modality.
  # Absent modalities carry no valid tokens.
  assert not (batch["text_mask"].any(1) & ~batch["present"][:, 0]).any()
  assert not (batch["video_mask"].any(1) & ~batch["present"][:, 3]).any()


def test_lm_picks_are_static_slots_of_the_masked_tokens(tiny_dataset):
  """MLM / MEM picks come as fixed-size slots (config.loss.max_predictions):
  every slot with weight 1 points at a picked position whose target is the
  original token; every masked ([MASK]) input token has a slot; with one
  slot a sequence, the extra picks are counted in `<seq>_lm_dropped` and
  their inputs left unmasked."""
  from m5p.data.tokenizer import MASK_ID
  for slots in (None, 1):
    c = tiny_config(**({} if slots is None else {"loss.max_predictions.text": slots,
                                                  "loss.max_predictions.table": slots}))
    batch = next(iter(pipeline.train_dataset(c, tiny_dataset)))
    for name in ("text", "table"):
      ids, weights = batch[f"{name}_ids"], batch[f"{name}_lm_weights"]
      positions, targets = batch[f"{name}_lm_positions"], batch[f"{name}_lm_ids"]
      assert positions.shape == (c.batch_size, batch_spec.max_predictions(c, name))
      rows = np.arange(c.batch_size)[:, None]
      real = weights > 0
      assert (targets[real] != MASK_ID).all() and (targets[real] > 4).all()
      slotted = np.zeros(ids.shape, bool)
      slotted[np.broadcast_to(rows, positions.shape)[real], positions[real]] = True
      assert ((ids == MASK_ID) <= slotted).all()  # No masked input without a slot.
      dropped = batch[f"{name}_lm_dropped"]
      if slots is None:
        assert real.sum() > 0 and dropped.sum() == 0, name
      else:
        assert dropped.sum() > 0 and (real.sum(1) <= 1).all(), name


def test_same_seed_same_batches_and_other_seed_differs(tiny_dataset):
  c = tiny_config()
  a = _take(iter(pipeline.train_dataset(c, tiny_dataset)), 3)
  b = _take(iter(pipeline.train_dataset(c, tiny_dataset)), 3)
  assert all(_same(x, y) for x, y in zip(a, b))
  c.seed = 1
  d = _take(iter(pipeline.train_dataset(c, tiny_dataset)), 1)
  assert not np.array_equal(a[0]["index"], d[0]["index"])


def test_resume_from_iterator_state_is_exact(tiny_dataset):
  c = tiny_config()
  it = iter(pipeline.train_dataset(c, tiny_dataset))
  _take(it, 4)
  state = it.get_state()
  expected = _take(it, 5)  # Crosses an epoch boundary: 8 batches of 16 > the train split.
  resumed = iter(pipeline.train_dataset(c, tiny_dataset))
  resumed.set_state(state)
  assert all(_same(x, y) for x, y in zip(expected, _take(resumed, 5)))


def test_epochs_cover_the_split_and_reshuffle(tiny_dataset):
  c = tiny_config(batch_size=8)
  from m5p.data import convert
  n = convert.load_manifest(tiny_dataset)["splits"]["train"]
  it = iter(pipeline.train_dataset(c, tiny_dataset))
  first = np.concatenate([b["index"] for b in _take(it, n // 8)])
  assert len(set(first.tolist())) == len(first)  # No repeats within an epoch.
  second = np.concatenate([b["index"] for b in _take(it, n // 8)])
  assert not np.array_equal(first, second)


def test_eval_batches_cover_the_split_once(tiny_dataset):
  c = tiny_config()
  from m5p.data import convert
  n = convert.load_manifest(tiny_dataset)["splits"]["test"]
  idx = np.concatenate([b["index"] for b in pipeline.eval_batches(c, tiny_dataset, "test")])
  assert sorted(idx[idx >= 0].tolist()) == list(range(n))
  assert jax.process_count() == 1


def test_processes_read_disjoint_rows_and_the_same_global_batches(tiny_dataset):
  """Simulated hosts: each reads its own rows; together, every record once an
  epoch, and the global batches (masking included) equal a one-process run's."""
  from m5p.data import convert
  n = convert.load_manifest(tiny_dataset)["splits"]["train"]
  steps = n // 8 + 1  # Past the end of the first epoch.
  single = _take(iter(pipeline.train_dataset(tiny_config(batch_size=8), tiny_dataset)), steps)
  for count in (2, 4):
    c = tiny_config(batch_size=8)
    local = [_take(iter(pipeline.train_dataset(c, tiny_dataset, process_index=p,
                                               process_count=count)), steps)
             for p in range(count)]
    for step in range(steps):
      rebuilt = {k: np.concatenate([local[p][step][k] for p in range(count)]) for k in single[step]}
      assert _same(rebuilt, single[step]), (count, step)
    first_epoch = [(p, int(i)) for p in range(count)
                   for pos, i in enumerate(np.concatenate([b["index"] for b in local[p]]))
                   if (pos // (8 // count)) * 8 + p * (8 // count) + pos % (8 // count) < n]
    assert sorted(i for _, i in first_epoch) == list(range(n)), count  # Once each, no overlap.


def test_a_process_resumes_its_own_sequence(tiny_dataset):
  c = tiny_config(batch_size=8)
  make = lambda: iter(pipeline.train_dataset(c, tiny_dataset, process_index=1, process_count=2))
  it = make()
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  other = iter(pipeline.train_dataset(c, tiny_dataset, process_index=0, process_count=2))
  assert not np.intersect1d(expected[0]["index"], next(other)["index"]).size
  resumed = make()
  resumed.set_state(state)
  assert all(_same(x, y) for x, y in zip(expected, _take(resumed, 4)))
