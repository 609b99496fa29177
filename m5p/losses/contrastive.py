"""Self-harmonized inter-modality contrastive loss (SCALE.md section 3).

Harmonization, per sample b over the modalities present in b:
  S_b[i, j] = cos(z_i, z_j)
  R_b = S_b * softmax(S_b, axis=-1)        (softmax over present columns only)
  G_b = R_b with each row L2-normalised    (absent rows and columns are 0)
Gradients flow through G (authors' code).

Pair losses, one per pair i < j (m5p.modalities.PAIRS), over the rows b where
both i and j are present:
  infonce='clip'    symmetric cross-modal InfoNCE: query z_i[b] against the
                    z_j[c] of every sample c holding modality j (and back).
  infonce='ntxent'  SimCLR's NT-Xent over [z_i; z_j] (2B rows, self excluded):
                    negatives also include same-modality rows (authors' code).
Weighting (`mode`):
  'per_sample_logits'  (authors' code) the logits of query row b for pair
                       (i, j) are multiplied by G_b[i, j] (a per-sample inverse
                       temperature); rows of the j -> i direction by G_b[j, i].
                       Loss = mean of the pair losses.
  'pair_loss_weights'  (paper text) L = mean_p w_p L_p, w_p = the batch mean of
                       G_b[i, j] (upper triangle) over the rows holding both.
                       (The paper writes a plain sum; the mean over the 10
                       pairs is a constant 1/10 that keeps the scale of the
                       other modes.)
  'uniform'            mean of the pair losses, G unused.
Pairs with no valid row in the batch are left out of every mean.

Catalogue-aware positives (`positive_groups`, config.loss.multi_positive):
listings of the same product (same fine-grained group) in the batch are
positives of each other in every pair loss, SupCon's L_out:
  l_b = logsumexp_{c in candidates} logit(b, c) - mean_{c in positives} logit(b, c).
Without it, a second listing of the same product is a negative the loss
pushes away. The ring form (m5p.losses.ring) computes the same.

Everything is plain jnp over the whole batch: under `jax.jit` with the batch
sharded over devices GSPMD computes the global-batch loss (the negatives are
the whole global batch), with the same value and gradients as on one device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from m5p.modalities import PAIRS

MODES = ("per_sample_logits", "pair_loss_weights", "uniform")
INFONCES = ("clip", "ntxent")
_NEG = -1e9  # Logit of an excluded candidate (finite: no NaN on empty rows).


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """x / ||x|| over the last axis; a zero vector stays zero (finite gradient)."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def harmonization_weights(z: jax.Array, present: jax.Array) -> jax.Array:
  """G [B, M, M] from embeddings z [B, M, P] and presence [B, M] (bool).

  G_b[i, j] = 0 unless both i and j are present in b; each present row has
  unit L2 norm (unless all its cosines are 0)."""
  z = z.astype(jnp.float32)
  present = jnp.asarray(present, bool)
  zn = l2_normalize(z)
  s = jnp.einsum("bip,bjp->bij", zn, zn)
  pair = present[:, :, None] & present[:, None, :]
  soft = jax.nn.softmax(jnp.where(pair, s, _NEG), axis=-1)
  r = jnp.where(pair, s * soft, 0.0)
  norm_sq = jnp.sum(jnp.square(r), axis=-1, keepdims=True)
  return r * jax.lax.rsqrt(jnp.maximum(norm_sq, 1e-24))


def _masked_ce(logits: jax.Array, positive: jax.Array, col_valid: jax.Array,
               row_valid: jax.Array) -> jax.Array:
  """Per-row loss [..., R] of logits [..., R, C]: logsumexp over the valid
  columns minus the mean logit of the row's positive columns `positive`
  [..., R, C] bool (SupCon's L_out; with one positive per row, the
  cross-entropy). Invalid columns are left out; invalid rows give 0."""
  logits = jnp.where(col_valid, logits, _NEG)
  lse = jax.nn.logsumexp(logits, axis=-1)
  positive = positive & col_valid
  count = jnp.sum(positive.astype(jnp.float32), axis=-1)
  pos = jnp.sum(jnp.where(positive, logits, 0.0), axis=-1) / jnp.maximum(count, 1.0)
  return jnp.where(row_valid, lse - pos, 0.0)


def _positives(groups: jax.Array | None, rows: int, cols: int | None = None) -> jax.Array:
  """[R, C] bool: column c is a positive of row r when they are the same
  sample (c mod B == r mod B, B = len(groups)) or, with `groups`, share a
  group >= 0 (catalogue-aware positives: listings of the same product)."""
  cols = rows if cols is None else cols
  b = rows if groups is None else groups.shape[0]
  rs, cs = jnp.arange(rows) % b, jnp.arange(cols) % b
  same = rs[:, None] == cs[None, :]
  if groups is not None:
    gr, gc = groups[rs], groups[cs]
    same = same | ((gr[:, None] >= 0) & (gr[:, None] == gc[None, :]))
  return same


def _clip_pairs(zi, zj, pi, pj, gij, gji, temperature, groups=None):
  """Symmetric InfoNCE for K pairs at once: zi, zj [K, B, P]; pi, pj, gij, gji [K, B].
  Returns [K]: (sum of the per-row losses of both directions) / 2."""
  both = pi & pj
  positive = _positives(groups, zi.shape[1])  # Symmetric: serves both directions.
  sim = jnp.einsum("kbp,kcp->kbc", zi, zj) / temperature  # Rows z_i, columns z_j.
  l_ij = _masked_ce(sim * gij[..., None], positive, pj[:, None, :], both)
  l_ji = _masked_ce(jnp.swapaxes(sim, 1, 2) * gji[..., None], positive, pi[:, None, :], both)
  return 0.5 * (jnp.sum(l_ij, axis=-1) + jnp.sum(l_ji, axis=-1))


def _ntxent_pairs(zi, zj, pi, pj, gij, gji, temperature, groups=None):
  """NT-Xent over [z_i; z_j] (2B rows, self excluded) for K pairs at once.
  Returns [K]: (sum of the per-row losses over the 2B rows) / 2."""
  b = zi.shape[1]
  both = pi & pj
  reps = jnp.concatenate([zi, zj], axis=1)  # [K, 2B, P]
  scale = jnp.concatenate([gij, gji], axis=1) / temperature  # [K, 2B]
  sim = jnp.einsum("krp,kcp->krc", reps, reps) * scale[..., None]
  not_self = ~jnp.eye(2 * b, dtype=bool)
  col_valid = jnp.concatenate([pi, pj], axis=1)[:, None, :] & not_self
  positive = _positives(groups, 2 * b) if groups is not None else (
      (jnp.arange(2 * b) + b) % (2 * b))[:, None] == jnp.arange(2 * b)[None, :]
  losses = _masked_ce(sim, positive & not_self, col_valid, jnp.concatenate([both, both], axis=1))
  return 0.5 * jnp.sum(losses, axis=-1)


def harmonized_contrastive(z: jax.Array, present: jax.Array, *, mode: str = "per_sample_logits",
                           infonce: str = "clip", temperature: float | jax.Array = 0.07,
                           weights: jax.Array | None = None,
                           positive_groups: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The SIMCL loss of z [B, M, P] (unnormalised) with presence [B, M].

  `weights`: a G [B, M, M] to use instead of `harmonization_weights(z, present)`
  (tests, or weights computed elsewhere). `temperature` may be a traced
  scalar (learned). `positive_groups` [B] int (-1 = none): multi-positive
  InfoNCE, rows of the same group are positives of each other, not
  negatives (SupCon L_out: logsumexp - mean positive logit); None or all
  groups distinct gives exactly the plain loss. Returns (loss, aux) with aux:
    G            [B, M, M]  the per-sample weights used
    weights      [M, M]     batch mean of G_b[i, j] over samples holding i and j
    pair_losses  [10]       per-pair InfoNCE (mean over its valid rows), PAIRS order
    pair_counts  [10]       rows holding both modalities of the pair
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")
  if infonce not in INFONCES:
    raise ValueError(f"infonce={infonce!r}: expected one of {INFONCES}")
  present = jnp.asarray(present, bool)
  z = z.astype(jnp.float32)
  zn = l2_normalize(z)
  g = harmonization_weights(z, present) if weights is None else weights.astype(jnp.float32)

  # All 10 pairs at once, pair axis first: [K, B, ...].
  ii = jnp.array([i for i, _ in PAIRS])
  jj = jnp.array([j for _, j in PAIRS])
  zi, zj = jnp.swapaxes(zn[:, ii], 0, 1), jnp.swapaxes(zn[:, jj], 0, 1)
  pi, pj = present[:, ii].T, present[:, jj].T
  both = pi & pj
  g_ij, g_ji = g[:, ii, jj].T, g[:, jj, ii].T  # [K, B]
  if mode == "per_sample_logits":
    scale_ij, scale_ji = g_ij, g_ji
  else:
    scale_ij = scale_ji = jnp.ones_like(g_ij)
  pair_fn = _clip_pairs if infonce == "clip" else _ntxent_pairs
  groups = None if positive_groups is None else jnp.asarray(positive_groups, jnp.int32)
  totals = pair_fn(zi, zj, pi, pj, scale_ij, scale_ji, jnp.asarray(temperature, jnp.float32),
                   groups)
  counts = jnp.sum(both.astype(jnp.float32), axis=-1)
  pair_losses = totals / jnp.maximum(counts, 1.0)
  valid = (counts > 0).astype(jnp.float32)
  if mode == "pair_loss_weights":
    pair_w = jnp.sum(jnp.where(both, g_ij, 0.0), axis=-1) / jnp.maximum(counts, 1.0)
    terms = pair_w * pair_losses
  else:
    terms = pair_losses
  loss = jnp.sum(terms * valid) / jnp.maximum(jnp.sum(valid), 1.0)

  pairf = (present[:, :, None] & present[:, None, :]).astype(jnp.float32)
  mean_g = jnp.sum(g * pairf, axis=0) / jnp.maximum(jnp.sum(pairf, axis=0), 1.0)
  return loss, {"G": g, "weights": mean_g, "pair_losses": pair_losses, "pair_counts": counts}
