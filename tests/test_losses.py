"""The harmonized contrastive loss and the masked losses against independent numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m5p import default_config
from m5p.losses import masked
from m5p.losses.contrastive import harmonization_weights, harmonized_contrastive
from m5p.modalities import PAIRS

B, M, P = 6, 5, 8
TAU = 0.1


def _logsumexp(x):
  x = np.asarray(x, np.float64)
  return x.max() + np.log(np.exp(x - x.max()).sum())


def _normalize(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def ref_harmonization(z, present):
  """G per sample, looping over the present modalities only."""
  zn = _normalize(z)
  g = np.zeros((z.shape[0], M, M))
  for b in range(z.shape[0]):
    idx = [m for m in range(M) if present[b, m]]
    s = zn[b, idx] @ zn[b, idx].T
    soft = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    r = s * soft
    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
    for a, i in enumerate(idx):
      for c, j in enumerate(idx):
        g[b, i, j] = r[a, c]
  return g


def ref_clip(z, present, tau, g=None):
  """Symmetric cross-modal InfoNCE, absent rows and columns skipped; returns (loss, pair losses)."""
  zn = _normalize(z)
  g = np.ones((z.shape[0], M, M)) if g is None else g
  pair_losses = {}
  for i, j in PAIRS:
    rows = [b for b in range(z.shape[0]) if present[b, i] and present[b, j]]
    if not rows:
      continue
    total = 0.0
    for q, k in ((i, j), (j, i)):
      cands = [c for c in range(z.shape[0]) if present[c, k]]
      for b in rows:
        logits = [zn[b, q] @ zn[c, k] / tau * g[b, q, k] for c in cands]
        total += _logsumexp(logits) - logits[cands.index(b)]
    pair_losses[(i, j)] = total / (2 * len(rows))
  return float(np.mean(list(pair_losses.values()))), pair_losses


def ref_ntxent(z, present, tau, g=None):
  """SimCLR NT-Xent over [z_i; z_j] per pair, absent rows and columns skipped."""
  zn = _normalize(z)
  n = z.shape[0]
  g = np.ones((n, M, M)) if g is None else g
  losses = []
  for i, j in PAIRS:
    reps = [(b, i) for b in range(n)] + [(b, j) for b in range(n)]
    rows = [r for r, (b, _) in enumerate(reps) if present[b, i] and present[b, j]]
    if not rows:
      continue
    total = 0.0
    for r in rows:
      b, m = reps[r]
      other = j if m == i else i
      cands = [c for c, (bc, mc) in enumerate(reps) if c != r and present[bc, mc]]
      logits = [zn[b, m] @ zn[reps[c][0], reps[c][1]] / tau * g[b, m, other] for c in cands]
      pos = cands.index((r + n) % (2 * n))
      total += _logsumexp(logits) - logits[pos]
    losses.append(total / len(rows))
  return float(np.mean(losses))


@pytest.fixture(scope="module")
def example():
  rng = np.random.default_rng(0)
  z = np.abs(rng.standard_normal((B, M, P))).astype(np.float32)  # ReLU outputs are >= 0.
  all_present = np.ones((B, M), bool)
  some_absent = all_present.copy()
  some_absent[0, [3, 4]] = False
  some_absent[1, [1]] = False
  some_absent[2, [0, 2, 3, 4]] = False  # Only the table.
  some_absent[4, [4]] = False
  some_absent[5, [3]] = False
  return z, all_present, some_absent


@functools.partial(jax.jit, static_argnames=("mode", "infonce"))
def _jit_loss(z, present, weights=None, *, mode, infonce):
  return harmonized_contrastive(z, present, mode=mode, infonce=infonce, temperature=TAU,
                                weights=weights)


def _loss(z, present, *, mode, infonce, weights=None):
  loss, aux = _jit_loss(jnp.asarray(z), jnp.asarray(present), weights, mode=mode, infonce=infonce)
  return float(loss), aux


def test_uniform_clip_matches_reference(example):
  z, all_present, some_absent = example
  for present in (all_present, some_absent):
    loss, aux = _loss(z, present, mode="uniform", infonce="clip")
    ref, ref_pairs = ref_clip(z, present, TAU)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for p, pair in enumerate(PAIRS):
      np.testing.assert_allclose(float(aux["pair_losses"][p]), ref_pairs[pair], rtol=1e-5)


def test_pair_without_rows_is_left_out():
  rng = np.random.default_rng(1)
  z = np.abs(rng.standard_normal((4, M, P))).astype(np.float32)
  present = np.ones((4, M), bool)
  present[:, 4] = False  # No sample has audio: the 4 audio pairs drop out.
  loss, aux = _loss(z, present, mode="uniform", infonce="clip")
  np.testing.assert_allclose(loss, ref_clip(z, present, TAU)[0], rtol=1e-5)
  counts = np.asarray(aux["pair_counts"])
  assert [c for c, (i, j) in zip(counts, PAIRS) if j == 4] == [0, 0, 0, 0]
  assert np.isfinite(loss)


def test_harmonization_matches_reference_and_masks_absent(example):
  z, _, present = example
  g = np.asarray(harmonization_weights(jnp.asarray(z), jnp.asarray(present)))
  np.testing.assert_allclose(g, ref_harmonization(z, present), atol=1e-6)
  norms = np.linalg.norm(g, axis=-1)
  np.testing.assert_allclose(norms[present], 1.0, atol=1e-5)  # Unit rows over present modalities.
  pair = present[:, :, None] & present[:, None, :]
  assert np.all(g[~pair] == 0.0)  # Absent rows and columns are exactly 0.


def test_per_sample_logits_with_unit_weights_equals_uniform(example):
  z, _, present = example
  for infonce in ("clip", "ntxent"):
    uniform, _ = _loss(z, present, mode="uniform", infonce=infonce)
    ones, _ = _loss(z, present, mode="per_sample_logits", infonce=infonce,
                    weights=jnp.ones((B, M, M)))
    np.testing.assert_allclose(ones, uniform, rtol=1e-6)


def test_per_sample_logits_matches_reference(example):
  z, _, present = example
  g = ref_harmonization(z, present)
  loss, aux = _loss(z, present, mode="per_sample_logits", infonce="clip")
  np.testing.assert_allclose(loss, ref_clip(z, present, TAU, g)[0], rtol=1e-5)
  loss, _ = _loss(z, present, mode="per_sample_logits", infonce="ntxent")
  np.testing.assert_allclose(loss, ref_ntxent(z, present, TAU, g), rtol=1e-5)
  # Batch-mean weights over the samples holding both modalities.
  pair = present[:, :, None] & present[:, None, :]
  ref_w = (g * pair).sum(0) / np.maximum(pair.sum(0), 1)
  np.testing.assert_allclose(np.asarray(aux["weights"]), ref_w, atol=1e-6)


def test_ntxent_matches_reference(example):
  z, all_present, some_absent = example
  for present in (all_present, some_absent):
    loss, _ = _loss(z, present, mode="uniform", infonce="ntxent")
    np.testing.assert_allclose(loss, ref_ntxent(z, present, TAU), rtol=1e-5)


def test_pair_loss_weights_matches_reference(example):
  z, _, present = example
  g = ref_harmonization(z, present)
  _, ref_pairs = ref_clip(z, present, TAU)
  terms = []
  for (i, j), l in ref_pairs.items():
    both = present[:, i] & present[:, j]
    terms.append(g[both, i, j].mean() * l)
  loss, _ = _loss(z, present, mode="pair_loss_weights", infonce="clip")
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)


def test_gradients_flow_through_g_and_ignore_absent(example):
  z, _, present = example
  zj, pj = jnp.asarray(z), jnp.asarray(present)

  def loss_fn(z, stop):
    g = harmonization_weights(z, pj)
    g = jax.lax.stop_gradient(g) if stop else g
    return harmonized_contrastive(z, pj, temperature=TAU, weights=g)[0]

  grad = jax.jit(jax.grad(loss_fn), static_argnums=1)
  g_flow, g_stop = np.asarray(grad(zj, False)), np.asarray(grad(zj, True))
  assert np.all(np.isfinite(g_flow))
  assert np.abs(g_flow - g_stop).max() > 1e-6  # G is differentiated through.
  assert np.all(g_flow[~present] == 0.0)  # Absent embeddings get no gradient.


def test_absent_embeddings_have_no_effect(example):
  z, _, present = example
  z2 = z.copy()
  z2[~present] = np.random.default_rng(3).random((int((~present).sum()), P)) * 10
  for mode in ("per_sample_logits", "pair_loss_weights", "uniform"):
    for infonce in ("clip", "ntxent"):
      a, _ = _loss(z, present, mode=mode, infonce=infonce)
      b, _ = _loss(z2, present, mode=mode, infonce=infonce)
      assert a == pytest.approx(b, rel=1e-6), (mode, infonce)


def test_sharded_batch_gives_global_batch_loss_and_grads():
  rng = np.random.default_rng(4)
  n = 16
  z = jnp.asarray(np.abs(rng.standard_normal((n, M, P))), jnp.float32)
  present = jnp.asarray(rng.random((n, M)) < 0.7)
  f = jax.value_and_grad(lambda z, p: harmonized_contrastive(z, p, temperature=TAU)[0])
  ref_loss, ref_grad = jax.jit(f)(z, present)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.P("data"))
  loss, grad = jax.jit(f)(jax.device_put(z, shard), jax.device_put(present, shard))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-6)


# ----------------------------------------------------------------- masked --

def test_lm_cross_entropy_at_the_slots_ignores_empty_slots():
  """The LM loss over pick slots: per-slot cross-entropy (lm_token_nll) and
  its weighted token mean, against a hand computation; an empty slot's
  logits (even huge) do not matter, and no picks give 0."""
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((3, 4, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (3, 4))
  picked = np.zeros((3, 4), bool)
  picked[0, 1] = picked[2, 3] = picked[2, 0] = True
  weight = np.array([0.5, 1.0, 2.0], np.float32)

  def loss_of(logits, slots):
    return float(masked.weighted_token_mean(masked.lm_token_nll(logits, targets),
                                            slots.astype(np.float32), weight))

  ref = 0.0
  for b, t in zip(*np.nonzero(picked)):
    ref += weight[b] * (_logsumexp(logits[b, t]) - logits[b, t, targets[b, t]])
  loss = loss_of(logits, picked)
  np.testing.assert_allclose(loss, ref / picked.sum(), rtol=1e-5)
  noisy = np.where(picked[..., None], logits, rng.standard_normal(logits.shape) * 1e30)
  assert loss_of(noisy.astype(np.float32), picked) == pytest.approx(loss, rel=1e-6)
  assert loss_of(logits, np.zeros_like(picked)) == 0.0


def test_mse_ignores_unpicked_positions():
  rng = np.random.default_rng(6)
  pred, target = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  picked = np.array([[True, False, False, True, False], [False] * 5, [False, True, False, False, False]])
  weight = np.array([1.0, 3.0, 0.25], np.float32)
  loss = float(masked.mse_loss(pred, target, picked, weight))
  err = ((pred - target) ** 2).mean(-1) * weight[:, None]
  np.testing.assert_allclose(loss, err[picked].sum() / picked.sum(), rtol=1e-5)
  noisy = np.where(picked[..., None], pred, 1e3)
  assert float(masked.mse_loss(noisy, target, picked, weight)) == pytest.approx(loss, rel=1e-6)


def test_masked_task_weights_are_diag_g_without_gradient(example):
  z, _, present = example
  w = masked.masked_task_weights(jnp.asarray(z), jnp.asarray(present))
  g = ref_harmonization(z, present)
  np.testing.assert_allclose(np.asarray(w), np.diagonal(g, axis1=1, axis2=2), atol=1e-6)
  assert np.all(np.asarray(w)[~present] == 0.0)
  grad = jax.grad(lambda z: masked.masked_task_weights(z, jnp.asarray(present)).sum())(jnp.asarray(z))
  assert np.all(np.asarray(grad) == 0.0)


def test_targets():
  c = default_config.get_config()
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  t = np.asarray(masked.image_targets(image, 8))
  assert t.shape == (2, 16, 8 * 8 * 3)
  np.testing.assert_allclose(t.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(t.std(-1), 1.0, atol=1e-3)
  # Patch 1 is the top row, second column: pixels [0:8, 8:16].
  patch = image[0, 0:8, 8:16].astype(np.float64) / 127.5 - 1
  ref = (patch.ravel() - patch.mean()) / np.sqrt(patch.var() + 1e-6)
  np.testing.assert_allclose(t[0, 1], ref, atol=1e-4)
  video = rng.integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)
  v = np.asarray(masked.video_targets(video, masked.video_target_grid(c)))
  assert v.shape == (2, 3, masked.mfm_target_dim(c)) == (2, 3, 48)
  audio = rng.standard_normal((2, 64, 32)).astype(np.float32)
  a = np.asarray(masked.audio_targets(audio, (16, 8)))
  assert a.shape == (2, 4 * 4, 16 * 8)
  np.testing.assert_array_equal(a[1, 4 + 2], audio[1, 16:32, 16:24].ravel())  # Time-major order.
