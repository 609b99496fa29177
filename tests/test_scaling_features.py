"""Scaling features: remat, bfloat16 compute, gradient accumulation.

Each compares `train.make_value_and_grad` (what the train step differentiates)
with one feature on against the plain fp32 one-pass version, on one batch and
the same initial parameters. Compiling dominates, so: one device, the demo's
tiny model without video and audio blocks (the text stack, the image stack
with its CLS-only `split` last block, and the JCT keep theirs), and every
program compiled at XLA's backend optimisation level 0 (half the compile
time on CPU; each comparison's two sides are compiled alike). Dropout is off
(the tiny config), so the accumulated step is the same step (see
m5p.accumulation for dropout).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from conftest import tiny_config
from m5p import optim, train
from m5p.data import batch_spec
from m5p.models.scale import ScaleModel, init_batch
from m5p.state import TrainState

SMALL = {"model.video_layers": 0, "model.audio_layers": 0}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def config(**overrides):
  return tiny_config(**SMALL, **overrides)


def compile_and_run(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


@pytest.fixture(scope="module")
def setup():
  c = config()
  model = ScaleModel(c)
  params = meta.unbox(compile_and_run(
      lambda rng: model.init({"params": rng, "dropout": rng}, init_batch(c, 1), train=False)["params"],
      jax.random.key(0)))
  batch = {k: jnp.asarray(v) for k, v in batch_spec.random_batch(c, c.batch_size, seed=3).items()}
  return params, batch


def run(setup, **overrides):
  """(loss, metrics, grads) as numpy, from the step's value_and_grad under `overrides`."""
  params, batch = setup
  c = config(**overrides)
  (loss, metrics), grads = compile_and_run(train.make_value_and_grad(ScaleModel(c), c), params,
                                            batch, jax.random.key(1))
  return float(loss), jax.device_get(metrics), jax.tree.map(np.asarray, jax.device_get(grads))


@pytest.fixture(scope="module")
def reference(setup):
  return run(setup)


def assert_same_step(got, ref, name):
  """Loss and metrics to 1e-5 relative; every gradient to 1e-5 relative plus
  1e-6 of the largest gradient (summing in another order moves a gradient
  by ~1e-8 whatever its own size: small ones carry that as a larger relative
  error)."""
  loss, metrics, grads = got
  ref_loss, ref_metrics, ref_grads = ref
  assert loss == pytest.approx(ref_loss, rel=1e-5), name
  for k, v in ref_metrics.items():
    assert float(metrics[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), (name, k)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  atol = 1e-6 * max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref_grads))
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol,
                               err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_remat_gives_the_same_loss_and_gradients(setup, reference):
  assert_same_step(run(setup, **{"model.remat": True}), reference, "remat")


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulation_gives_the_global_batch_loss_and_gradients(setup, reference, accum_steps):
  assert_same_step(run(setup, accum_steps=accum_steps), reference, f"accum_steps={accum_steps}")


def test_bfloat16_loss_and_gradients_close_to_float32(setup, reference):
  loss, _, grads = run(setup, **{"model.dtype": "bfloat16"})
  ref_loss, _, ref_grads = reference
  assert loss == pytest.approx(ref_loss, rel=2e-2)
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == np.float32 for g in leaves)  # Gradients of the fp32 params.
  flat = np.concatenate([g.ravel() for g in leaves])
  ref_flat = np.concatenate([g.ravel() for g in jax.tree.leaves(ref_grads)])
  assert np.isfinite(flat).all()
  cosine = flat @ ref_flat / (np.linalg.norm(flat) * np.linalg.norm(ref_flat))
  assert cosine > 0.99, cosine


def test_bfloat16_state_stays_float32_through_a_step():
  """The whole train step (bf16 compute, with accumulation) traced, not
  compiled: parameters and optimizer state come out float32."""
  c = config(**{"model.dtype": "bfloat16"}, accum_steps=2)
  model = ScaleModel(c)
  tx, schedule = optim.make_optimizer(c)

  def init(rng):
    params = meta.unbox(model.init({"params": rng, "dropout": rng}, init_batch(c, 1),
                                   train=False)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  state = jax.eval_shape(init, jax.random.key(0))
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype)
           in batch_spec.batch_shapes(c, c.batch_size).items()}
  new_state, metrics = jax.eval_shape(train.make_train_step(model, tx, schedule, c), state, batch)
  for tree in (state.params, state.opt_state, new_state.params, new_state.opt_state):
    floats = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(d == jnp.float32 for d in floats), set(floats)
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(metrics))


def test_accumulation_rejects_an_indivisible_batch():
  c = config(accum_steps=3)  # batch_size 16.
  params_shape = jax.eval_shape(
      lambda r: ScaleModel(c).init({"params": r, "dropout": r}, init_batch(c, 1), train=False),
      jax.random.key(0))["params"]
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype)
           in batch_spec.batch_shapes(c, c.batch_size).items()}
  with pytest.raises(ValueError, match="not divisible by accum_steps"):
    jax.eval_shape(train.make_value_and_grad(ScaleModel(c), c), meta.unbox(params_shape), batch,
                   jax.random.key(1))
