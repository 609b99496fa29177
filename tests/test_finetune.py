"""Fine-tuning a classifier from an export through the one training loop
(config.task='classify', configs/finetune_cls.py), and the train-time filters.

One tiny pretraining run on a data=8 mesh is exported once for the module; it
is fine-tuned on a (2, 2, 2) mesh, interrupted and resumed.
"""
import json
import os
import types

import jax
import numpy as np
import pytest

from conftest import tiny_config
from flax import linen as nn

from m5p import evaluate as evaluate_lib
from m5p import export, sharding, state as state_lib, train
from m5p.config_loader import load_config
from m5p.data import convert, pipeline
from m5p.evaluation import classification as classification_lib
from m5p.models import classifier
from m5p.models.scale import init_batch


@pytest.fixture(scope="module")
def pretrained(tiny_dataset, tmp_path_factory):
  """2 steps of test_training's data=8 run (the same compiled step: a compile-cache
  hit), stopped before its final evaluation, and its params export."""
  root = tmp_path_factory.mktemp("finetune")
  c = tiny_config(total_steps=3)
  c.mesh.update(dict(data=8, fsdp=1, model=1, num_devices=-1))
  c.data.dir = tiny_dataset
  workdir, export_dir = str(root / "pretrain"), str(root / "export")
  train.train_and_evaluate(c, workdir, tiny_dataset, stop_after=2)
  export.export(workdir, export_dir, splits=[], serving=False, log=lambda *a: None)
  return types.SimpleNamespace(config=c, export_dir=export_dir, data=tiny_dataset, root=root)


def _finetune_config(pretrained, **mesh):
  c = load_config("finetune_cls:tiny")
  c.init_from = pretrained.export_dir
  c.data.dir = pretrained.data
  c.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=-1))
  c.mesh.update(mesh)
  return c


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _restored_params(workdir, step):
  """The params of `workdir`'s checkpoint `step` (the classifier's tree), on the host."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return _host(state["params"])


def test_finetune_from_export_on_another_mesh_then_resume(pretrained, tmp_path, caplog):
  c = _finetune_config(pretrained, data=2, fsdp=2, model=2)
  c.classify.freeze_backbone_steps = 2  # Head-only for steps 1-2: the backbone stays the export's.
  workdir = str(tmp_path / "cls")
  reference = _host(export.load_params(pretrained.export_dir, mesh=sharding.make_mesh(
      pretrained.config.mesh))[0])

  caplog.set_level("INFO", logger="m5p")
  assert train.train_and_evaluate(c, workdir, pretrained.data, stop_after=2) == {}
  assert "Initialised the backbone from the export" in caplog.text
  at2 = _restored_params(workdir, 2)
  for a, b in zip(jax.tree.leaves(at2[classifier.BACKBONE]), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)  # Loaded, onto (2, 2, 2), and frozen.
  assert jax.tree.structure(at2[classifier.BACKBONE]) == jax.tree.structure(reference)

  caplog.clear()
  results = train.train_and_evaluate(c, workdir, pretrained.data)  # Resumes at 3.
  assert "Resumed from step 2" in caplog.text and "Initialised" not in caplog.text
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in rows)
  at4 = _restored_params(workdir, 4)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at4[classifier.BACKBONE]),
                                                      jax.tree.leaves(reference)))

  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  assert saved["meta"]["step"] == 4
  manifest = convert.load_manifest(pretrained.data)
  n_test = len(set(manifest["splits_files"]["cls_test"]))
  for name in ("classification", "classification_random", "classification_majority"):
    assert set(saved[name]) >= {"top1", "top5", "macro_f1", "num_test", "num_classes"}
    assert 0 <= saved[name]["top1"] <= saved[name]["top5"] <= 100
    assert saved[name]["num_test"] == n_test  # The probe's cls_test items.
    assert saved[name]["num_classes"] == manifest["num_categories"]
  assert saved["classification"] == pytest.approx(results["classification"])

  # The fine-tuned run, re-scored from its checkpoint as `python -m m5p.evaluate` does, and
  # exported: its fine-tuned backbone, under a pretraining config.
  again = evaluate_lib.evaluate(workdir, report=False)
  for name in ("classification", "classification_random", "classification_majority"):
    assert again[name] == pytest.approx(saved[name]), name
  export_dir = str(tmp_path / "cls_export")
  export.export(workdir, export_dir, splits=[], serving=False, log=lambda *a: None)
  exported, exported_config = export.load_params(export_dir, mesh=sharding.make_mesh(c.mesh))
  assert exported_config.task == "pretrain" and not exported_config.init_from
  assert jax.tree.structure(_host(exported)) == jax.tree.structure(at4[classifier.BACKBONE])
  for a, b in zip(jax.tree.leaves(_host(exported)), jax.tree.leaves(at4[classifier.BACKBONE])):
    np.testing.assert_array_equal(a, b)


def test_export_of_another_shape_is_refused(pretrained):
  c = _finetune_config(pretrained, num_devices=1)
  c.model.width = 16
  model = train.make_model(c, pretrained.data)
  shapes = jax.eval_shape(lambda rng: model.init({"params": rng, "dropout": rng},
                                                 init_batch(c, 1), train=False)["params"],
                          jax.random.key(0))  # Refused before any array is made or read.
  target = classifier.backbone_params(nn.meta.unbox(shapes))
  with pytest.raises(ValueError, match=r"differs in shape.*model\.width: 32 \(export\) vs 16"):
    state_lib.load_export_params(pretrained.export_dir, target, None, c)


def test_train_filters_pick_the_listed_and_complete_records(pretrained):
  c = tiny_config()
  data = pretrained.data
  listed = set(convert.load_manifest(data)["splits_files"]["cls_train"])
  source = convert.open_split(data, "train")
  ids = [source[i]["item_id"].decode() for i in range(len(source))]
  rows, labels = pipeline.record_selection(c, data, "train", "cls_train")
  assert [ids[r] for r in rows] == [i for i in ids if i in listed]
  assert labels.tolist() == [int(source[int(r)]["label"]) for r in rows]

  c.data.train_complete_only = True
  c.data.train_list = "cls_train"
  it = iter(pipeline.train_dataset(c, data))
  seen = np.concatenate([next(it)["index"] for _ in range(3)])
  complete, _ = pipeline.record_selection(c, data, "train", "cls_train", complete_only=True)
  assert 0 < len(complete) < len(rows) and set(seen) <= set(complete.tolist())
  assert next(it)["present"].all()
  with pytest.raises(ValueError, match="no id list 'nope'"):
    pipeline.record_selection(c, data, "train", "nope")


def test_classify_batches_are_unmasked(pretrained):
  c = _finetune_config(pretrained)
  batch = next(iter(pipeline.train_dataset(c, pretrained.data)))
  for name in ("text_lm_weights", "table_lm_weights", "image_zero", "video_zero", "audio_zero"):
    assert not batch[name].any(), name
  assert (batch["text_ids"] != 4).all()  # No [MASK] token.


def test_classification_metrics_and_floors():
  emb = {"item_id": np.array([b"a", b"b", b"c", b"d"], object), "label": np.array([0, 1, 2, -1]),
         "logits": np.array([[3.0, 1, 0], [0, 1, 3], [0, 0, 1], [1, 0, 0]])}
  scores = classification_lib.scores_metrics(emb["logits"][:3], emb["label"][:3], np.array([0, 0, 1]))
  assert scores["top1"] == pytest.approx(2 / 3) and scores["unseen_test"] == 1
  assert scores["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
