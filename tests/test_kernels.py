"""The kernels switch (m5p.models.kernels): the CPU kernels' own correctness,
'standard' and 'cpu' training alike with dropout, 'auto' choosing per lowering
platform, and the CPU kernels known to nothing but the switch.

The equality of 'standard' and 'cpu' losses and gradients is checked on one
device in tests/test_scaling_features.py and on a (2, 2, 2) mesh in
tests/test_training.py (beside the other meshes' references).
"""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from conftest import tiny_config
from m5p import optim, train
from m5p.data import batch_spec
from m5p.models import cpu_kernels, kernels
from m5p.models.scale import ScaleModel, init_batch
from m5p.state import init_state_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_cpu_kernels_match_jax_for_hash_masks_and_attention():
  """The unrolled hash is jax's Threefry-2x32; masks keep ~1 - rate with the
  exact scale; the attention (custom VJP, dropout mask as a residual) has
  autodiff's values and gradients for that mask. One jitted program."""
  from jax.extend.random import threefry_2x32
  b, l, h, k = 2, 7, 3, 4
  key_mask = jnp.arange(l)[None].repeat(b, 0) < 5
  _, kp = cpu_kernels.keep_mask(jax.random.key(9), (1,), 0.3)

  @jax.jit
  def run():
    key = jax.random.key_data(jax.random.key(5))
    count = jnp.arange(16, dtype=jnp.uint32)
    out = {"hash": jnp.concatenate(cpu_kernels._threefry2x32(key[0], key[1], count[:8], count[8:])),
           "hash_ref": threefry_2x32(key, count)}
    out["keep"] = cpu_kernels.keep_mask(jax.random.key(0), (300, 333), 0.1)[0]
    out["again"] = cpu_kernels.keep_mask(jax.random.key(0), (300, 333), 0.1)[0]
    out["other"] = cpu_kernels.keep_mask(jax.random.key(1), (300, 333), 0.1)[0]
    out["dropped"] = cpu_kernels.dropout(jnp.ones((7, 5)), jax.random.key(2), 0.1)
    q, kk, v, g = (jax.random.normal(jax.random.key(i), (b, l, h, k)) for i in range(4))
    mask = cpu_kernels.keep_mask(jax.random.key(9), (b, h, l, l), 0.3)[0]

    def reference(q, kk, v):
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(k)
      p = jax.nn.softmax(jnp.where(key_mask[:, None, None], logits, -1e30), axis=-1)
      return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(mask, p / kp, 0.0), v)

    for name, f in (("kernel", lambda *a: cpu_kernels.attention(*a, key_mask, jax.random.key(9), 0.3)),
                    ("ref", reference),
                    ("no_dropout", lambda *a: cpu_kernels.attention(*a, key_mask)),
                    ("jax", lambda *a: jax.nn.dot_product_attention(*a, mask=key_mask[:, None, None]))):
      y, vjp = jax.vjp(f, q, kk, v)
      out[name] = (y,) + vjp(g)
    return out

  r = jax.device_get(run())
  np.testing.assert_array_equal(r["hash"], r["hash_ref"])
  keep = r["keep"]
  assert keep.shape == (300, 333) and abs(float(keep.mean()) - 0.9) < 4e-3  # ~7 sigma of 1e5 draws.
  assert (keep == r["again"]).all() and not (keep == r["other"]).all()
  y = r["dropped"]
  np.testing.assert_allclose(y[y != 0], 1 / cpu_kernels.keep_mask(jax.random.key(0), (1,), 0.1)[1],
                             rtol=1e-6)
  for a, b_ in (("kernel", "ref"), ("no_dropout", "jax")):  # Output, then d/dq, d/dk, d/dv.
    for got, want in zip(r[a], r[b_]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=a)


@pytest.mark.parametrize("kernel_choice", ["standard", "cpu"])
def test_dropout_trains_on_both_kernels(kernel_choice):
  """Hidden and attention dropout 0.1: four AdamW steps on one batch lower the
  loss, and the dropout masks are really drawn (two steps' losses at the
  same params differ)."""
  c = tiny_config(**{"model.kernels": kernel_choice, "model.dropout": 0.1,
                     "model.video_layers": 0, "model.audio_layers": 0, "optim.warmup_frac": 0.0,
                     "optim.lr": 3e-3, "total_steps": 4})
  model = ScaleModel(c)
  tx, schedule = optim.make_optimizer(c)

  batch = {k: jnp.asarray(v) for k, v in batch_spec.random_batch(c, c.batch_size, seed=1).items()}
  start = jax.jit(init_state_fn(model, tx, c))(jax.random.key(0))
  step = jax.jit(train.make_train_step(model, tx, schedule, c)).lower(start, batch).compile(
      FAST_COMPILE)
  state, losses = start, []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  # The same params at another step number draw other masks: another loss.
  _, other = step(start.replace(step=jnp.asarray(7, jnp.int32)), batch)
  assert float(other["loss"]) != losses[0]


def _forward_text(kernel_choice, platforms):
  c = tiny_config(**{"model.kernels": kernel_choice})
  model = ScaleModel(c)
  params = jax.eval_shape(lambda r: meta.unbox(model.init(r, init_batch(c, 1), train=False)),
                          jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_spec.batch_shapes(c, 2).items()
           if k in batch_spec.MODEL_INPUTS}
  fn = jax.jit(lambda p, b: model.apply(p, b, train=False)["fused"])
  return fn.trace(params, batch).lower(lowering_platforms=platforms).as_text(debug_info=True)


def test_auto_kernels_are_chosen_when_lowering_for_a_platform():
  """'auto' lowered for cuda or tpu holds no CPU kernel; for cpu it holds
  them; for several platforms, both behind the platform switch. 'standard'
  never holds one, 'cpu' always does."""
  scope = cpu_kernels.SCOPE
  assert scope in _forward_text("auto", ("cpu",))
  for platform in ("cuda", "tpu"):
    assert scope not in _forward_text("auto", (platform,)), platform
  both = _forward_text("auto", ("cpu", "cuda", "tpu"))
  assert scope in both and "_platform_index" in both
  assert scope not in _forward_text("standard", ("cpu",))
  assert scope in _forward_text("cpu", ("tpu",))


def test_bad_kernel_settings_fail_with_one_clear_error():
  with pytest.raises(ValueError, match="config.model.kernels='gpu'"):
    kernels.check("gpu", None, 0.0)
  with pytest.raises(ValueError, match="config.model.attention_impl='flash'"):
    kernels.check("auto", "flash", 0.0)
  with pytest.raises(ValueError, match="attention_dropout=0"):
    ScaleModel(tiny_config(**{"model.attention_impl": "cudnn", "model.dropout": 0.1})).init(
        jax.random.key(0), init_batch(tiny_config(), 1), train=False)


def test_only_the_kernels_switch_imports_the_cpu_kernels():
  """No module of the package but m5p/models/kernels.py names cpu_kernels."""
  importers = []
  for folder, _, files in os.walk(os.path.join(ROOT, "m5p")):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
        if any("cpu_kernels" in n for n in names):
          importers.append(os.path.relpath(path, ROOT))
  assert set(importers) == {os.path.join("m5p", "models", "kernels.py")}, importers
