"""The ring (shard_map + ppermute) contrastive loss against the global form.

Compile time dominates: each test compiles ONE function that returns every
variant it checks (two programs in all), with XLA's slow CPU passes off.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m5p.losses.contrastive import harmonization_weights, harmonized_contrastive, l2_normalize
from m5p.losses.ring import ring_harmonized_contrastive
from m5p.modalities import PAIRS
from m5p.sharding import BATCH_AXES, MESH_AXES

B, M, E = 32, 5, 8
TAU = 0.1
MODES = ("per_sample_logits", "pair_loss_weights", "uniform")
INFONCES = ("clip", "ntxent")
ATOL = 1e-5
# Compile time dominates these tests: skip XLA's slow CPU backend passes (same fp32 math).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mesh(shape: tuple[int, int, int]) -> Mesh:
  devices = np.asarray(jax.devices()[:8]).reshape(shape)
  return Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  z = np.abs(rng.standard_normal((B, M, E))).astype(np.float32)  # ReLU outputs are >= 0.
  present = rng.random((B, M)) < 0.75
  present[:, 4] &= ~present[:, 3]  # No sample holds video and audio: that pair drops out.
  present[0] = [False, True, False, False, False]  # Only the table.
  present[5] = False  # Nothing at all.
  groups = rng.integers(-1, 5, B).astype(np.int32)  # Fine groups; -1 = no group.
  g = np.asarray(harmonization_weights(jnp.asarray(z), jnp.asarray(present)))
  weights = (g * rng.uniform(0.5, 1.5, g.shape)).astype(np.float32)  # Explicit, differentiable G.
  return z, present, groups, weights


def _close(actual, expected, what):
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=1e-5,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def ref_multi_positive(z, present, *, mode, infonce, temperature, weights=None, groups=None):
  """The global (dense B x B) form with multi-positive rows, as documented in ring.py:
  positives of row b = its candidates that are sample b or share b's group (>= 0);
  row loss = logsumexp over candidates - mean positive logit (SupCon L_out).
  Directions d: the 10 pairs (i, j), then the same pairs reversed."""
  present = jnp.asarray(present, bool)
  zn = l2_normalize(z)
  g = harmonization_weights(z, present) if weights is None else weights
  scale = g if mode == "per_sample_logits" else jnp.ones_like(g)
  ii, jj = np.array(PAIRS).T
  qd, od = np.concatenate([ii, jj]), np.concatenate([jj, ii])  # [20]
  ids = jnp.arange(z.shape[0])
  self_ = ids[:, None] == ids[None, :]
  same = self_
  if groups is not None:
    same = same | ((groups[:, None] >= 0) & (groups[:, None] == groups[None, :]))
  a = scale[:, qd, od].T[..., None] / temperature  # [D, B, 1]
  zq, zo = zn[:, qd], zn[:, od]  # [B, D, E]
  logits = [a * jnp.einsum("bde,cde->dbc", zq, zo)]
  cand = [jnp.broadcast_to(present[:, od].T[:, None, :], logits[0].shape)]
  pos = [cand[0] & same]
  if infonce == "ntxent":
    logits.append(a * jnp.einsum("bde,cde->dbc", zq, zq))
    cand.append(present[:, qd].T[:, None, :] & ~self_)
    pos.append(cand[1] & same)
  logits, cand, pos = (jnp.concatenate(x, axis=-1) for x in (logits, cand, pos))
  lse = jax.nn.logsumexp(jnp.where(cand, logits, -1e9), axis=-1)
  pos_mean = jnp.sum(jnp.where(pos, logits, 0.0), -1) / jnp.maximum(jnp.sum(pos, -1), 1)
  both = (present[:, ii] & present[:, jj]).T  # [10, B]
  row_valid = jnp.concatenate([both, both])
  per_dir = jnp.sum(jnp.where(row_valid, lse - pos_mean, 0.0), -1)
  counts = jnp.sum(both, -1).astype(jnp.float32)
  pair_losses = 0.5 * (per_dir[:10] + per_dir[10:]) / jnp.maximum(counts, 1.0)
  if mode == "pair_loss_weights":
    pair_losses = pair_losses * jnp.sum(jnp.where(both, g[:, ii, jj].T, 0.0), -1) / jnp.maximum(counts, 1.0)
  valid = counts > 0
  return jnp.sum(jnp.where(valid, pair_losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _value_and_grad(loss_fn, **kwargs):
  """(loss, aux) and grads w.r.t. z, the temperature and (if given) the weights."""
  def f(z, tau, weights):
    loss, aux = loss_fn(z, temperature=tau, weights=weights, **kwargs)
    return loss, aux
  return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)


def _compile_and_run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _put(mesh, *arrays):
  shard = NamedSharding(mesh, P(BATCH_AXES))
  return [jax.device_put(jnp.asarray(x), shard) for x in arrays]


def test_ring_equals_global_every_variant_mesh_8_1_1(data):
  """clip/ntxent x the 3 harmonization modes, G computed from z (weights=None)."""
  z, present, _, _ = data
  mesh = _mesh((8, 1, 1))

  def run(z, present, tau):
    out = {}
    for infonce in INFONCES:
      for mode in MODES:
        kw = dict(present=present, mode=mode, infonce=infonce)
        f = lambda fn: jax.value_and_grad(lambda z, t: fn(z, temperature=t, **kw), argnums=(0, 1),
                                          has_aux=True)(z, tau)
        out[infonce, mode] = (f(harmonized_contrastive), f(ring_harmonized_contrastive))
    return out

  with jax.set_mesh(mesh):
    zs, ps = _put(mesh, z, present)
    out = _compile_and_run(run, zs, ps, jnp.float32(TAU))
  for key, ((gl, gl_grads), (rg, rg_grads)) in out.items():
    _close(rg, gl, f"{key} loss/aux")
    _close(rg_grads, gl_grads, f"{key} grads (z, tau)")
    assert np.all(np.asarray(rg_grads[0])[~present] == 0.0), key  # Absent rows get no gradient.
  counts = np.asarray(out["clip", "uniform"][1][0][1]["pair_counts"])
  assert counts[PAIRS.index((3, 4))] == 0  # The empty pair really is empty.


def test_ring_multi_positive_weights_and_blocks_mesh_2_2_2(data):
  """(2, 2, 2) mesh (ring over data x fsdp, replicated over model), explicit weights
  with gradients, learned temperature, column blocks smaller than b_local (8 -> 4),
  positive groups; plus the one-device path (no collectives)."""
  z, present, groups, weights = data
  mesh = _mesh((2, 2, 2))
  mode = "per_sample_logits"

  def run_global(z, present, groups, weights, tau):
    out = {}
    for infonce in INFONCES:
      kw = dict(present=present, mode=mode, infonce=infonce)
      out[infonce, "single"] = _value_and_grad(harmonized_contrastive, **kw)(z, tau, weights)
      out[infonce, "multi"] = jax.value_and_grad(
          lambda z, t, w: ref_multi_positive(z, temperature=t, weights=w, groups=groups, **kw),
          argnums=(0, 1, 2))(z, tau, weights)
      # The reference reduces to the global form without groups (forward only: cheap).
      out[infonce, "ref"] = (harmonized_contrastive(z, temperature=tau, weights=weights, **kw)[0],
                             ref_multi_positive(z, temperature=tau, weights=weights, **kw))
    out["ntxent", "one_device"] = harmonized_contrastive(
        z, present=present, mode="pair_loss_weights", infonce="ntxent", temperature=tau)[0]
    return out

  def run_ring(z, present, groups, weights, tau):
    out = {}
    for infonce in INFONCES:
      kw = dict(present=present, mode=mode, infonce=infonce, block_size=4)
      out[infonce, "single"] = _value_and_grad(ring_harmonized_contrastive, **kw)(z, tau, weights)
      out[infonce, "multi"] = _value_and_grad(ring_harmonized_contrastive, positive_groups=groups,
                                              **kw)(z, tau, weights)
    out["ntxent", "one_device"] = ring_harmonized_contrastive(
        z, axis_names=(), present=present, mode="pair_loss_weights", infonce="ntxent",
        temperature=tau)[0]
    return out

  # Two programs: XLA:CPU's thunk executor may start a global form's
  # collectives (all-to-alls of its concatenations) on one emulated device
  # while the others are inside a ring loop's collective-permutes: seen as a
  # hang, then an abort (~1 run in 8 on 2 busy cores) when both were one program.
  with jax.set_mesh(mesh):
    args = (*_put(mesh, z, present, groups, weights), jnp.float32(TAU))
    glob = jax.block_until_ready(_compile_and_run(run_global, *args))
    ring = _compile_and_run(run_ring, *args)
  out = {k: (glob[k], ring[k]) for k in ring}
  out.update({(infonce, "ref"): glob[infonce, "ref"] for infonce in INFONCES})
  for infonce in INFONCES:
    (gl, gl_grads), (rg, rg_grads) = out[infonce, "single"]
    _close(rg, gl, f"{infonce} loss/aux")
    _close(rg_grads, gl_grads, f"{infonce} grads (z, tau, weights)")
    (ref, ref_grads), ((loss, _), grads) = out[infonce, "multi"]
    _close(loss, ref, f"{infonce} multi-positive loss")
    _close(grads, ref_grads, f"{infonce} multi-positive grads (z, tau, weights)")
    assert abs(float(loss) - float(rg[0])) > 1e-3  # Groups change the loss.
    _close(*out[infonce, "ref"], f"{infonce} reference without groups")
  _close(*out["ntxent", "one_device"], "one-device ring")


def test_ring_rejects_uneven_batch():
  mesh = _mesh((8, 1, 1))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not split"):
    jax.eval_shape(lambda z, p: ring_harmonized_contrastive(z, p), jnp.zeros((12, M, E)),
                   jnp.ones((12, M), bool))
