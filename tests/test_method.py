"""SCALE's switchable parts (issue 4): multi-positive InfoNCE, the learned
temperature, modality dropout, 'features' stems and the authors' config."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn
from test_ring_loss import ref_multi_positive

from m5p import optim, sharding, state as state_lib
from m5p.config_loader import load_config
from m5p.data import batch_spec, convert, pipeline, synthetic
from m5p.losses.contrastive import harmonized_contrastive
from m5p.losses.total import compute_loss
from m5p.models.scale import ScaleModel, init_batch
from m5p.modalities import INDEX
from m5p.train import jit_train_step, make_train_step

MODES = ("per_sample_logits", "pair_loss_weights", "uniform")


@pytest.fixture(scope="module")
def embeddings():
  rng = np.random.default_rng(3)
  b = 12
  z = np.abs(rng.standard_normal((b, 5, 8))).astype(np.float32)
  present = rng.random((b, 5)) < 0.8
  present[np.arange(b), rng.integers(0, 5, b)] = True
  return jnp.asarray(z), jnp.asarray(present)


@pytest.mark.parametrize("infonce", ["clip", "ntxent"])
def test_multi_positive_without_duplicates_equals_plain(embeddings, infonce):
  z, present = embeddings
  distinct = jnp.arange(z.shape[0], dtype=jnp.int32)  # Every sample its own group.
  none = -jnp.ones(z.shape[0], jnp.int32)  # No groups at all.
  for mode in MODES:
    plain, _ = harmonized_contrastive(z, present, mode=mode, infonce=infonce, temperature=0.1)
    for groups in (distinct, none):
      multi, _ = harmonized_contrastive(z, present, mode=mode, infonce=infonce, temperature=0.1,
                                        positive_groups=groups)
      np.testing.assert_allclose(float(multi), float(plain), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("infonce", ["clip", "ntxent"])
def test_multi_positive_matches_supcon_reference(embeddings, infonce):
  """Duplicated listings: the global form equals the dense SupCon L_out reference
  (the one the ring form is tested against), and differs from the plain loss."""
  z, present = embeddings
  groups = jnp.array([0, 0, 1, 1, 1, -1, 2, 3, 3, -1, 4, 5], jnp.int32)
  for mode in MODES:
    multi, _ = harmonized_contrastive(z, present, mode=mode, infonce=infonce, temperature=0.1,
                                      positive_groups=groups)
    ref = ref_multi_positive(z, present, mode=mode, infonce=infonce, temperature=0.1,
                             groups=groups)
    plain, _ = harmonized_contrastive(z, present, mode=mode, infonce=infonce, temperature=0.1)
    np.testing.assert_allclose(float(multi), float(ref), rtol=1e-5, atol=1e-5)
    assert abs(float(multi) - float(plain)) > 1e-3


def test_multi_positive_pulls_listings_together():
  """Two listings of one product with similar embeddings, the others
  orthogonal: a gradient step on plain InfoNCE pushes the twins apart (each is
  the other's hardest negative); on multi-positive it pulls them together."""
  eye = np.eye(8, dtype=np.float32)
  z = np.stack([eye[0], eye[1], eye[2], eye[3], eye[0] + 0.5 * eye[5]])[:, None, :]
  z = jnp.asarray(np.tile(z, (1, 5, 1)))  # Sample 4 is a second listing of sample 0.
  present = jnp.ones((5, 5), bool)
  groups = jnp.array([7, 1, 2, 3, 7], jnp.int32)
  kw = dict(mode="uniform", infonce="clip", temperature=0.1)

  def twin_cosine_after_step(groups):
    grad = jax.grad(lambda z: harmonized_contrastive(z, present, positive_groups=groups, **kw)[0])(z)
    a, b = (z - 0.1 * grad)[jnp.array([0, 4]), 0]
    return float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))

  before = float(z[0, 0] @ z[4, 0] / jnp.linalg.norm(z[0, 0]) / jnp.linalg.norm(z[4, 0]))
  assert twin_cosine_after_step(None) < before < twin_cosine_after_step(groups)


def _model_and_params(config):
  model = ScaleModel(config)
  params = model.init(jax.random.key(0), init_batch(config), train=False)["params"]
  return model, nn.unbox(params)


def test_learned_temperature_is_clamped_and_trained():
  config = tiny_config(**{"loss.learn_temperature": True, "loss.temperature": 0.1,
                          "loss.min_temperature": 0.05, "batch_size": 4})
  model, params = _model_and_params(config)
  np.testing.assert_allclose(float(params["log_inv_temperature"]), np.log(10.0), rtol=1e-6)
  batch = {k: jnp.asarray(v) for k, v in batch_spec.random_batch(config, 4).items()}

  @jax.jit
  def run(p):
    loss_fn = lambda p: compute_loss(model.apply({"params": p}, batch, train=False), batch, config)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    return metrics["temperature"], grads["log_inv_temperature"]

  temperature, grad = run(params)
  np.testing.assert_allclose(float(temperature), 0.1, rtol=1e-5)
  assert float(jnp.abs(grad)) > 0
  hot = dict(params, log_inv_temperature=jnp.asarray(10.0))  # tau = e^-10: clamped to 0.05.
  temperature, grad = run(hot)
  np.testing.assert_allclose(float(temperature), 0.05, rtol=1e-5)
  assert float(grad) == 0  # Clamped: no gradient pushes it further.
  assert "log_inv_temperature" not in jax.eval_shape(
      lambda: ScaleModel(tiny_config()).init(jax.random.key(0), init_batch(tiny_config()),
                                             train=False))["params"]


def _batches(config, data_dir, n):
  it = iter(pipeline.train_dataset(config, data_dir))
  return [next(it) for _ in range(n)]


def test_modality_dropout_rates_and_never_empty(tiny_dataset):
  base = tiny_config(**{"data.read_threads": 0})
  rates = {"text": 0.0, "table": 0.0, "image": 0.5, "video": 0.0, "audio": 0.9}
  dropped_cfg = tiny_config(**{"data.read_threads": 0})
  dropped_cfg.data.modality_dropout.update(rates)
  before = np.concatenate([b["present"] for b in _batches(base, tiny_dataset, 20)])
  after = np.concatenate([b["present"] for b in _batches(dropped_cfg, tiny_dataset, 20)])
  assert not np.any(after & ~before)  # Only ever removes.
  assert np.all(after.any(axis=1) == before.any(axis=1))  # Never the last modality.
  for name, rate in rates.items():
    m = INDEX[name]
    kept = after[before[:, m], m].mean()
    if rate == 0:
      assert kept == 1.0
    else:  # 320 draws: 4 standard deviations (the last-modality rule adds a little).
      sd = np.sqrt(rate * (1 - rate) / before[:, m].sum())
      assert abs((1 - kept) - rate) < 4 * sd + 0.02, (name, kept)
  # Eval batches never drop.
  eval_batch = next(pipeline.eval_batches(dropped_cfg, tiny_dataset, "test"))
  eval_base = next(pipeline.eval_batches(base, tiny_dataset, "test"))
  np.testing.assert_array_equal(eval_batch["present"], eval_base["present"])


@pytest.fixture(scope="module")
def feature_dataset(tmp_path_factory):
  """A synthetic set where every item with media also has precomputed features,
  half of them features only (no media files)."""
  root = tmp_path_factory.mktemp("m5p_features")
  c = tiny_config()
  raw, data = str(root / "raw"), str(root / "data")
  synthetic.generate(raw, 64, seed=1, feature_fraction=1.0, feature_only_fraction=0.5)
  d = c.data
  convert.convert(raw, data, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                  max_audio_seconds=d.max_audio_seconds, num_shards=1, vocab_size=d.vocab_size,
                  log=lambda *a, **k: None)
  return data


def _features_config(**overrides):
  c = tiny_config(**{"data.read_threads": 0, "batch_size": 8, **overrides})
  for m in ("image", "video", "audio"):
    c.model.stem[m] = "features"
  return c


def test_feature_stems_read_the_stored_features(feature_dataset):
  config = _features_config()
  media = tiny_config(**{"data.read_threads": 0, "batch_size": 8})
  (fb,), (mb,) = _batches(config, feature_dataset, 1), _batches(media, feature_dataset, 1)
  shapes = batch_spec.batch_shapes(config, 8)
  for k, v in fb.items():
    assert (v.shape, v.dtype) == shapes[k], k
  assert fb["image"].shape == (8, 5, 64) and fb["audio"].shape == (8, 12, 24)
  for m in ("image", "video", "audio"):
    i = INDEX[m]
    present = fb["present"][:, i]
    assert present.any(), m
    np.testing.assert_array_equal(present, fb[f"{m}_mask"].any(axis=1))  # A row = present.
    assert np.all(fb[m][~fb[f"{m}_mask"]] == 0)  # Padding rows are zero.
  # Feature-only items: absent with media stems, present with feature stems.
  assert np.any(fb["present"][:, 2:] & ~mb["present"][:, 2:])
  np.testing.assert_array_equal(fb["present"][:, :2], mb["present"][:, :2])


def test_feature_stems_train(feature_dataset):
  """The train step on real batches, 'features' image and audio stems beside a
  'media' video (its frames then get their own image tower; configs/
  scale_authors.py steps the all-features model in test_configs): finite
  loss, MRM/MAM predict the input features, and the loss falls."""
  stems = ("features", "media", "features")
  config = _features_config(**{"optim.lr": 3e-3})
  for m, s in zip(("image", "video", "audio"), stems):
    config.model.stem[m] = s
  mesh = sharding.make_mesh(config.mesh)
  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  batches = _batches(config, feature_dataset, 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    step = jit_train_step(model, tx, schedule, config, shardings, mesh, donate=False)
    device_batches = [{k: jax.device_put(v, batch_shard) for k, v in b.items()} for b in batches]
    losses = []
    for i in range(6):
      state, metrics = step(state, device_batches[i % 2])
      losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[4] < losses[0] and losses[5] < losses[1], losses  # Two batches, alternating.
  out = model.apply({"params": state.params}, {k: jnp.asarray(v) for k, v in batches[0].items()},
                    train=False)
  assert out["mrm_pred"].shape[-1] == 64
  assert out["mam_pred"].shape[-1] == 24
  stem_inputs = lambda tower: nn.unbox(state.params[tower]["stem"]["kernel"]).shape[0]
  assert stem_inputs("image") == 64 and stem_inputs("video_frames") == 8 * 8 * 3


def test_encoder_embeds_precomputed_features_as_the_pipeline_does(feature_dataset, tmp_path):
  """m5p.Encoder for 'features' stems: a raw product's .npy features (given as
  a path, the file's bytes or an array) embed as its converted record does
  through the eval pipeline (what an export's embeddings are); media for a
  'features' stem is refused, not silently dropped."""
  import m5p
  from m5p import export
  from m5p.data import raw_layout
  from m5p.evaluation import embed as embed_lib
  config = _features_config()
  config.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1))
  mesh = sharding.make_mesh(config.mesh)
  model = ScaleModel(config)
  state, shardings = state_lib.create_sharded_state(model, optim.make_optimizer(config)[0], config,
                                                    mesh)
  split = config.data.eval_split
  emb = embed_lib.embed_split(embed_lib.make_embed_fn(model, mesh, shardings.params), state.params,
                              config, mesh, feature_dataset, split)
  # An export's manifest and tokenizer (what the Encoder reads besides the params).
  manifest = convert.load_manifest(feature_dataset)
  export_dir = tmp_path / "export"
  export_dir.mkdir()
  (export_dir / export.MANIFEST_FILE).write_text(json.dumps({"conversion": manifest["conversion"]}))
  shutil.copyfile(os.path.join(feature_dataset, manifest["tokenizer"]), export_dir / export.TOKENIZER_FILE)
  encoder = m5p.Encoder(config, state.params, str(export_dir), mesh=mesh)

  raw = os.path.join(os.path.dirname(feature_dataset), "raw")
  entries = {}
  for name in raw_layout.find_splits(raw).values():
    entries.update(raw_layout.iter_entries(name))
  products = []
  for item_id in emb["item_id"]:
    item_id = item_id.decode() if isinstance(item_id, bytes) else str(item_id)
    paths, _ = raw_layout.find_media(raw, item_id)
    product = {"title": entries[item_id].get("title"), "pv": entries[item_id].get("pv")}
    product.update({k: v for k, v in paths.items() if k.endswith("_feature")})
    products.append(product)
  with_image = [i for i, p in enumerate(products) if "image_feature" in p]
  with_audio = [i for i, p in enumerate(products) if "audio_feature" in p]
  assert len(with_image) >= 2 and with_audio
  products[with_image[0]]["image_feature"] = np.load(products[with_image[0]]["image_feature"])
  with open(products[with_image[1]]["image_feature"], "rb") as f:
    products[with_image[1]]["image_feature"] = f.read()
  out = encoder.embed(products)
  np.testing.assert_array_equal(out["present"], emb["present"])
  assert out["present"][with_image, INDEX["image"]].all()
  np.testing.assert_allclose(out["fused"], emb["fused"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["z"], emb["z"], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="image stem reads precomputed features.*give 'image_feature'"):
    encoder.embed([{"title": "a title", "image": "item.jpg"}])
  with pytest.raises(ValueError, match="'audio_feature': expected a non-empty numeric"):
    encoder.embed([{"audio_feature": np.array(["a", "b"])}])


@pytest.mark.parametrize("shared", [True, False])
def test_feature_video_runs_on_the_image_stack_when_shared(shared):
  """A 'features' video with model.video_uses_image_stack (the authors'): its
  frame tokens run through the image tower's blocks, and the video has no
  blocks of its own; unshared, it has its own and the image blocks do not
  touch it."""
  config = _features_config(**{"model.video_uses_image_stack": shared})
  model = ScaleModel(config)
  batch = {k: jnp.asarray(v) for k, v in batch_spec.random_batch(config, 4, seed=0).items()}
  batch["present"] = jnp.ones_like(batch["present"])
  params = nn.unbox(jax.jit(lambda r: model.init({"params": r}, batch, train=False))(
      jax.random.key(0))["params"])
  assert ("stack" in params["video"]) != shared
  assert "video_frames" in params and "stack" not in params["video_frames"]
  video = jax.jit(lambda p: model.apply({"params": p}, batch, train=False)["unimodal"][:, INDEX["video"]])
  bumped = jax.tree.map(lambda x: x * 1.5, params["image"]["stack"])
  moved = np.abs(np.asarray(video({**params, "image": {**params["image"], "stack": bumped}}))
                 - np.asarray(video(params))).max()
  assert (moved > 1e-3) == shared, moved


def test_authors_demo_config_is_the_demo_with_the_authors_method():
  demo, authors = load_config("demo"), load_config("scale_authors:demo")
  assert (authors.model.missing, authors.loss.infonce, authors.loss.multi_positive) == (
      "zeros", "ntxent", False)
  assert authors.loss.harmonization == "per_sample_logits" and authors.loss.temperature == 0.07
  assert authors.model.width == demo.model.width and authors.total_steps == demo.total_steps
  paper = load_config("scale_authors")
  assert tuple(paper.data.features.image) == (36, 2048) and paper.data.vocab_size == 21128
  assert batch_spec.num_image_patches(paper) == 36 and batch_spec.num_audio_patches(paper) == 80


# Every method switch trains: tiny model, one device, three steps on one random batch
# (the loss must fall), compiled without XLA's slow CPU passes (same math).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VARIANTS = {  # With the default run (test_training) every value of every switch trains.
    "pair_loss_weights_ntxent_zeros_learned_tau_single_positive_unshared": {
        "loss.harmonization": "pair_loss_weights", "loss.infonce": "ntxent",
        "model.missing": "zeros", "loss.learn_temperature": True, "loss.multi_positive": False,
        "model.share_text_table": False, "model.video_uses_image_stack": False},
    "uniform": {"loss.harmonization": "uniform"},
    "authors": "scale_authors:demo",
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_method_variants_train(name):
  spec = VARIANTS[name]
  if isinstance(spec, str):  # A config file's variant, at the tiny test size.
    config = load_config(spec)
    tiny = tiny_config()
    config.model.update(tiny.model.to_dict() | {k: config.model[k] for k in (
        "missing", "share_text_table", "video_uses_image_stack")})
    config.data.update(tiny.data.to_dict())
  else:
    config = tiny_config(**spec)
  config.update(dict(batch_size=8, total_steps=3))
  config.optim.update(dict(lr=3e-3, warmup_frac=0.0))
  config.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1))
  mesh = sharding.make_mesh(config.mesh)
  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  batch = {k: jnp.asarray(v) for k, v in batch_spec.random_batch(config, 8, seed=1).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    step = jax.jit(make_train_step(model, tx, schedule, config)).lower(state, batch).compile(
        compiler_options=FAST_COMPILE)
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  if config.loss.learn_temperature:
    assert float(metrics["temperature"]) != pytest.approx(config.loss.temperature, abs=1e-7)
