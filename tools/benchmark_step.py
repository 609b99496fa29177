"""Prints the train-step time, throughput and MFU of a config on random batches (no input pipeline).

python tools/benchmark_step.py --config=configs/scale_base.py --batch_size=2 --steps=3

MFU = model FLOP/s (XLA cost analysis of the compiled step) / the peak: on CPU
the rate of a large jitted fp32 matmul measured in the same run (the whole
machine's, since emulated CPU devices share its cores); on accelerators that
rate times the number of devices.
"""
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.", lock_config=True)
flags.DEFINE_integer("batch_size", None, "Override the global batch size.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one compile + warm-up step).")


def main(argv):
  del argv
  import jax
  import numpy as np
  from flax import linen as nn

  from m5p import flops, optim, sharding, state as state_lib
  from m5p.data import batch_spec
  from m5p.models.scale import ScaleModel
  from m5p.train import make_train_step

  config = FLAGS.config
  if FLAGS.batch_size:
    config.batch_size = FLAGS.batch_size
  mesh = sharding.make_mesh(config.mesh)
  peak = flops.measure_matmul_peak()
  print(f"devices: {mesh.size} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
  print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s per device")

  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  t0 = time.perf_counter()
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  print(f"parameters: {state_lib.num_params(state.params) / 1e6:.1f}M (init {time.perf_counter() - t0:.1f}s)")
  batch_shard = sharding.batch_sharding(mesh)
  batch = batch_spec.random_batch(config, config.batch_size)
  batch = {k: jax.device_put(v, batch_shard) for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    step = jax.jit(make_train_step(model, tx, schedule, config), in_shardings=(shardings, batch_shard),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    print(f"compile: {time.perf_counter() - t0:.1f}s")
    # The compiled SPMD program is one device's share: total = that x devices.
    step_flops = flops.compiled_flops(compiled) * mesh.size
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(FLAGS.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  t = float(np.median(times))
  achieved = step_flops / t
  # Emulated CPU devices share the machine's cores: the measured peak is the whole machine's.
  total_peak = peak if jax.devices()[0].platform == "cpu" else peak * mesh.size
  print(f"step time: {t * 1e3:.1f} ms (median of {len(times)}), {config.batch_size / t:.1f} examples/s, "
        f"loss {float(m['loss']):.4f}")
  print(f"model FLOPs/step: {step_flops / 1e12:.3f} TFLOP; achieved {achieved / 1e9:.1f} GFLOP/s "
        f"= {achieved / mesh.size / 1e9:.1f} per device; MFU {100 * achieved / total_peak:.1f}%")


if __name__ == "__main__":
  app.run(main)
