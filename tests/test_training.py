"""Training end to end on a tiny synthetic set: meshes agree, loss falls, resume is exact."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from m5p import train


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


MESHES = {"data8": dict(data=8), "2x2x2": dict(data=2, fsdp=2, model=2),
          "one_device": dict(data=1, num_devices=1)}


@pytest.fixture(scope="module")
def mesh_runs(tiny_dataset, tmp_path_factory):
  runs = {}
  for name, mesh in MESHES.items():
    c = tiny_config(total_steps=3)
    c.mesh.update(dict(data=-1, fsdp=1, model=1, num_devices=-1))
    c.mesh.update(mesh)
    workdir = str(tmp_path_factory.mktemp(name))
    results = train.train_and_evaluate(c, workdir, tiny_dataset)
    runs[name] = (workdir, results)
  return runs


def test_losses_equal_across_meshes(mesh_runs):
  ref = _losses(mesh_runs["one_device"][0])
  assert sorted(ref) == [1, 2, 3]
  for name in ("data8", "2x2x2"):
    got = _losses(mesh_runs[name][0])
    for step, loss in ref.items():
      assert abs(got[step] - loss) / abs(loss) < 1e-4, (name, step, got[step], loss)


def test_eval_json_written_with_random_baseline(mesh_runs):
  workdir, results = mesh_runs["data8"]
  with open(os.path.join(workdir, "eval.json")) as f:
    saved = json.load(f)
  for task in ("coarse_retrieval", "coarse_retrieval_random"):
    assert set(saved[task]) >= {"mAP@1", "mAP@5", "mAP@10", "Prec@5", "Prec@10"}
    assert saved[task] == pytest.approx(results[task])


def test_resume_after_checkpoint_gives_the_same_losses(tiny_dataset, tmp_path):
  c = tiny_config(total_steps=6, ckpt_every=100)
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(c, straight, tiny_dataset)
  # Interrupted after step 3 (checkpointed), then rerun to 6 on the same workdir.
  interrupted = str(tmp_path / "interrupted")
  assert train.train_and_evaluate(c, interrupted, tiny_dataset, stop_after=3) == {}
  train.train_and_evaluate(c, interrupted, tiny_dataset)
  a, b = _losses(straight), _losses(interrupted)
  for step in (4, 5, 6):
    assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_short_training_lowers_the_loss(tiny_dataset, tmp_path):
  c = tiny_config(total_steps=40, log_every=10, ckpt_every=1000)
  train.train_and_evaluate(c, str(tmp_path), tiny_dataset)
  losses = _losses(str(tmp_path))
  assert losses[40] < 0.85 * losses[10], losses
