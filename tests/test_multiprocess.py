"""Two real JAX processes (CPU collectives over loopback) train like one process."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _cli(workdir, data_dir):
  return [sys.executable, "-m", "m5p.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
          f"--config.data.dir={data_dir}", f"--config.total_steps={STEPS}", "--config.log_every=1",
          "--config.ckpt_every=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
          "--config.mesh.model=1", "--config.mesh.num_devices=4"]


def _env(devices, **extra):
  """Every process alike: CPU, the tests' compilation cache, and XLA's cheapest
  backend passes. Process 1 of a multi-process run never hits the persistent
  cache (only process 0 writes it, under its own key), so it compiles each
  program afresh; the comparison does not depend on the optimisation level."""
  cache = os.environ.get("M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax"))
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"),
              **extra)


def _logged_peak_gflops(log_path):
  """The 'Peak per device' the trainer logged (MFU's denominator)."""
  with open(log_path) as f:
    return float(re.search(r"Peak per device: ([\d.]+) GFLOP/s", f.read()).group(1))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_match_one(tiny_dataset, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  subprocess.run(_cli(one, tiny_dataset), cwd=ROOT, env=_env(4), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    log = open(tmp_path / f"process{pid}.out", "w")
    logs.append(log)
    env = _env(2, M5P_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", M5P_NUM_PROCESSES="2",
               M5P_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(_cli(two, tiny_dataset), cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
    for log in logs:
      log.close()
  out = (tmp_path / "process1.out").read_text()[-3000:]
  assert codes == [0, 0], out
  assert "Process 1 of 2 (explicit cluster)" in open(os.path.join(two, "train.process1.log")).read()
  for log_name in ("train.log", "train.process1.log"):  # Each measured on a device of its own.
    assert 0 < _logged_peak_gflops(os.path.join(two, log_name)) < 1e4, log_name
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    for key in ("loss", "contrastive", "grad_norm"):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
  assert os.path.isdir(os.path.join(two, "checkpoints", str(STEPS)))
  ea = json.load(open(os.path.join(one, "eval.json")))
  eb = json.load(open(os.path.join(two, "eval.json")))
  assert eb["coarse_retrieval"]["num_queries"] == ea["coarse_retrieval"]["num_queries"]
  assert eb["coarse_retrieval"]["mAP@1"] == pytest.approx(ea["coarse_retrieval"]["mAP@1"], abs=1e-4)
