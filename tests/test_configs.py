"""Every config in configs/ builds and takes a train step (tensor-parallel mesh, tiny batch).

Fine-tuning configs (task='classify', e.g. finetune_cls.py) step from random
init here (their `init_from` is empty by default: the export is given on the
command line), on one device: their backbone is another config's, stepped on
the tensor-parallel mesh here, and the classifier on a (2, 2, 2) mesh from an
export is tests/test_finetune.py's.
"""
import glob
import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from m5p import optim, sharding, state as state_lib
from m5p.config_loader import REPO_CONFIGS, load_config
from m5p.data import batch_spec
from m5p.train import jit_train_step, make_model

CONFIGS = sorted(glob.glob(os.path.join(REPO_CONFIGS, "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_builds_and_steps(path):
  config = load_config(path)
  big = config.model.width >= 512
  classify = config.get("task", "pretrain") == "classify"
  if classify:
    assert not config.init_from, "a config in configs/ must not need an export to build"
    config.classify.num_classes = config.classify.num_classes or 10  # random_batch's labels 0..9.
  # Paper-sized configs step on one device at batch 1, at their widths, vocabularies and
  # input shapes but one block per stack (each full-depth step costs ~2 min of a
  # 2-core CPU; tools/benchmark.py runs them whole); small ones on a data x
  # tensor-parallel mesh.
  if big:
    for stack in ("text_layers", "image_layers", "video_layers", "audio_layers", "fusion_layers"):
      config.model[stack] = 1
  one_device = big or classify
  config.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1) if one_device else
                     dict(data=2, fsdp=1, model=4, num_devices=-1))
  config.batch_size = 1 if big else 2
  mesh = sharding.make_mesh(config.mesh)
  model = make_model(config)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_shard)
           for k, v in batch_spec.random_batch(config, config.batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    step = jit_train_step(model, tx, schedule, config, shardings, mesh)
    new_state, metrics = step(state, batch)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  if not one_device:  # Tensor parallelism took effect: some parameter is split over the model axis.
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any("model" in str(spec) for spec in specs)
