"""Every config in configs/ builds and takes a train step (tensor-parallel mesh, tiny batch)."""
import glob
import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from m5p import optim, sharding, state as state_lib
from m5p.config_loader import REPO_CONFIGS, load_config
from m5p.data import batch_spec
from m5p.models.scale import ScaleModel
from m5p.train import make_train_step

CONFIGS = sorted(glob.glob(os.path.join(REPO_CONFIGS, "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_builds_and_steps(path):
  config = load_config(path)
  big = config.model.width >= 512
  # Paper-sized configs step on one device at batch 1 (a 2-core CPU takes ~2 min);
  # small ones on a data x tensor-parallel mesh.
  config.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=1) if big else
                     dict(data=2, fsdp=1, model=4, num_devices=-1))
  config.batch_size = 1 if big else 2
  mesh = sharding.make_mesh(config.mesh)
  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_shard)
           for k, v in batch_spec.random_batch(config, config.batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    step = jax.jit(make_train_step(model, tx, schedule, config), in_shardings=(shardings, batch_shard),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    new_state, metrics = step(state, batch)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
  if not big:  # Tensor parallelism took effect: some parameter is split over the model axis.
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any("model" in str(spec) for spec in specs)
