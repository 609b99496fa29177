"""Acceptance: a run SIGKILLed after a checkpoint and restarted logs the same losses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, data_dir, steps=6):
  return [sys.executable, "-m", "m5p.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
          f"--config.data.dir={data_dir}", f"--config.total_steps={steps}", "--config.ckpt_every=2",
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.model=2"]


def _env():
  # The persistent compilation cache makes the second and third runs skip compiling.
  cache = os.environ.get("M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax"))
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_restart_gives_the_same_losses(tiny_dataset, tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  # The uninterrupted reference runs beside the run to be killed (the two
  # share the cores; neither's losses depend on timing).
  reference = subprocess.Popen(_cli(straight, tiny_dataset), cwd=ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    proc = subprocess.Popen(_cli(killed, tiny_dataset), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoints", "2")
    deadline = time.time() + 600
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ckpt), "the run never wrote its step-2 checkpoint"
    done_before_kill = max(_losses(killed))
    assert done_before_kill < 6, "the run finished before it could be killed"

    subprocess.run(_cli(killed, tiny_dataset), cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert reference.wait(timeout=600) == 0
  finally:
    reference.kill()  # A no-op once it has exited.
  a, b = _losses(straight), _losses(killed)
  for step in range(3, 7):
    assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
