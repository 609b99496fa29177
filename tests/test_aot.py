"""Ahead-of-time TPU compiles on this CPU (m5p.aot, tools/aot_compile.py):
the tiny config's real train step for a 4-chip v5e slice."""
import os
import subprocess
import sys

import jax
import pytest

from conftest import tiny_config
from m5p import aot, flops, optim, sharding, train
from m5p import state as state_lib
from m5p.data import batch_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
  # Width 256 and head_dim 128: a TPU pads each array's minor dims to (8, 128)
  # tiles, so at the tiny config's width 32 padding, not sharding, would set
  # the per-chip bytes.
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.model": 1, "mesh.num_devices": -1,
                     "model.width": 256, "model.heads": 2})
  return c, aot.compile_report(c, "v5e:2x2")


def test_report_has_per_chip_memory_flops_and_collectives(report):
  c, r = report
  assert r["chips"] == 4 and r["device_kind"].startswith("TPU v5 lite")
  assert r["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
  b = r["bytes_per_chip"]
  assert r["hbm_bytes"] == 16 * aot.GIB and 0 < b["total"] < r["hbm_bytes"] and b["temp"] > 0
  # FSDP over 4 chips: each holds about a quarter of the params and AdamW moments.
  model = train.make_model(c)
  tx, _ = optim.make_optimizer(c)
  state = jax.eval_shape(state_lib.init_state_fn(model, tx, c), jax.random.key(0))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert state_bytes / 8 < b["argument"] < state_bytes / 2, (b["argument"], state_bytes)
  # The step's FLOPs per chip: a quarter of the same step's on one CPU device (the
  # TPU program runs the standard kernels, the CPU one the CPU kernels: a few % apart).
  cpu_config = tiny_config(**{"mesh.data": 1, "mesh.num_devices": 1, "model.width": 256,
                              "model.heads": 2})
  mesh = sharding.make_mesh(cpu_config.mesh)
  cpu_state, shardings = state_lib.create_sharded_state(model, tx, cpu_config, mesh)
  batch = jax.device_put(batch_spec.random_batch(c, c.batch_size), sharding.batch_sharding(mesh))
  step = train.jit_train_step(model, tx, optim.make_optimizer(c)[1], cpu_config, shardings, mesh)
  cpu_flops = flops.compiled_flops(step.lower(cpu_state, batch).compile())
  assert r["flops_per_chip"] == pytest.approx(cpu_flops / 4, rel=0.25)
  assert r["roofline_seconds"] > 0 and 0 < r["mfu_estimate_roofline"] <= 1
  # Parameters are gathered for the forward and backward passes.
  assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["all-gather"]["bytes"] > 0
  text = aot.format_report(r)
  for field in ("per chip: arguments", "of 16 GiB HBM", "FLOPs per step per chip", "roofline",
                "all-gather", "reduce-scatter", "all-reduce", "all-to-all"):
    assert field in text, field


def test_collective_stats_count_loop_bodies_per_trip():
  hlo = """HloModule m

%body (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[8]{0} all-gather(%p), dimensions={0}
}

%cond (p: f32[4]) -> pred[] {
  %p = f32[4]{0} parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %ar = f32[4]{0} all-reduce(%x), to_apply=%cond
  ROOT %w = f32[4]{0} while(%ar), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
}
"""
  stats = aot.collective_stats(hlo)
  assert stats["all-gather"] == {"count": 6, "bytes": 6 * 32}
  assert stats["all-reduce"] == {"count": 1, "bytes": 16}


def test_cli_refuses_an_unknown_topology_in_one_line():
  out = subprocess.run([sys.executable, "tools/aot_compile.py", "--config=configs/demo.py:tiny",
                        "--topology=v99:1x1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "v99:1x1" in out.stderr and "Traceback" not in out.stderr
