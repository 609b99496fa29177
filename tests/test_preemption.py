"""Acceptance: a run killed (SIGKILL after a checkpoint) or stopped (SIGTERM, with Grain
workers) and restarted logs the same losses, bit for bit, each step once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from m5p import drills, failures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def _cli(workdir, data_dir, *extra):
  return [sys.executable, "-m", "m5p.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
          f"--config.data.dir={data_dir}", f"--config.total_steps={STEPS}", "--config.ckpt_every=2",
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.model=2", *extra]


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


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
  """The uninterrupted run, started at once and waited for when its losses are needed:
  it runs beside the runs to be killed (they share the cores; no loss depends on timing)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = subprocess.Popen(_cli(workdir, tiny_dataset), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def losses():
    assert proc.wait(timeout=600) == 0
    return _losses(workdir)

  yield losses
  proc.kill()  # A no-op once it has exited.


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_restart_gives_the_same_losses(reference, tiny_dataset,
                                                                      tmp_path):
  killed = str(tmp_path / "killed")
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
  a, b = reference(), _losses(killed)
  for step in range(3, 7):
    assert b[step] == a[step], (step, a, b)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_stops_the_workers_and_resumes_exactly(reference, tiny_dataset,
                                                                            tmp_path):
  """SIGTERM mid-run with 2 Grain worker processes: exit 75 after checkpointing the step in
  flight, no traceback, nothing of the run left alive; the restart's losses equal the
  uninterrupted run's (0 workers) bit for bit and metrics.jsonl holds each step once."""
  w = str(tmp_path / "terminated")
  os.makedirs(w)
  out = open(os.path.join(w, "out.txt"), "w")
  proc = subprocess.Popen(_cli(w, tiny_dataset, "--config.data.worker_count=2"), cwd=ROOT,
                          env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  assert drills.wait_for(lambda: drills.last_step(w) >= 2, proc, timeout=600)
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=300)
  out.close()
  text = open(os.path.join(w, "out.txt")).read()
  stopped = drills.last_step(w)
  time.sleep(0.5)
  assert code == failures.EXIT_PREEMPTED, text[-3000:]
  assert "SIGTERM received" in text and "Traceback" not in text, text[-3000:]
  assert drills.session_processes(proc.pid) == []
  assert stopped < STEPS and stopped in drills.checkpoint_steps(w)
  subprocess.run(_cli(w, tiny_dataset, "--config.data.worker_count=2"), cwd=ROOT, env=_env(),
                 check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
  steps, got = drills.rows(w)
  assert steps == list(range(1, STEPS + 1))
  assert got == reference()
