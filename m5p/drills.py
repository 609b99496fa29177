"""Fault drills (issue 16): each one runs the real CLI on the tiny config, does to it what
a pod, a disk, a scheduler or a hostile input does, and compares what happens with what
the README's "Reliability" section promises.

`tools/drills.py` prints them as a table; tests/test_drills.py runs the fast ones.
A `Lab` holds what drills share: a work folder, a tiny synthetic dataset, a persistent
compilation cache and the losses of uninterrupted reference runs. Every run is a
subprocess (`python -m m5p.main`) on one CPU device, as a new user would run it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

from m5p.config_loader import REPO_CONFIGS

TINY = os.path.join(REPO_CONFIGS, "demo.py") + ":tiny"
NO_EFFECT_ON_LOSSES = ("--config.data.worker_count=", "--config.async_checkpointing=")
EXIT_PREEMPTED, EXIT_USER_ERROR, EXIT_DIVERGED = 75, 2, 3


@dataclasses.dataclass
class Result:
  name: str
  expected: str
  observed: str
  holds: bool
  seconds: float = 0.0


@dataclasses.dataclass
class Run:
  code: int
  out: str
  err: str
  seconds: float


class Lab:
  """Shared state of a drill session, under `root`."""

  def __init__(self, root: str, cache_dir: str | None = None, log: Callable[[str], None] = print):
    self.root = os.path.abspath(root)
    os.makedirs(self.root, exist_ok=True)
    self.cache_dir = cache_dir or os.path.join(self.root, "jax_cache")
    self.log = log
    self._data: str | None = None
    self._references: dict[tuple, dict[int, float]] = {}
    self._count = 0

  # -- Environment ------------------------------------------------------------------

  def env(self, devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=self.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env

  def workdir(self, name: str) -> str:
    self._count += 1
    path = os.path.join(self.root, f"{self._count:02d}_{name}")
    shutil.rmtree(path, ignore_errors=True)
    return path

  @property
  def data_dir(self) -> str:
    """A tiny synthetic M5Product, converted once per lab (about 10 s)."""
    if self._data is None:
      data = os.path.join(self.root, "data")
      if not os.path.exists(os.path.join(data, "manifest.json")):
        self.log(f"[lab] making the tiny dataset in {data}")
        code = subprocess.run(
            [sys.executable, "-m", "m5p.drills", "make_data", os.path.join(self.root, "raw"), data],
            env=self.env(), capture_output=True, text=True, check=False)
        if code.returncode:
          raise RuntimeError(f"making the drills' dataset failed: {code.stderr[-2000:]}")
      self._data = data
    return self._data

  # -- Runs -------------------------------------------------------------------------------

  def cli(self, workdir: str, *overrides: str, data: bool = True) -> list[str]:
    """The CLI on the lab's dataset (`data=False`: named but not made, for runs refused first)."""
    data_dir = self.data_dir if data else os.path.join(self.root, "data")
    return [sys.executable, "-m", "m5p.main", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", *overrides]

  def run(self, workdir: str, *overrides: str, timeout: float = 600, devices: int = 1,
          argv: list[str] | None = None, data: bool = True) -> Run:
    t0 = time.time()
    p = subprocess.run(argv or self.cli(workdir, *overrides, data=data), env=self.env(devices),
                       capture_output=True, text=True, timeout=timeout, check=False)
    self._count += 1
    with open(os.path.join(self.root, f"{self._count:02d}_run.log"), "w", encoding="utf-8") as f:
      f.write(f"{' '.join(p.args)}\nexit {p.returncode}\n--- stdout\n{p.stdout}\n"
              f"--- stderr\n{p.stderr}")
    return Run(p.returncode, p.stdout, p.stderr, time.time() - t0)

  def start(self, workdir: str, *overrides: str, devices: int = 1, **env: str) -> subprocess.Popen:
    """A run in its own session (so that what it leaves behind can be found)."""
    os.makedirs(workdir, exist_ok=True)
    return subprocess.Popen(self.cli(workdir, *overrides), env=self.env(devices, **env),
                            stdout=open(os.path.join(workdir, "stdout.txt"), "w"),
                            stderr=open(os.path.join(workdir, "stderr.txt"), "w"),
                            start_new_session=True)

  def reference(self, *overrides: str) -> dict[int, float]:
    """Losses of an uninterrupted run with these overrides (run once per lab), less
    those that must not change a loss (Grain workers, async saves): the drills then
    also check that they do not."""
    overrides = tuple(o for o in overrides if not o.startswith(NO_EFFECT_ON_LOSSES))
    key = tuple(sorted(overrides))
    if key not in self._references:
      w = self.workdir("reference")
      r = self.run(w, *overrides)
      if r.code != 0:
        raise RuntimeError(f"reference run failed ({r.code}): {r.err[-2000:]}")
      self._references[key] = rows(w)[1]
    return self._references[key]


# ---------------------------------------------------------------------------
# Reading what a run left.


def rows(workdir: str) -> tuple[list[int], dict[int, float]]:
  """(steps in file order, {step: loss}) of workdir/metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  steps, losses = [], {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        steps.append(int(row["step"]))
        losses[int(row["step"])] = row["loss"]
  return steps, losses


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_folders(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def same_losses(got: dict[int, float], want: dict[int, float], steps) -> tuple[bool, str]:
  bad = [s for s in steps if got.get(s) != want.get(s)]
  if bad:
    s = bad[0]
    return False, f"{len(bad)} steps differ (step {s}: {got.get(s)} vs {want.get(s)})"
  return True, f"steps {min(steps)}-{max(steps)} equal bit for bit"


def session_processes(sid: int) -> list[str]:
  """'pid command' of live processes of session `sid` (Linux /proc)."""
  out = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      if int(fields[3]) == sid and fields[0] != "Z":
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          command = f.read().replace(b"\0", b" ").decode(errors="replace")
        out.append(f"{pid} {command[:80]}")
    except (OSError, IndexError, ValueError):
      continue
  return out


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen | None = None,
             timeout: float = 300, poll: float = 0.02) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return predicate()
    time.sleep(poll)
  return False


def last_step(workdir: str) -> int:
  steps, _ = rows(workdir)
  return max(steps) if steps else 0


def has_traceback(*texts: str) -> bool:
  return any("Traceback (most recent call last)" in t for t in texts)


_CHATTER = re.compile(r"^[WI]\d{4} |^WARNING:absl:")


def stderr_lines(text: str) -> list[str]:
  """stderr without libraries' warnings and info lines (absl's 'W1204 16:01:02 ...')."""
  return [l for l in text.splitlines() if l.strip() and not _CHATTER.match(l)]


# ---------------------------------------------------------------------------
# Preemption.

STEPS, EVERY = 30, 10
BASE = (f"--config.total_steps={STEPS}", f"--config.ckpt_every={EVERY}", "--config.log_every=1")


def _signal_drill(lab: Lab, name: str, sig: signal.Signals, at_step: int, *extra: str,
                  check_session: bool = False) -> Result:
  want = lab.reference(*BASE, *extra)
  w = lab.workdir(name)
  proc = lab.start(w, *BASE, *extra)
  reached = wait_for(lambda: last_step(w) >= at_step, proc)
  t_signal = time.time()
  proc.send_signal(sig)
  code = proc.wait(timeout=300)
  exit_s = time.time() - t_signal
  time.sleep(0.5)
  left = session_processes(proc.pid) if check_session else []
  err = open(os.path.join(w, "stderr.txt")).read()
  out = open(os.path.join(w, "stdout.txt")).read()
  stop = last_step(w)
  saved = checkpoint_steps(w)
  resumed = lab.run(w, *BASE, *extra)
  steps, got = rows(w)
  equal, how = same_losses(got, want, range(1, STEPS + 1))
  once = steps == list(range(1, STEPS + 1))
  holds = (reached and code == EXIT_PREEMPTED and stop in saved and stop < STEPS and
           not has_traceback(out, err) and f"{sig.name} received" in out and resumed.code == 0
           and equal and once and not left and exit_s < 60)
  observed = (f"exit {code} {exit_s:.1f} s after the signal at step ~{at_step}; checkpoint "
              f"{stop} {'saved' if stop in saved else 'MISSING'}; "
              f"{'a traceback' if has_traceback(out, err) else 'no traceback'}; resume exit "
              f"{resumed.code}: {how}; metrics.jsonl {'each step once' if once else steps}"
              + (f"; processes left: {left or 'none'}" if check_session else ""))
  return Result(name, "", observed, holds)


def drill_sigterm(lab: Lab) -> Result:
  r = _signal_drill(lab, "sigterm", signal.SIGTERM, 13)
  r.name = "SIGTERM between checkpoints"
  r.expected = ("exit 75 within seconds, step in flight checkpointed; resume equals an "
                "uninterrupted run bit for bit; metrics.jsonl holds each step once")
  return r


def drill_sigint_workers(lab: Lab) -> Result:
  r = _signal_drill(lab, "sigint_workers", signal.SIGINT, 13, "--config.data.worker_count=2",
                    check_session=True)
  r.name = "SIGINT with 2 Grain workers"
  r.expected = "as SIGTERM, no traceback, no process of the run left (workers stopped)"
  return r


def drill_sigterm_async_save(lab: Lab) -> Result:
  extra = ("--config.async_checkpointing=true",)
  want = lab.reference(*BASE, *extra)
  w = lab.workdir("sigterm_async_save")
  proc = lab.start(w, *BASE, *extra)
  during = wait_for(lambda: bool(tmp_folders(w)), proc, poll=0.002)
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=300)
  leftover = tmp_folders(w)
  saved = checkpoint_steps(w)
  resumed = lab.run(w, *BASE, *extra)
  steps, got = rows(w)
  equal, how = same_losses(got, want, range(1, STEPS + 1))
  holds = (code == EXIT_PREEMPTED and not leftover and during and resumed.code == 0 and equal
           and steps == list(range(1, STEPS + 1)))
  return Result("SIGTERM during an async save",
                "the save in flight completes, the stop step is saved too, exit 75, no tmp "
                "folder; resume equal",
                f"signal {'during' if during else 'NOT during'} a save; exit {code}; checkpoints "
                f"{saved}; tmp folders left: {len(leftover)}; resume exit {resumed.code}: {how}",
                holds)


def drill_sigkill_async_save(lab: Lab) -> Result:
  extra = ("--config.async_checkpointing=true",)
  want = lab.reference(*BASE, *extra)
  w = lab.workdir("sigkill_async_save")
  proc = lab.start(w, *BASE, *extra)
  during = wait_for(lambda: bool(tmp_folders(w)), proc, poll=0.002)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  leftover = [os.path.basename(p) for p in tmp_folders(w)]
  resumed = lab.run(w, *BASE, *extra)
  steps, got = rows(w)
  equal, how = same_losses(got, want, range(1, STEPS + 1))
  reported = any(f"Removing an unfinished checkpoint save of step {n.split('.')[0]}" in resumed.out
                 for n in leftover)
  holds = (bool(leftover) and reported and not tmp_folders(w) and resumed.code == 0 and equal
           and steps == list(range(1, STEPS + 1)))
  return Result("SIGKILL during an async save, restart",
                "the half-written save is reported by step and removed; resume from the "
                "previous checkpoint equals an uninterrupted run",
                f"killed {'during' if during else 'NOT during'} a save, left {leftover}; "
                f"restart {'reported' if reported else 'did NOT report'} it, exit {resumed.code}: "
                f"{how}; tmp left after: {len(tmp_folders(w))}", holds)


def drill_two_processes(lab: Lab) -> Result:
  """SIGTERM to process 1 only of a 2-process run: both stop after the same step."""
  extra = ("--config.mesh.num_devices=2",)
  w_ref, w = lab.workdir("two_process_reference"), lab.workdir("two_process_sigterm")

  def launch(workdir: str, port: int) -> list[subprocess.Popen]:
    os.makedirs(workdir, exist_ok=True)
    procs = []
    for pid in range(2):
      # XLA's cheapest passes: process 1 never hits the persistent cache (only process 0
      # writes it), so each launch compiles afresh (as tests/test_multiprocess.py does).
      env = lab.env(1, M5P_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", M5P_NUM_PROCESSES="2",
                    M5P_PROCESS_ID=str(pid),
                    XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
      procs.append(subprocess.Popen(lab.cli(workdir, *BASE, *extra), env=env,
                                    stdout=open(os.path.join(workdir, f"out{pid}.txt"), "a"),
                                    stderr=subprocess.STDOUT, start_new_session=True))
    return procs

  ref = launch(w_ref, free_port())
  ref_codes = [p.wait(timeout=900) for p in ref]
  want = rows(w_ref)[1]
  procs = launch(w, free_port())
  wait_for(lambda: last_step(w) >= 13, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=600) for p in procs]
  stop = last_step(w)
  saved = checkpoint_steps(w)
  iter_files = sorted(os.listdir(os.path.join(w, "checkpoints", str(stop), "data_iter"))) \
      if stop in saved else []
  resumed = launch(w, free_port())
  resumed_codes = [p.wait(timeout=900) for p in resumed]
  steps, got = rows(w)
  equal, how = same_losses(got, want, range(1, STEPS + 1))
  holds = (ref_codes == [0, 0] and codes == [EXIT_PREEMPTED] * 2 and stop in saved
           and len([f for f in iter_files if f.startswith("process_")]) == 2
           and resumed_codes == [0, 0] and equal and steps == list(range(1, STEPS + 1)))
  return Result("SIGTERM to one process of a 2-process run",
                "both processes checkpoint the same step (JAX preemption sync point) and exit "
                "75; the resumed 2-process run equals an uninterrupted one",
                f"exits {codes}; step {stop} saved with {len(iter_files)} iterator files; "
                f"resume exits {resumed_codes}: {how}", holds)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------
# Damaged checkpoints.

DAMAGE_BASE = ("--config.total_steps=6", "--config.ckpt_every=2", "--config.keep_checkpoints=3")


def _data_files(step_dir: str) -> list[str]:
  found = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  return sorted(found, key=os.path.getsize)


def damage(step_dir: str, kind: str) -> None:
  """Breaks a checkpoint folder the way a full disk, a bad copy or a crash would."""
  if kind in ("truncated data file", "zeroed data file", "deleted data file",
              "4 KiB of random bytes in a data file"):
    path = _data_files(step_dir)[-1]
    size = os.path.getsize(path)
    if kind == "truncated data file":
      os.truncate(path, size // 2)
    elif kind == "zeroed data file":
      with open(path, "r+b") as f:
        f.write(b"\0" * size)
    elif kind == "deleted data file":
      os.remove(path)
    else:
      with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(random.Random(0).randbytes(min(4096, size - size // 3)))
  elif kind == "empty step folder":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
  elif kind == "missing _METADATA":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "missing manifest.ocdbt":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  elif kind == "missing meta/":
    shutil.rmtree(os.path.join(step_dir, "meta"))
  elif kind == "missing data-iterator file":
    for path in glob.glob(os.path.join(step_dir, "data_iter", "process_*")):
      os.remove(path)
  else:
    raise ValueError(kind)


DAMAGE_KINDS = {"truncated": "truncated data file", "zeroed": "zeroed data file",
                "deleted": "deleted data file",
                "random_bytes": "4 KiB of random bytes in a data file",
                "empty_step": "empty step folder", "no_METADATA": "missing _METADATA",
                "no_manifest": "missing manifest.ocdbt", "no_meta": "missing meta/",
                "no_data_iter": "missing data-iterator file"}


def _damage_base(lab: Lab) -> str:
  base = os.path.join(lab.root, "damage_base")
  if not os.path.exists(os.path.join(base, "eval.json")):
    shutil.rmtree(base, ignore_errors=True)
    r = lab.run(base, *DAMAGE_BASE)
    if r.code:
      raise RuntimeError(f"damage base run failed: {r.err[-2000:]}")
  return base


def drill_damaged(lab: Lab, slug: str) -> Result:
  kind = DAMAGE_KINDS[slug]
  base = _damage_base(lab)
  want = rows(base)[1]
  w = lab.workdir("damaged_" + slug)
  shutil.copytree(base, w)
  damage(os.path.join(w, "checkpoints", "6"), kind)
  r = lab.run(w, *DAMAGE_BASE)
  steps, got = rows(w)
  equal, how = same_losses(got, want, range(1, 7))
  path = os.path.join(w, "checkpoints", "6")
  named = f"Checkpoint of step 6 ({path}) is damaged" in r.out
  moved = os.path.isdir(os.path.join(w, "checkpoints.damaged", "6"))
  resumed4 = "Resumed from step 4" in r.out
  holds = r.code == 0 and named and moved and resumed4 and equal and steps == list(range(1, 7))
  return Result(f"checkpoint: {kind}",
                "reported by step and path, moved aside, resumed from the previous one; "
                "losses equal",
                f"exit {r.code}; {'named step 6 and its path' if named else 'NOT named'}; "
                f"{'moved to checkpoints.damaged/' if moved else 'not moved'}; "
                f"{'resumed from 4' if resumed4 else 'did not resume from 4'}; {how}", holds)


def drill_leftover_tmp(lab: Lab) -> Result:
  base = _damage_base(lab)
  want = rows(base)[1]
  w = lab.workdir("leftover_tmp")
  shutil.copytree(base, w)
  tmp = os.path.join(w, "checkpoints", "6.orbax-checkpoint-tmp-1733000000")
  os.replace(os.path.join(w, "checkpoints", "6"), tmp)  # Killed before the rename.
  r = lab.run(w, *DAMAGE_BASE)
  _, got = rows(w)
  equal, how = same_losses(got, want, range(1, 7))
  reported = f"Removing an unfinished checkpoint save of step 6 ({tmp})" in r.out
  holds = r.code == 0 and reported and not os.path.exists(tmp) and equal
  return Result("leftover 6.orbax-checkpoint-tmp-<n> folder",
                "reported by step and path, removed; resume from step 4 equal",
                f"exit {r.code}; {'reported' if reported else 'NOT reported'}; "
                f"{'removed' if not os.path.exists(tmp) else 'still there'}; {how}", holds)


def drill_all_damaged(lab: Lab) -> Result:
  base = _damage_base(lab)
  w = lab.workdir("all_damaged")
  shutil.copytree(base, w)
  for step in checkpoint_steps(w):
    damage(os.path.join(w, "checkpoints", str(step)), "4 KiB of random bytes in a data file")
  r = lab.run(w, *DAMAGE_BASE)
  lines = stderr_lines(r.err)
  holds = (r.code == EXIT_USER_ERROR and len(lines) == 1 and "no usable checkpoint" in lines[0]
           and checkpoint_steps(w) == [2, 4, 6] and not has_traceback(r.out, r.err))
  return Result("every checkpoint damaged",
                "exit 2, one line naming each step; nothing moved, nothing trained",
                f"exit {r.code}; {len(lines)} stderr line(s): {lines[0][:110] if lines else ''}...",
                holds)


# ---------------------------------------------------------------------------
# Non-finite steps.

DIVERGE = ("--config.optim.lr=1e12", "--config.ckpt_every=2", "--config.log_every=10",
           "--config.total_steps=30", "--config.optim.nonfinite_max_consecutive=3")


def _saved_states_finite(workdir: str) -> tuple[bool, list[int]]:
  steps = checkpoint_steps(workdir)
  for step in steps:
    with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
      if json.load(f)["integrity"]["nonfinite"]:
        return False, steps
  return True, steps


def _set_aside(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints.diverged")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def drill_diverging(lab: Lab) -> Result:
  w = lab.workdir("diverging")
  r = lab.run(w, *DIVERGE)
  lines = stderr_lines(r.err)
  finite, steps = _saved_states_finite(w)
  aside = _set_aside(w)
  message = lines[0] if lines else ""
  names = (message.startswith("m5p: error: diverged: step ") and "non-finite loss=" in message
           and "checkpoints.diverged" in message)
  skipped_logged = "update skipped" in r.out
  again = lab.run(w, *DIVERGE[1:])  # The same run with the config's sane lr.
  _, losses = rows(w)
  recovered = again.code == 0 and all(isinstance(v, float) for v in losses.values())
  holds = (r.code == EXIT_DIVERGED and names and finite and skipped_logged and bool(aside)
           and len(lines) == 1 and recovered and not has_traceback(r.out, r.err))
  return Result("diverging run (lr=1e12)",
                "bad steps skipped on device and logged; exit 3 after 3 in a row naming the step "
                "and the loss terms; no non-finite checkpoint; those holding the diverged state "
                "moved aside; a rerun with a sane lr recovers and finishes",
                f"exit {r.code}: {message[21:140]}...; kept {steps} (finite: {finite}), moved "
                f"aside {aside}; rerun with lr 2e-3: exit {again.code}, all losses finite: "
                f"{recovered}", holds)


def drill_stop_policy(lab: Lab) -> Result:
  w = lab.workdir("stop_policy")
  r = lab.run(w, *DIVERGE, "--config.optim.nonfinite=stop")
  lines = stderr_lines(r.err)
  message = lines[0] if lines else ""
  holds = (r.code == EXIT_DIVERGED and "1 bad step(s) in a row" in message
           and _saved_states_finite(w)[0])
  return Result("optim.nonfinite='stop'", "exit 3 at the first non-finite step",
                f"exit {r.code}: {message[12:120]}...", holds)


# ---------------------------------------------------------------------------
# Bad configs.


def _refusal(lab: Lab, name: str, overrides: tuple[str, ...], fragment: str,
             workdir: str | None = None, data: bool = False, also: tuple[str, ...] = ()) -> Result:
  w = workdir or lab.workdir(re.sub(r"\W+", "_", name).strip("_"))
  r = lab.run(w, *overrides, data=data)
  lines = stderr_lines(r.err)
  holds = (r.code == EXIT_USER_ERROR and len(lines) == 1
           and all(f in lines[0] for f in (fragment,) + also)
           and not has_traceback(r.out, r.err) and r.seconds < 60)
  return Result(name, f"exit 2, one line with {fragment!r}, no traceback, before any compile",
                f"exit {r.code} in {r.seconds:.0f} s; {len(lines)} line(s): "
                f"{lines[0][12:130] if lines else r.err[-200:]}", holds)


def drill_total_steps(lab: Lab) -> list[Result]:
  return [_refusal(lab, f"total_steps={n}", (f"--config.total_steps={n}",),
                   f"config.total_steps={n}: expected >= 1") for n in (0, -5)]


def drill_unknown_field(lab: Lab) -> list[Result]:
  return [_refusal(lab, "--config.nonexistent=1", ("--config.nonexistent=1",),
                   "config has no field 'nonexistent'"),
          _refusal(lab, "--config.optim.lrr=1 (a typo)", ("--config.optim.lrr=1",),
                   "did you mean config.optim.lr?")]


def drill_intervals_off(lab: Lab) -> Result:
  w = lab.workdir("intervals_off")
  r = lab.run(w, "--config.log_every=0", "--config.ckpt_every=0")
  steps, _ = rows(w)
  total = 6
  holds = r.code == 0 and steps == [total] and checkpoint_steps(w) == [total]
  return Result("log_every=0, ckpt_every=0", "accepted as 'off': only the last step logged and "
                "checkpointed", f"exit {r.code}; rows {steps}; checkpoints {checkpoint_steps(w)}",
                holds)


def drill_vocab(lab: Lab) -> Result:
  return _refusal(lab, "data.vocab_size below the tokenizer's", ("--config.data.vocab_size=100",),
                  "config.data.vocab_size=100 is smaller than the vocabulary", data=True)


def drill_mesh(lab: Lab) -> Result:
  return _refusal(lab, "mesh.data=2 on 1 device", ("--config.mesh.data=2",),
                  "does not divide the 1 devices")


def drill_width(lab: Lab) -> Result:
  base = _damage_base(lab)
  w = lab.workdir("width")
  shutil.copytree(base, w)
  r = _refusal(lab, "resume with another model.width", DAMAGE_BASE + ("--config.model.width=48",),
               "model.width: 32 (checkpoint) vs 48 (config)", workdir=w, data=True,
               also=("e.g. params/",))
  r.holds = r.holds and checkpoint_steps(w) == [2, 4, 6]
  return r


# ---------------------------------------------------------------------------
# Two runs on one workdir.


def drill_second_run(lab: Lab) -> Result:
  w = lab.workdir("second_run")
  a = lab.start(w, *BASE)
  wait_for(lambda: os.path.exists(os.path.join(w, "m5p.lock")), a)
  b = lab.run(w, *BASE, "--config.seed=1")
  lines = stderr_lines(b.err)
  a.send_signal(signal.SIGTERM)
  a_code = a.wait(timeout=300)
  named = bool(lines) and f"pid {a.pid} on host {socket.gethostname()}, started" in lines[0]
  holds = b.code == EXIT_USER_ERROR and named and len(lines) == 1 and a_code == EXIT_PREEMPTED
  return Result("second run on a live workdir",
                "refused (exit 2) naming the holder's pid, host and start time; the first runs on",
                f"second: exit {b.code}: {lines[0][12:140] if lines else ''}...; first: exit "
                f"{a_code} (stopped by the drill)", holds)


def drill_runs_together(lab: Lab) -> Result:
  w = lab.workdir("together")
  a = lab.start(w, "--config.total_steps=4")
  b = lab.run(w, "--config.total_steps=4", "--config.seed=1")
  a_code = a.wait(timeout=600)
  codes = sorted([a_code, b.code])
  holds = codes == [0, EXIT_USER_ERROR] and not tmp_folders(w) and rows(w)[0] == [1, 2, 3, 4]
  return Result("two runs started together", "one trains, the other is refused; no tmp folder",
                f"exits {codes}; rows {rows(w)[0]}; tmp folders {len(tmp_folders(w))}", holds)


def drill_stale_lock(lab: Lab) -> Result:
  w = lab.workdir("stale_lock")
  os.makedirs(w)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(w, "m5p.lock"), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60}, f)
  r = lab.run(w, "--config.total_steps=2")
  notice = "Took over the stale workdir lock" in r.out and f"pid {dead.pid} is not running" in r.out
  holds = r.code == 0 and notice and not os.path.exists(os.path.join(w, "m5p.lock"))
  return Result("stale lock (dead pid on this host)", "taken over with a notice",
                f"exit {r.code}; {'notice logged' if notice else 'NO notice'}", holds)


# ---------------------------------------------------------------------------
# Converter.


def _convert_argv(raw: str, out: str, vocab_size: int = 300, **flags) -> list[str]:
  tool = os.path.join(os.path.dirname(REPO_CONFIGS), "tools", "convert_m5product.py")
  return [sys.executable, tool, f"--input_dir={raw}", f"--output_dir={out}", "--image_size=32",
          "--max_frames=2", "--max_audio_seconds=2", "--num_shards=2", f"--vocab_size={vocab_size}",
          *(f"--{k}={v}" for k, v in flags.items())]


def _child_peak_mb(argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
  """(exit code, peak RSS in MB of the command, stderr) in a fresh child process."""
  code = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], "
          "capture_output=True, text=True); print(json.dumps([p.returncode, "
          "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, p.stderr[-3000:]]))")
  p = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                     check=False)
  rc, mb, err = json.loads(p.stdout.strip().splitlines()[-1])
  return rc, mb, err


MAX_CONVERT_MB = 600


def drill_hostile_input(lab: Lab) -> list[Result]:
  from m5p.data import convert, hostile  # pylint: disable=import-outside-toplevel
  raw, out = os.path.join(lab.root, "hostile_raw"), lab.workdir("hostile_data")
  shutil.rmtree(raw, ignore_errors=True)
  expected = hostile.write(raw)
  t0 = time.time()
  rc, peak, err = _child_peak_mb(_convert_argv(raw, out, workers=0), lab.env())
  seconds = time.time() - t0
  results = []
  if rc != 0:
    return [Result("converter on hostile input", "finishes", f"exit {rc}: {err[-300:]}", False)]
  manifest = convert.load_manifest(out)
  ids = set()
  for split in manifest["splits"]:
    src = convert.open_split(out, split)
    ids |= {src[i]["item_id"].decode() for i in range(len(src))}
  observed = hostile.observe(manifest, ids)
  for case, want in expected.items():
    results.append(Result(f"converter: {case}", want, observed[case], observed[case] == want))
  balanced = manifest["items_in"] == manifest["items_written"] + sum(
      v["count"] for v in manifest["skipped"].values())
  results.append(Result("converter: whole hostile layout",
                        f"finishes, items_in = written + skipped, peak RSS < {MAX_CONVERT_MB} MB",
                        f"exit {rc} in {seconds:.0f} s; {manifest['items_in']} in, "
                        f"{manifest['items_written']} written; peak RSS {peak:.0f} MB",
                        rc == 0 and balanced and peak < MAX_CONVERT_MB))
  return results


def shard_bytes(data_dir: str) -> dict[str, bytes]:
  from m5p.data import convert  # pylint: disable=import-outside-toplevel
  d = os.path.join(data_dir, convert.load_manifest(data_dir)["dataset_dir"])
  return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))
          if ".array_record-" in f}


def drill_deterministic_shards(lab: Lab) -> Result:
  raw = os.path.join(lab.root, "raw")
  lab.data_dir  # pylint: disable=pointless-statement  (makes raw/)
  outs = [lab.workdir(f"convert_{k}") for k in range(2)]
  codes = [lab.run("", argv=_convert_argv(raw, out, vocab_size=600, workers=k)).code
           for k, out in enumerate(outs)]
  a, b = (shard_bytes(o) if c == 0 else {} for o, c in zip(outs, codes))
  same = bool(a) and a == b
  return Result("shards from two separate processes",
                "byte-identical (deterministic tf.train.Example serialization)",
                f"exits {codes}; {len(a)} shards, {sum(map(len, a.values()))} bytes: "
                f"{'identical' if same else 'DIFFERENT'}", same and codes == [0, 0])


# ---------------------------------------------------------------------------
# The catalogue.

DRILLS: dict[str, tuple[Callable[[Lab], Result | list[Result]], bool]] = {
    # name: (function, fast: no training run, in CI)
    "total_steps": (drill_total_steps, True),
    "unknown_field": (drill_unknown_field, True),
    "mesh": (drill_mesh, True),
    "vocab": (drill_vocab, False),
    "intervals_off": (drill_intervals_off, False),
    "sigterm": (drill_sigterm, False),
    "sigint_workers": (drill_sigint_workers, False),
    "sigterm_async_save": (drill_sigterm_async_save, False),
    "sigkill_async_save": (drill_sigkill_async_save, False),
    "two_processes": (drill_two_processes, False),
    **{f"damaged:{k}": ((lambda slug: lambda lab: drill_damaged(lab, slug))(k), False)
       for k in DAMAGE_KINDS},
    "leftover_tmp": (drill_leftover_tmp, False),
    "all_damaged": (drill_all_damaged, False),
    "width": (drill_width, False),
    "diverging": (drill_diverging, False),
    "stop_policy": (drill_stop_policy, False),
    "second_run": (drill_second_run, False),
    "runs_together": (drill_runs_together, False),
    "stale_lock": (drill_stale_lock, False),
    "hostile_input": (drill_hostile_input, False),
    "deterministic_shards": (drill_deterministic_shards, False),
}


def run_drills(lab: Lab, names: list[str] | None = None,
               on_result: Callable[[Result], None] | None = None) -> list[Result]:
  """Runs the named drills (default: all) in catalogue order; a drill that raises is a
  failed row, not the end of the session."""
  results = []
  for name in names or list(DRILLS):
    fn, _ = DRILLS[name]
    t0 = time.time()
    try:
      out = fn(lab)
    except Exception as e:  # pylint: disable=broad-except
      out = Result(name, "runs", f"raised {type(e).__name__}: {str(e)[:300]}", False)
    for r in out if isinstance(out, list) else [out]:
      r.seconds = r.seconds or (time.time() - t0) / (len(out) if isinstance(out, list) else 1)
      results.append(r)
      if on_result:
        on_result(r)
  return results


# ---------------------------------------------------------------------------
# --kills=N: SIGKILL at random moments, each followed by a resume.

KILL_STEPS = 60
KILL_RUN = (f"--config.total_steps={KILL_STEPS}", "--config.ckpt_every=3", "--config.log_every=1",
            "--config.async_checkpointing=true", "--config.keep_checkpoints=2")


def _finish(lab: Lab, workdir: str, want: dict[int, float]) -> dict:
  """Runs `workdir` to the end; its metrics.jsonl must then equal the reference, each step once."""
  before = max(checkpoint_steps(workdir), default=0)
  r = lab.run(workdir, *KILL_RUN)
  steps, got = rows(workdir)
  equal, detail = same_losses(got, want, range(1, KILL_STEPS + 1))
  once = steps == list(range(1, KILL_STEPS + 1))
  return {"kill": "finish", "how": "run to the end", "resumed_from": before, "exit": r.code,
          "rows_equal": equal and once and r.code == 0, "detail": detail, "each_step_once": once}


def kills(lab: Lab, n: int, seed: int = 0,
          on_kill: Callable[[dict], None] | None = None) -> tuple[list[dict], bool]:
  """SIGKILLs runs n times, each kill followed by a resume: in turn while an async save is
  being written, at a random step, or at a random wall time. Runs are resumed in chains:
  once a chain's run is near its end it is finished (run to the end) and a new workdir
  starts. Every row any run wrote must equal the uninterrupted run's, and each finished
  run's metrics.jsonl must hold each step once. A kill that found the run already
  finished is not counted. Returns (records, all equal)."""
  rng = random.Random(seed)
  want = lab.reference(*KILL_RUN)
  w = lab.workdir("kills")
  records: list[dict] = []
  k = 0
  while k < n:
    before = max(checkpoint_steps(w), default=0)
    if KILL_STEPS - before < 10:  # Little left to kill in: finish this chain, start another.
      records.append(_finish(lab, w, want))
      if on_kill:
        on_kill(records[-1])
      w = lab.workdir("kills")
      before = 0
    proc = lab.start(w, *KILL_RUN)
    how = ("during an async save", "at a random step", "at a random time")[k % 3]
    if how == "during an async save":
      wait_for(lambda: bool(tmp_folders(w)), proc, poll=0.001)
    elif how == "at a random step":
      target = rng.randint(before + 1, min(before + 20, KILL_STEPS - 1))
      wait_for(lambda: last_step(w) >= target, proc, poll=0.005)
    else:
      deadline = time.time() + rng.uniform(1.0, 12.0)
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    saving = bool(tmp_folders(w))
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    code = proc.wait()
    if code != -signal.SIGKILL:  # It ended by itself before the kill: not a kill.
      records.append(_finish(lab, w, want))
      if on_kill:
        on_kill(records[-1])
      w = lab.workdir("kills")
      continue
    k += 1
    steps, got = rows(w)
    equal, detail = same_losses(got, want, steps) if steps else (True, "no rows yet")
    records.append({"kill": k, "how": how, "resumed_from": before,
                    "killed_at_step": max(steps, default=0), "during_save": saving,
                    "rows_equal": equal, "detail": detail})
    if on_kill:
      on_kill(records[-1])
  records.append(_finish(lab, w, want))
  if on_kill:
    on_kill(records[-1])
  return records, all(r["rows_equal"] for r in records)


# ---------------------------------------------------------------------------
# Subprocess entry: making the lab's dataset without importing the trainer here.


def _make_data(raw: str, data: str) -> None:
  """The tiny config's synthetic set, converted as m5p.prepare would (2 shards)."""
  from m5p.config_loader import load_config  # pylint: disable=import-outside-toplevel
  from m5p.data import convert, synthetic  # pylint: disable=import-outside-toplevel
  d = load_config(TINY).data
  if synthetic.load_summary(raw) is None:
    synthetic.generate(raw, int(d.synthetic_products), seed=int(d.synthetic_seed))
  convert.convert(raw, data, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                  max_audio_seconds=d.max_audio_seconds, num_shards=2, vocab_size=d.vocab_size,
                  workers=0, log=lambda *a: None)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "make_data":
    _make_data(sys.argv[2], sys.argv[3])
