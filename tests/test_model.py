"""ScaleModel: shapes, absent-modality invariance, 'zeros' vs 'mask', no NaN, logical axes.

Parameters come from `jax.eval_shape(model.init)` filled with numpy noise:
compiling the real initialiser costs more than the forward pass on 2 cores,
and `eval_shape` still traces it completely. The compiled tests use a model
without image and audio blocks (each block costs ~2.5 s of compile on 2
cores); every tower still runs its stem, CLS, masks and final norm, and the
text, video and joint stacks keep one block each.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from m5p import default_config
from m5p.data import batch_spec
from m5p.losses.total import compute_loss
from m5p.modalities import MODALITIES, PAIR_NAMES
from m5p.models import towers
from m5p.losses import masked
from m5p.models.scale import ScaleModel, init_batch

B = 6
FAST = dict(image_layers=0, audio_layers=0)  # Layers dropped from the compiled test model.

FIELDS = {
    "text": ("text_ids", "text_mask", "text_lm_positions", "text_lm_ids", "text_lm_weights"),
    "table": ("table_ids", "table_mask", "table_segment", "table_field", "table_lm_positions",
              "table_lm_ids", "table_lm_weights"),
    "image": ("image", "image_zero", "image_loss_mask"),
    "video": ("video", "video_mask", "video_zero", "video_loss_mask"),
    "audio": ("audio", "audio_mask", "audio_zero", "audio_loss_mask"),
}


def tiny_config(**model):
  c = default_config.get_config()
  c.data.update(image_size=16, max_frames=3, audio_frames=32, n_mels=32, text_len=8,
                table_len=12, vocab_size=64, max_fields=4)
  c.model.update(width=32, heads=2, text_layers=1, image_layers=1, video_layers=1,
                 audio_layers=1, fusion_layers=1, proj_dim=16, patch_size=8, audio_patch=(16, 16))
  c.model.update(**model)
  return c


def noise_params(abstract, seed=0):
  """Random params with the init's tree and shapes (LayerNorm scales around 1)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    v = rng.standard_normal(x.shape).astype(np.float32) * 0.1
    return jnp.asarray(v + 1.0 if path[-1].key == "scale" else v)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def make_batch(config, seed=0):
  b = batch_spec.random_batch(config, B, seed=seed, present_prob=0.6)
  b["present"][0] = True  # All five.
  b["present"][1] = [False, False, False, True, False]  # Only video.
  b["present"][2] = [True, False, False, False, False]  # Only text.
  b["present"][3] = [True, True, True, False, False]
  return b


def randomize_absent(config, batch, seed):
  """The batch with every field of every absent modality replaced by other random content."""
  other = batch_spec.random_batch(config, B, seed=seed, present_prob=1.0)
  other["audio"][:] = np.nan  # Even non-finite garbage must not leak.
  other["text_ids"] += 10 * config.data.vocab_size  # Out of range.
  out = {k: v.copy() for k, v in batch.items()}
  for m, name in enumerate(MODALITIES):
    absent = ~batch["present"][:, m]
    for f in FIELDS[name]:
      out[f][absent] = other[f][absent]
  return out


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(**FAST)
  model = ScaleModel(config)
  boxed = jax.eval_shape(lambda r: model.init(r, init_batch(config, 2), train=False),
                         jax.random.PRNGKey(0))
  params = noise_params(meta.unbox(boxed))

  @jax.jit
  def step(params, batch):
    def loss_fn(p):
      out = model.apply(p, batch, train=False)
      loss, metrics = compute_loss(out, batch, config)
      return loss, (out, metrics)
    (loss, (out, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return out, metrics, grads

  batch = make_batch(config)
  return config, boxed, params, step, batch, step(params, batch)


def test_output_shapes(setup):
  config, _, _, _, _, (out, metrics, _) = setup
  d, v = config.model.width, config.data.vocab_size
  lt, lp = config.data.text_len, config.data.table_len
  expected = {
      "present": (B, 5), "unimodal": (B, 5, d), "z": (B, 5, config.model.proj_dim),
      "pooled": (B, 5, d), "fused": (B, d), "text_hidden": (B, lt, d), "table_hidden": (B, lp, d),
      "lm_logits": (B, batch_spec.max_predictions(config, "text")
                    + batch_spec.max_predictions(config, "table"), v),
      "mrm_pred": (B, batch_spec.num_image_patches(config), 8 * 8 * 3),
      "mfm_pred": (B, config.data.max_frames, towers.mfm_target_dim(config)),
      "mam_pred": (B, batch_spec.num_audio_patches(config), 16 * 16),
  }
  assert {k: out[k].shape for k in expected} == expected
  for k in expected:
    if k != "present":
      assert out[k].dtype == jnp.float32, k
  assert np.all(np.asarray(out["z"]) >= 0)  # ReLU.
  names = {"loss", "contrastive", "mlm", "mem", "mrm", "mfm", "mam"}
  names |= {f"w/{p}" for p in PAIR_NAMES}
  assert names <= set(metrics)


def test_no_nan_with_single_modality_samples(setup):
  _, _, _, _, batch, (out, metrics, grads) = setup
  for k, x in out.items():
    assert np.all(np.isfinite(np.asarray(x))), k
  for k, x in metrics.items():
    assert np.isfinite(float(x)), k
  for x in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(x)))
  present = batch["present"]
  out = jax.tree.map(np.asarray, out)
  for k in ("unimodal", "z", "pooled"):
    assert np.all(out[k][~present] == 0.0), k  # Absent modalities are exactly zero.
  np.testing.assert_allclose(out["fused"], out["pooled"].sum(1), atol=1e-6)
  assert np.all(out["mfm_pred"][~present[:, 3]] == 0.0)
  assert np.abs(out["pooled"][1, 3]).sum() > 0  # The only-video sample still has a video vector.


def test_absent_modalities_have_no_effect(setup):
  config, _, params, step, batch, (out, metrics, grads) = setup
  assert (~batch["present"]).sum() >= 5
  out2, metrics2, grads2 = step(params, randomize_absent(config, batch, seed=11))
  for k in out:
    np.testing.assert_allclose(np.asarray(out2[k]), np.asarray(out[k]), atol=1e-6, err_msg=k)
  for k in metrics:
    np.testing.assert_allclose(float(metrics2[k]), float(metrics[k]), rtol=1e-6, atol=1e-6,
                               err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               grads2, grads)


def test_zeros_mode_differs_only_with_absent_modalities(setup):
  _, _, params, _, batch, (out, _, _) = setup
  config = tiny_config(missing="zeros", **FAST)
  fwd = jax.jit(lambda p, b: ScaleModel(config).apply(p, b, train=False))
  zeros = jax.tree.map(np.asarray, fwd(params, batch))
  present = batch["present"]
  full = present.all(1)
  pooled = np.asarray(out["pooled"])
  # Samples with all five modalities: identical to 'mask'.
  np.testing.assert_allclose(zeros["pooled"][full], pooled[full], atol=1e-5)
  np.testing.assert_allclose(zeros["lm_logits"][full], np.asarray(out["lm_logits"])[full], atol=1e-5)
  # Samples missing some: their present modalities attended zero-filled tokens.
  diff = np.abs(zeros["pooled"] - pooled).max(-1)
  assert np.all(diff[~full][present[~full]] > 1e-4)
  assert np.all(zeros["pooled"][~present] == 0.0)


def test_lm_loss_at_the_pick_slots_equals_the_dense_full_vocabulary_loss(setup):
  """MLM and MEM as the losses compute them (the LM head at the batch's pick
  slots) equal, value and gradients, a dense reference: the head on every
  text and table position, the full-vocabulary cross-entropy taken at the
  picked positions, weighted and averaged by hand."""
  config, _, params, _, batch, _ = setup
  batch = {k: v.copy() for k, v in batch.items()}
  for name in ("text", "table"):  # Row 0 (all present) picks positions 1 and 3 too.
    slots = batch[f"{name}_lm_positions"].shape[1]
    positions = np.array([1, 3] + [0] * (slots - 2), np.int32)
    batch[f"{name}_lm_positions"][0] = positions
    batch[f"{name}_lm_ids"][0] = batch[f"{name}_ids"][0, positions] * (np.arange(slots) < 2)
    batch[f"{name}_lm_weights"][0] = np.arange(slots) < 2
  assert batch["text_lm_dropped"].sum() == 0 and batch["table_lm_dropped"].sum() == 0
  model = ScaleModel(config)
  dense = dict(batch)
  for name in ("text", "table"):  # The head on every position.
    length = batch[f"{name}_ids"].shape[1]
    dense[f"{name}_lm_positions"] = np.broadcast_to(np.arange(length, dtype=np.int32), (B, length))

  def picked_loss(p):
    out = model.apply(p, batch, train=False)
    m = masked.masked_losses(out, batch, config)
    return m["mlm"] + 10 * m["mem"], (m["mlm"], m["mem"])

  def dense_loss(p):
    out = model.apply(p, dense, train=False)
    present = np.asarray(batch["present"])
    w = masked.masked_task_weights(out["pooled"], jnp.asarray(present))
    losses = []
    lt = batch["text_ids"].shape[1]
    for m, name in enumerate(("text", "table")):
      logits = out["lm_logits"][:, :lt] if m == 0 else out["lm_logits"][:, lt:]  # Every position.
      targets = np.zeros(logits.shape[:2], np.int32)  # Original ids at the picks.
      picked = np.zeros(logits.shape[:2], bool)
      for b in range(B):
        n = int(batch[f"{name}_lm_weights"][b].sum()) * bool(present[b, m])
        pos = batch[f"{name}_lm_positions"][b, :n]
        targets[b, pos], picked[b, pos] = batch[f"{name}_lm_ids"][b, :n], True
      nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
      total = jnp.sum(jnp.where(picked, nll * w[:, m:m + 1], 0.0))
      losses.append(total / picked.sum())
    return losses[0] + 10 * losses[1], tuple(losses)

  @jax.jit
  def both(p):
    return (jax.value_and_grad(picked_loss, has_aux=True)(p),
            jax.value_and_grad(dense_loss, has_aux=True)(p))

  ((_, got), g_picked), ((_, want), g_dense) = both(params)
  assert float(want[0]) > 0 and float(want[1]) > 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c),
                                                       rtol=1e-5, atol=1e-7), g_picked, g_dense)


def test_parameters_carry_logical_axis_names():
  config = tiny_config()
  boxed = jax.eval_shape(lambda r: ScaleModel(config).init(r, init_batch(config, 2), train=False),
                         jax.random.PRNGKey(0))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["word_embed"]["embedding"] == jax.P("vocab", "embed")
  attn = specs["jct"]["block0"]["attn"]
  assert attn["query"]["kernel"] == jax.P("embed", "heads", "kv")
  assert attn["out"]["kernel"] == jax.P("heads", "kv", "embed")
  assert specs["jct"]["block0"]["mlp"]["fc1"]["kernel"] == jax.P("embed", "mlp")
  assert specs["image"]["stem"]["kernel"] == jax.P("patch", "embed")
  # Every kernel and table has an 'embed' axis (FSDP shards it).
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.P))
  tables = [(jax.tree_util.keystr(p), s) for p, s in flat if p[-1].key in ("kernel", "embedding")]
  assert len(tables) > 20 and all("embed" in tuple(s) for _, s in tables), tables


def test_sharing_flags_and_bfloat16_build():
  """Structure only (eval_shape: nothing compiled)."""
  def abstract(config):
    model = ScaleModel(config)
    params = jax.eval_shape(lambda r: model.init(r, init_batch(config, 2), train=False),
                            jax.random.PRNGKey(0))
    out = jax.eval_shape(lambda p, b: model.apply(p, b, train=False), meta.unbox(params),
                         init_batch(config, 2))
    return meta.unbox(params)["params"], out

  shared, _ = abstract(tiny_config())
  assert "text_stack" in shared and "stack" not in shared["table"]
  assert "video_frames" not in shared
  unshared, _ = abstract(tiny_config(share_text_table=False, video_uses_image_stack=False))
  assert "stack" in unshared["table"] and "video_frames" in unshared
  params, out = abstract(tiny_config(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert out["pooled"].dtype == jnp.float32 and out["lm_logits"].dtype == jnp.float32
