"""Scaling features: remat, bfloat16 compute, gradient accumulation, rule overrides.

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
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta

from conftest import tiny_config
from m5p import optim, sharding, train
from m5p import state as state_lib
from m5p.data import batch_spec
from m5p.models import layers, scan_layout
from m5p.losses.total import compute_loss
from m5p.models.scale import ScaleModel, init_batch

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


@pytest.mark.parametrize("rows, policy", [(0, "nothing"), (3, "nothing"), (0, "dots")])
def test_remat_gives_the_same_loss_and_gradients(setup, reference, rows, policy):
  """Whole-batch remat, remat by slices of at most 3 rows (each stack cuts
  its rows into the fewest slices that divide them: 4 slices of 2 for a
  batch of 8), and remat keeping the dense products' outputs ('dots')."""
  assert_same_step(run(setup, **{"model.remat": True, "model.remat_rows": rows,
                                 "model.remat_policy": policy}), reference,
                   f"remat rows={rows} policy={policy}")


def test_remat_slices_divide_the_rows():
  assert [layers.remat_slices(n, 16) for n in (8, 16, 64, 65, 96)] == [1, 1, 4, 5, 6]
  assert layers.remat_slices(7, 3) == 7 and layers.remat_slices(12, 5) == 3


@pytest.fixture(scope="module")
def scanned(setup):
  """(loss, metrics, grads in the scanned layout) of model.scan_layers (with
  remat by batch slices, as configs/scale_authors.py) from the unrolled
  params stacked (scan_layout)."""
  params, batch = setup
  c = config(**{"model.scan_layers": True, "model.remat": True, "model.remat_rows": 4})
  stacked = scan_layout.stack_blocks(params)
  shapes = jax.eval_shape(lambda r: ScaleModel(c).init(
      {"params": r, "dropout": r}, init_batch(c, 1), train=False)["params"], jax.random.key(0))
  assert jax.tree.structure(meta.unbox(shapes)) == jax.tree.structure(stacked)
  (loss, metrics), grads = compile_and_run(train.make_value_and_grad(ScaleModel(c), c), stacked,
                                            batch, jax.random.key(1))
  return float(loss), jax.device_get(metrics), jax.tree.map(np.asarray, jax.device_get(grads))


def test_scanned_layers_give_the_same_loss_and_gradients(scanned, reference):
  """The scanned step's loss and, unstacked, its gradients are the unrolled
  step's; the image stack's CLS-only `split` is covered (the tiny model's
  frames share it)."""
  loss, metrics, grads = scanned
  assert_same_step((loss, metrics, scan_layout.unstack_blocks(grads)), reference, "scan remat rows=4")


def test_scanned_and_unrolled_optimizer_steps_update_the_params_alike(setup, reference, scanned):
  """The optimizer step (AdamW, weight decay 0.1 through optim.decay_mask) on
  the scanned layout's params and gradients gives, unstacked, the unrolled
  step's params. eps=1 keeps AdamW's update linear in small gradients, so
  rounding in the gradients cannot flip a near-sign update; lr 0.1 makes the
  decay (lr * 0.1 * p) stand out. A rank-based mask (decaying the stacked
  biases and LayerNorm parameters) fails this, as the test checks too."""
  import optax
  params = setup[0]

  def step(p, g, mask):
    tx = optax.adamw(0.1, b1=0.9, b2=0.98, eps=1.0, weight_decay=0.1, mask=mask)
    updates, _ = tx.update(g, tx.init(p), p)
    return jax.device_get(optax.apply_updates(p, updates))

  step = jax.jit(step, static_argnums=2)
  want = step(params, reference[2], optim.decay_mask)
  stacked = scan_layout.stack_blocks(params)
  got = scan_layout.unstack_blocks(step(stacked, scanned[2], optim.decay_mask))
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params))]
  assert np.mean(np.array(moved) > 1e-6) > 0.9, moved  # The step really moved the params.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  by_rank = scan_layout.unstack_blocks(
      step(stacked, scanned[2], lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  ln_scale = lambda p: p["jct"]["block0"]["ln_attn"]["scale"]
  assert np.max(np.abs(ln_scale(by_rank) - ln_scale(want))) > 1e-3


def test_scanned_layers_stack_parameters_on_a_replicated_layers_axis():
  c = config(**{"model.scan_layers": True})
  boxed = jax.eval_shape(lambda r: ScaleModel(c).init(
      {"params": r, "dropout": r}, init_batch(c, 1), train=False)["params"], jax.random.key(0))
  qkv = boxed["jct"]["blocks"]["block"]["attn"]
  leaf = jax.tree.leaves(qkv, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0]
  assert leaf.names[0] == "layers" and leaf.value.shape[0] == c.model.fusion_layers
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, model=2, num_devices=8)))
  spec = sharding.logical_sharding(leaf, mesh, sharding.rules(c)).spec
  assert spec[0] is None, spec  # The layers axis replicated, the others as unrolled.
  assert tuple(spec[1:]) == tuple(sharding.logical_sharding(
      meta.Partitioned(jax.ShapeDtypeStruct(leaf.value.shape[1:], leaf.value.dtype), leaf.names[1:]),
      mesh, sharding.rules(c)).spec)


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

  state = jax.eval_shape(state_lib.init_state_fn(model, tx, c), jax.random.key(0))
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


# --- config.sharding_rules -----------------------------------------------------

# Transposes the MLP's layout (embed -> model, mlp -> fsdp) and un-shards the
# heads; 'vocab' loses 'model' to 'embed', which comes first in RULES.
OVERRIDE = (("embed", "model"), ("mlp", "fsdp"), ("heads", None))


def sharded(setup, overrides):
  """(loss, param shardings, Adam-state shardings) on mesh (1, 2, 2) under
  `overrides`. The shardings are what `state.create_sharded_state` computes
  (rules -> eval_shape -> logical_sharding), without compiling the init; the
  loss is the setup's parameters laid out that way."""
  params, host_batch = setup
  c = config(sharding_rules=overrides)
  c.mesh.update(dict(data=1, fsdp=2, model=2, num_devices=4))
  mesh = sharding.make_mesh(c.mesh)
  model = ScaleModel(c)
  tx, _ = optim.make_optimizer(c)
  table = sharding.rules(c)

  def init(rng):
    boxed = model.init({"params": rng, "dropout": rng}, init_batch(c, 1), train=False)["params"]
    return boxed, tx.init(boxed)

  with jax.set_mesh(mesh), nn.logical_axis_rules(table):
    param_shardings, opt_shardings = meta.unbox(
        sharding.logical_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, table))
    batch_shard = sharding.batch_sharding(mesh)
    params = jax.device_put(jax.tree.map(np.asarray, params), param_shardings)  # From host: no resharding programs.
    batch = jax.device_put(host_batch, batch_shard)

    def loss_fn(params, batch):
      return compute_loss(model.apply({"params": params}, batch, train=False), batch, c)[0]

    fn = jax.jit(loss_fn, in_shardings=(param_shardings, batch_shard))
    loss = fn.lower(params, batch).compile(FAST_COMPILE)(params, batch)
  return float(loss), param_shardings, opt_shardings


def _spec(named_sharding) -> tuple:
  """A PartitionSpec as a tuple without trailing Nones (P('a', None) == P('a'))."""
  spec = list(named_sharding.spec)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def test_sharding_rules_override_changes_layout_not_loss(setup):
  ref_loss, ref_params, _ = sharded(setup, ())
  loss, params, opt_state = sharded(setup, OVERRIDE)
  fc1 = lambda p: p["jct"]["block0"]["mlp"]["fc1"]["kernel"]  # (embed, mlp)
  query = lambda p: p["jct"]["block0"]["attn"]["query"]["kernel"]  # (embed, heads, kv)
  assert _spec(fc1(ref_params)) == ("fsdp", "model")
  assert _spec(fc1(params)) == ("model", "fsdp")
  assert _spec(query(ref_params)) == ("fsdp", "model")
  assert _spec(query(params)) == ("model",)
  assert _spec(params["word_embed"]["embedding"]) == (None, "model")  # (vocab, embed)
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
          if isinstance(s, jax.sharding.NamedSharding) and len(s.spec) == 2 and s.spec[1] == "fsdp"]
  assert len(adam) >= 2 and all(_spec(s) == ("model", "fsdp") for s in adam)  # mu, nu follow.
  assert loss == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("override, message", [
    ((("mlp", "tensor"),), r"'mlp' -> 'tensor'.*'tensor' is not a mesh axis"),
    ((("mpl", "model"),), r"unknown logical axis 'mpl'"),
    ((("heads", ("model", "model")),), r"a tuple of distinct ones"),
])
def test_bad_sharding_rules_fail_with_one_clear_error(override, message):
  """Raised before anything is traced, from the first user of the rules."""
  c = config(sharding_rules=override)
  with pytest.raises(ValueError, match=message):
    state_lib.create_sharded_state(ScaleModel(c), optim.make_optimizer(c)[0], c,
                                   sharding.make_mesh(c.mesh))


def test_sharding_rules_from_a_string():
  """The override as a Python literal string (how a JSON-loaded config may hold it)."""
  c = ml_collections.ConfigDict(dict(sharding_rules="(('mlp', None), ('embed', 'model'))"))
  table = dict(sharding.rules(c))
  assert table["mlp"] is None and table["embed"] == "model" and table["heads"] == "model"
  assert list(table) == [k for k, _ in sharding.RULES]  # Merged in place: the order stays.
  c.sharding_rules = "(('mlp', 'model')"
  with pytest.raises(ValueError, match="not a Python literal"):
    sharding.rules(c)


# --- config.compiler_options (m5p.train.compiler_options, jit_train_step) -------

def test_compiler_options_parse_and_keep_only_this_backends():
  c = ml_collections.ConfigDict(dict(compiler_options=(
      "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED, "
      "xla_gpu_enable_latency_hiding_scheduler=true,xla_backend_optimization_level=0")))
  assert train.compiler_options(c, "cpu") == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", "xla_backend_optimization_level": 0}
  assert train.compiler_options(c, "cuda") == {
      "xla_gpu_enable_latency_hiding_scheduler": True, "xla_backend_optimization_level": 0}
  assert train.compiler_options(ml_collections.ConfigDict(dict(compiler_options="")), "cpu") is None
  for bad in ("xla_cpu_scheduler_type", "scheduler=1", "xla_cpu_x="):
    with pytest.raises(ValueError, match=f"config.compiler_options: {bad!r} is not"):
      train.compiler_options(ml_collections.ConfigDict(dict(compiler_options=bad)), "cpu")


def _train_step_temp_bytes(options: str) -> int:
  """XLA's temp memory for the trainer's jitted step (train.jit_train_step) of
  the scanned, remat'd tiny model under `config.compiler_options=options`."""
  fast = "xla_backend_optimization_level=0,xla_llvm_disable_expensive_passes=true"
  c = config(compiler_options=",".join(filter(None, (fast, options))),
             **{"model.scan_layers": True, "model.remat": True})
  c.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1))
  mesh = sharding.make_mesh(c.mesh)
  model = ScaleModel(c)
  tx, schedule = optim.make_optimizer(c)
  state, shardings = state_lib.create_sharded_state(model, tx, c, mesh)
  batch = jax.device_put(batch_spec.random_batch(c, c.batch_size), sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(c)):
    step = train.jit_train_step(model, tx, schedule, c, shardings, mesh)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_compiler_options_reach_xla_through_the_trainers_jit():
  """The memory-optimised XLA:CPU scheduler (configs/scale_authors.py) does not
  allocate the scanned stacks' gradient buffers before the forward pass."""
  default = _train_step_temp_bytes("")
  memory_optimized = _train_step_temp_bytes("xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
  print(f"temp bytes: default {default}, memory-optimised {memory_optimized}")
  assert memory_optimized < 0.9 * default, (memory_optimized, default)


# --- config.model.kernels (m5p.models.kernels) -------------------------------------

def test_standard_kernels_give_the_cpu_kernels_loss_and_gradients(setup, reference):
  """'standard' (flax / jax.nn ops) against the reference step, whose 'auto'
  kernels are the CPU kernels on this platform (tests/test_kernels.py checks
  that 'auto' lowers to them for cpu): fp32, dropout off, one device."""
  assert_same_step(run(setup, **{"model.kernels": "standard"}), reference, "standard kernels")


def test_remat_small_rows_change_the_policy_of_small_stack_calls(setup):
  """model.remat_small_rows: a stack call on at most that many sequences
  takes model.remat_small_policy ('none': no recomputation in the traced
  step); on more, the general policy."""
  params, batch = setup

  def checkpoints(**overrides):
    c = config(**{"model.remat": True, **overrides})
    jaxpr = jax.make_jaxpr(train.make_value_and_grad(ScaleModel(c), c))(params, batch,
                                                                        jax.random.key(1))
    return str(jaxpr).count("remat2[")  # The recomputed backward of each remat call.

  rows = batch["present"].shape[0]  # The smallest stack call runs the batch's rows.
  # Frames run through the image stack as batch x (1 + frames) rows: still remat'd.
  every = checkpoints()
  small = {"model.remat_small_policy": "none"}
  assert 0 < checkpoints(**{"model.remat_small_rows": rows, **small}) < every
  assert checkpoints(**{"model.remat_small_rows": 100 * rows, **small}) == 0
