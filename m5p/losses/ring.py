"""Ring form of the harmonized contrastive loss: same value and gradients, less memory.

Why: under plain `jax.jit` the global form (m5p.losses.contrastive) lets GSPMD
split the B x B logits of every pair by rows, so each device holds
b_local x B_global logits per pair (10 pairs, two directions). Here each
device keeps its own rows and the embeddings of the other devices travel round
a ring (`jax.lax.ppermute`) inside `jax.shard_map`: at any time a device holds
the logits of its b_local rows against one remote block of b_local columns
(or against `block_size` columns of it), and keeps an online log-sum-exp
(running max and sum) for every row's softmax denominator, plus the sum and
count of its positive logits.

Directions. Both InfoNCE variants are sums of per-row losses over the 20
ordered modality pairs (q, o), q != o, rows b holding q and o, logits scaled
by a[(q, o), b] = G_b[q, o] / tau ('per_sample_logits') or 1 / tau:
  clip    row z_q[b] against the column set {z_o[c]}: pair (i, j) totals
          0.5 * (sum of direction (i, j) rows + sum of direction (j, i) rows).
  ntxent  row z_q[b] against {z_o[c]} and {z_q[c], c != b}: the same 0.5 *
          sum over both directions is SimCLR's NT-Xent over [z_i; z_j].
The column-wise (symmetric) term is computed from the same blocks: device d
holding block s computes z_i[d] . z_j[s] (i < j) once; its rows feed d's
(i, j) rows and its columns feed the (j, i) rows of s, whose statistics travel
with block s and come home after the last step (one extra small ppermute).
So each step costs 10 b_local x b_local products (ntxent: 15, adding the
same-modality z_q . z_q blocks), as many as the global form computes in all.

Multi-positive (`positive_groups` [B] int, -1 = none; as in the global form
in contrastive.py, config.loss.multi_positive). The positives of row b are its
candidates c that are the same sample (clip: z_o[b]; ntxent: z_o[b], never
b itself) or share b's group (group >= 0); the row loss is SupCon's L_out:
  l_b = logsumexp_{c in candidates} logit(b, c) - mean_{c in positives} logit(b, c).
With no groups (or all groups distinct) this is exactly the global form.

Gradients: a `jax.custom_vjp` on the ring kernel. The forward keeps only
per-row statistics; the backward runs the ring again, recomputes each block's
logits, adds the local rows' gradients in place and the remote columns'
gradients to a buffer that travels with the block and arrives home after the
last step. Autodiff through the ring loop would keep every step's residuals
(the logit blocks: b_local x B_global again, or with remat every remote block). Everything outside the kernel (normalisation, G,
temperature, psums) is plain jnp under autodiff, so gradients reach z,
a learned temperature and explicit `weights`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from m5p.losses.contrastive import INFONCES, MODES, harmonization_weights, l2_normalize
from m5p.modalities import PAIRS
from m5p.sharding import BATCH_AXES

Axes = tuple[str, ...]


# ------------------------------------------------------------ collectives --

def _ring_size(axes: Axes) -> int:
  return int(math.prod(jax.lax.axis_size(a) for a in axes)) if axes else 1


def _my_index(axes: Axes) -> jax.Array:
  return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def _rotate(tree, axes: Axes):
  """Sends every leaf from ring position k to k + 1 (no-op on a ring of one)."""
  size = _ring_size(axes)
  if size == 1:
    return tree
  perm = [(k, (k + 1) % size) for k in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _vary(x: jax.Array, axes: Axes) -> jax.Array:
  """Marks x as device-varying over `axes` (loop carries must keep one type under check_vma)."""
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _psum(tree, axes: Axes):
  return jax.lax.psum(tree, axes) if axes else tree


# ----------------------------------------------------------------- kernel --
# Directions (q, o) are laid out [2K, ...]: the 10 pairs (i, j), i < j, then the
# same pairs reversed (j, i). The 10 similarity blocks z_i[local] . z_j[remote]
# give the local rows' logits of (i, j) and, transposed, the remote rows'
# logits of (j, i): each device computes every (local, remote) block once, and
# the transposed use feeds statistics that travel with the block and come home
# after the last step. ntxent adds the same-modality blocks z_q . z_q (local
# rows only).

_I = np.array([i for i, _ in PAIRS])
_J = np.array([j for _, j in PAIRS])
_K = len(PAIRS)
DIR_Q, DIR_O = np.concatenate([_I, _J]), np.concatenate([_J, _I])  # Row / column modality.


def _chunk_size(n: int, block_size: int | None) -> int:
  """Largest divisor of n that is <= block_size (n when unset)."""
  if not block_size or block_size >= n:
    return n
  return max(d for d in range(1, block_size + 1) if n % d == 0)


def _over_chunks(n: int, cb: int, fn: Callable, state):
  """state = fn(start, state) for start = 0, cb, 2 cb, ... < n (a loop only when needed)."""
  if cb == n:
    return fn(0, state)
  return jax.lax.fori_loop(0, n // cb, lambda k, st: fn(k * cb, st), state)


def _rows(x, start, cb):
  return jax.lax.dynamic_slice_in_dim(x, start, cb, axis=0)


def _cols(x, start, cb):  # Per-direction statistics [K, n]: the sample axis is last.
  return jax.lax.dynamic_slice_in_dim(x, start, cb, axis=x.ndim - 1)


def _put_cols(x, start, y):
  return jax.lax.dynamic_update_slice_in_dim(x, y, start, x.ndim - 1)


def dir_valid(present: jax.Array) -> jax.Array:
  """[2K, n]: row r is a query of direction d iff it holds both of d's modalities."""
  return (present[:, DIR_Q] & present[:, DIR_O]).T


def _positive(rid, cid, gl, gc, multi: bool) -> jax.Array:
  """[n, c]: same sample, or (multi) same group >= 0."""
  same = rid[:, None] == cid[None, :]
  if multi:
    same = same | ((gl[:, None] >= 0) & (gl[:, None] == gc[None, :]))
  return same


def _merge(state, logits, cand, pos, axis: int):
  """Folds `logits` (candidates only), reduced over `axis`, into the online statistics
  (running max, sum of exp(logit - max), positive-logit sum, positive count)."""
  m, s, ps, pc = state
  masked = jnp.where(cand, logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(masked, axis))
  m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(masked - jnp.expand_dims(m_safe, axis)), axis)
  if pos is not None:
    ps = ps + jnp.sum(jnp.where(pos, logits, 0.0), axis)
    pc = pc + jnp.sum(pos, axis, dtype=jnp.float32)
  return m_new, s, ps, pc


def _to_modalities(x: jax.Array, idx: np.ndarray, m: int, axis: int) -> jax.Array:
  """Sums x's pair axis `axis` into modality slots idx (a one-hot contraction, no scatter)."""
  onehot = jnp.asarray(np.eye(m, dtype=np.float32)[idx])  # [K, M]
  return jnp.moveaxis(jnp.tensordot(x, onehot, axes=([axis], [0])), -1, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring_row_losses(axes: Axes, ntxent: bool, multi: bool, block_size: int | None,
                     zn: jax.Array, a: jax.Array, present: jax.Array, groups: jax.Array) -> jax.Array:
  """Per-row losses [2K, n] (lse - mean positive logit; 0 for non-query rows) of the
  local rows against the global batch, streamed round the ring.
  zn [n, M, E] normalised embeddings; a [2K, n] row scales (1/tau included)."""
  return _ring_fwd(axes, ntxent, multi, block_size, zn, a, present, groups)[0]


def _ring_fwd(axes, ntxent, multi, block_size, zn, a, present, groups):
  n = zn.shape[0]
  cb = _chunk_size(n, block_size)
  size, me = _ring_size(axes), _my_index(axes)
  rid = me * n + jnp.arange(n)
  z_i = zn[:, _I]  # [n, K, E]
  a_up, a_low = a[:_K, :, None], a[_K:, :, None]  # [K, n, 1]
  col_cand = present[:, _I].T[:, :, None]  # [K, n, 1]: our z_i as columns of (j, i).

  def step(t, held, local):
    cid0 = ((me - t) % size) * n

    def chunk(start, carry):
      (zr, pr, gr, ar, remote), (up, low) = carry
      zc, pc, gc = (_rows(x, start, cb) for x in (zr, pr, gr))
      cid = cid0 + start + jnp.arange(cb)
      pos = _positive(rid, cid, groups, gc, multi)
      sim = jnp.einsum("rke,cke->krc", z_i, zc[:, _J])  # [K, n, c]
      cand = pc[:, _J].T[:, None, :]
      up = _merge(up, a_up * sim, cand, cand & pos, -1)
      ac = _cols(ar, start, cb)[_K:, None, :]  # [K, 1, c]: scales of the chunk's (j, i) rows.
      rem = _merge(tuple(_cols(x, start, cb) for x in remote), ac * sim, col_cand, col_cand & pos, 1)
      remote = tuple(_put_cols(x, start, y) for x, y in zip(remote, rem))
      if ntxent:  # Same-modality columns z_q[c], c != r.
        simd = jnp.einsum("rme,cme->mrc", zn, zc)  # [M, n, c]
        not_self = (rid[:, None] != cid[None, :])[None]
        for d, (q, a_d) in enumerate(((_I, a_up), (_J, a_low))):
          cand_d = pc[:, q].T[:, None, :] & not_self
          folded = _merge((up, low)[d], a_d * simd[q], cand_d, (cand_d & pos) if multi else None, -1)
          up, low = (folded, low) if d == 0 else (up, folded)
      return (zr, pr, gr, ar, remote), (up, low)

    return _over_chunks(n, cb, chunk, (held, local))

  zeros = _vary(jnp.zeros((_K, n), jnp.float32), axes)
  empty = (zeros - jnp.inf, zeros, zeros, zeros)
  held, local = (zn, present, groups, a, empty), (empty, empty)

  def body(t, carry):
    held, local = step(t, *carry)
    return _rotate(held, axes), local

  held, local = jax.lax.fori_loop(0, size - 1, body, (held, local))
  held, (up, low) = step(size - 1, held, local)
  remote = _rotate(held[4], axes)  # Our (j, i) rows' statistics from the other devices come home.

  m = jnp.maximum(low[0], remote[0])
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  low = (m, low[1] * jnp.exp(low[0] - m_safe) + remote[1] * jnp.exp(remote[0] - m_safe),
         low[2] + remote[2], low[3] + remote[3])
  m, s, pos_sum, pos_cnt = (jnp.concatenate([u, l]) for u, l in zip(up, low))
  valid = dir_valid(present)
  m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
  lse = jnp.where(valid, m_safe + jnp.log(jnp.where(valid, s, 1.0)), 0.0)
  inv_cnt = 1.0 / jnp.maximum(pos_cnt, 1.0)
  losses = jnp.where(valid, lse - pos_sum * inv_cnt, 0.0)
  return losses, (zn, a, present, groups, lse, inv_cnt)


def _ring_bwd(axes, ntxent, multi, block_size, res, d_losses):
  """d(row loss)/d(logit) = softmax - positive / count. The ring runs again: the local
  rows' gradients stay here, the block's own (dz, da) travel with it and come home."""
  zn, a, present, groups, lse, inv_cnt = res
  n, m = zn.shape[0], zn.shape[1]
  cb = _chunk_size(n, block_size)
  size, me = _ring_size(axes), _my_index(axes)
  rid = me * n + jnp.arange(n)
  valid = dir_valid(present)
  w = jnp.where(valid, d_losses, 0.0)
  z_i = zn[:, _I]
  a_up, a_low = a[:_K, :, None], a[_K:, :, None]
  col_cand = present[:, _I].T[:, :, None]
  v_up, lse_up, inv_up, w_up = (x[:_K, :, None] for x in (valid, lse, inv_cnt, w))

  def step(t, held, acc):
    cid0 = ((me - t) % size) * n

    def chunk(start, carry):
      (zr, pr, gr, ar, lr, ir, wr, dzr, dar), (dzl, dal) = carry
      zc, pc, gc = (_rows(x, start, cb) for x in (zr, pr, gr))
      ac, lc, ic, wc = (_cols(x, start, cb)[_K:, None, :] for x in (ar, lr, ir, wr))
      vc = dir_valid(pc)[_K:, None, :]
      cid = cid0 + start + jnp.arange(cb)
      pos = _positive(rid, cid, groups, gc, multi)
      zc_j = zc[:, _J]
      sim = jnp.einsum("rke,cke->krc", z_i, zc_j)
      cand = pc[:, _J].T[:, None, :]
      # Local rows, directions (i, j), against the chunk's z_j.
      p = jnp.where(cand & v_up, jnp.exp(a_up * sim - lse_up), 0.0)
      g_up = w_up * (p - (cand & pos) * inv_up)
      dal = dal.at[:_K].add(jnp.sum(g_up * sim, -1))
      # The chunk's rows, directions (j, i), against our z_i.
      p = jnp.where(col_cand & vc, jnp.exp(ac * sim - lc), 0.0)
      g_low = wc * (p - (col_cand & pos) * ic)
      dac = jnp.sum(g_low * sim, 1)  # [K, c]
      dsim = g_up * a_up + g_low * ac
      dzl = dzl + _to_modalities(jnp.einsum("krc,cke->rke", dsim, zc_j), _I, m, 1)
      dzc = _to_modalities(jnp.einsum("krc,rke->cke", dsim, z_i), _J, m, 1)
      if ntxent:
        simd = jnp.einsum("rme,cme->mrc", zn, zc)  # [M, n, c]
        not_self = (rid[:, None] != cid[None, :])[None]
        dsimd = 0.0
        for d, q in enumerate((_I, _J)):
          sl = slice(d * _K, (d + 1) * _K)
          a_d, v_d, l_d, i_d, w_d = (x[sl, :, None] for x in (a, valid, lse, inv_cnt, w))
          cand_d = pc[:, q].T[:, None, :] & not_self
          p = jnp.where(cand_d & v_d, jnp.exp(a_d * simd[q] - l_d), 0.0)
          if multi:
            p = p - (cand_d & pos) * i_d
          g_d = w_d * p  # [K, n, c]
          dal = dal.at[sl].add(jnp.sum(g_d * simd[q], -1))
          dsimd = dsimd + _to_modalities(g_d * a_d, q, m, 0)
        dzl = dzl + jnp.einsum("mrc,cme->rme", dsimd, zc)
        dzc = dzc + jnp.einsum("mrc,rme->cme", dsimd, zn)
      dzr = jax.lax.dynamic_update_slice_in_dim(dzr, _rows(dzr, start, cb) + dzc, start, 0)
      dar = _put_cols(dar, start, _cols(dar, start, cb).at[_K:].add(dac))
      return (zr, pr, gr, ar, lr, ir, wr, dzr, dar), (dzl, dal)

    return _over_chunks(n, cb, chunk, (held, acc))

  dz0, da0 = _vary(jnp.zeros_like(zn), axes), _vary(jnp.zeros_like(a), axes)
  held, acc = (zn, present, groups, a, lse, inv_cnt, w, dz0, da0), (dz0, da0)

  def body(t, carry):
    held, acc = step(t, *carry)
    return _rotate(held, axes), acc

  held, acc = jax.lax.fori_loop(0, size - 1, body, (held, acc))
  held, (dzl, dal) = step(size - 1, held, acc)
  dzr, dar = _rotate(held[7:], axes)  # The block's own gradients come home.
  return dzl + dzr, dal + dar, None, None


_ring_row_losses.defvjp(_ring_fwd, _ring_bwd)


# ------------------------------------------------------------------- loss --

def _local_loss(z, present, groups, tau, weights=None, *, axes: Axes, mode: str, ntxent: bool,
                multi: bool, block_size: int | None):
  """The loss on one device's rows; sums over the ring with psum (identity without axes)."""
  present = jnp.asarray(present, bool)
  z = z.astype(jnp.float32)
  zn = l2_normalize(z)
  g = harmonization_weights(z, present) if weights is None else weights.astype(jnp.float32)
  scale = g[:, DIR_Q, DIR_O].T if mode == "per_sample_logits" else jnp.ones((2 * _K, z.shape[0]))
  a = _vary(scale / tau, axes)  # [2K, n]
  rows = _ring_row_losses(axes, ntxent, multi, block_size, zn, a, present, groups)
  per_dir = jnp.sum(rows, axis=-1)  # [2K]
  both = present[:, _I] & present[:, _J]  # [n, K]
  pairf = (present[:, :, None] & present[:, None, :]).astype(jnp.float32)
  totals, counts, w_num, g_num, g_den = _psum((
      0.5 * (per_dir[:_K] + per_dir[_K:]),
      jnp.sum(both.astype(jnp.float32), axis=0),
      jnp.sum(jnp.where(both, g[:, _I, _J], 0.0), axis=0),
      jnp.sum(g * pairf, axis=0),
      jnp.sum(pairf, axis=0)), axes)
  pair_losses = totals / jnp.maximum(counts, 1.0)
  valid = (counts > 0).astype(jnp.float32)
  terms = pair_losses * (w_num / jnp.maximum(counts, 1.0)) if mode == "pair_loss_weights" else pair_losses
  loss = jnp.sum(terms * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  mean_g = g_num / jnp.maximum(g_den, 1.0)
  return loss, {"G": g, "weights": mean_g, "pair_losses": pair_losses, "pair_counts": counts}


def ring_harmonized_contrastive(z: jax.Array, present: jax.Array, *, mode: str = "per_sample_logits",
                                infonce: str = "clip", temperature: float | jax.Array = 0.07,
                                weights: jax.Array | None = None,
                                positive_groups: jax.Array | None = None,
                                mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                                axis_names: Sequence[str] = BATCH_AXES,
                                block_size: int | None = None) -> tuple[jax.Array, dict]:
  """`harmonized_contrastive` (same arguments, loss and aux) computed round a ring.

  z [B, M, P], present [B, M], weights [B, M, M] and positive_groups [B] are
  split over `axis_names` (those of them the mesh has; the ring runs over
  all of them, in that order, as P(axis_names) shards the batch). `mesh`
  defaults to the one set by `jax.set_mesh`; with no mesh (or none of the
  axes) the loss runs on one device without collectives. `temperature` may be
  a traced scalar (learned). `positive_groups`: see the module docstring.
  `block_size`: columns per logits block (default b_local); a fixed value
  makes the per-device logits memory b_local x block_size.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")
  if infonce not in INFONCES:
    raise ValueError(f"infonce={infonce!r}: expected one of {INFONCES}")
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  names = tuple(getattr(mesh, "axis_names", ()) or ())
  axes = tuple(a for a in axis_names if a in names)
  b = z.shape[0]
  multi = positive_groups is not None
  groups = (jnp.full((b,), -1, jnp.int32) if positive_groups is None
            else jnp.asarray(positive_groups, jnp.int32))
  tau = jnp.asarray(temperature, jnp.float32)
  args = [z, jnp.asarray(present, bool), groups, tau] + ([] if weights is None else [weights])
  body = functools.partial(_local_loss, mode=mode, ntxent=infonce == "ntxent", multi=multi,
                           block_size=block_size)
  if not axes:
    return body(*args, axes=())
  ring = math.prod(mesh.shape[a] for a in axes)
  if b % ring:
    raise ValueError(f"Global batch {b} does not split over the {ring} devices of axes {axes}.")
  spec = P(axes)
  in_specs = (spec, spec, spec, P()) + (() if weights is None else (spec,))
  out_specs = (P(), {"G": spec, "weights": P(), "pair_losses": P(), "pair_counts": P()})
  fn = jax.shard_map(functools.partial(body, axes=axes), mesh=mesh, in_specs=in_specs,
                     out_specs=out_specs)
  return fn(*args)
