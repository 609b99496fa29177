"""One run per workdir: a lock file naming its holder.

`<workdir>/m5p.lock` is created exclusively (O_EXCL) and holds the holder's
pid, host, start time and command. A second run on the workdir is refused
with a message naming the holder. The lock is stale, and taken over with a
notice, when its holder is gone:
- on this host: its pid is dead, or now belongs to a process that started
  after the lock was written (a reused pid);
- on another host (a shared filesystem): its heartbeat (the file's mtime,
  touched every `HEARTBEAT_S` by the holder) is older than `STALE_AFTER_S`.

In a multi-host run only process 0 holds the lock (the other processes are
the same run); m5p.main shares process 0's verdict with them. Within one
process the lock is re-entrant (m5p.main and train_and_evaluate both take it).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from m5p.failures import UserError

log = logging.getLogger("m5p")

LOCK_FILE = "m5p.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class WorkdirBusy(UserError):
  """Another live run holds the workdir."""


def _process_start_time(pid: int) -> float | None:
  """Epoch seconds when `pid` started (Linux /proc), None when unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # starttime: field 22 of stat, in clock ticks since boot.
    with open("/proc/stat", encoding="utf-8") as f:
      boot = next(int(l.split()[1]) for l in f if l.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def describe(holder: dict[str, Any]) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def stale_reason(holder: dict[str, Any], mtime: float, now: float | None = None) -> str | None:
  """Why the lock's holder is gone, or None while it may be alive."""
  now = time.time() if now is None else now
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and isinstance(pid, int):
    if not _pid_alive(pid):
      return f"its pid {pid} is not running"
    started = _process_start_time(pid)
    if started is not None and holder.get("started") and started > holder["started"] + 5:
      return f"pid {pid} now belongs to a process started after the lock was taken"
    return None
  if now - mtime > STALE_AFTER_S:
    return f"its heartbeat stopped {now - mtime:.0f} s ago (> {STALE_AFTER_S:.0f} s)"
  return None


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir or raises WorkdirBusy."""

  _held: dict[str, "WorkdirLock"] = {}  # Re-entrancy within this process, by path.

  def __init__(self, workdir: str, announce: Callable[[str], None] | None = None):
    """`announce`: where the notice of a stale lock taken over goes (default: the log)."""
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.announce = announce or log.warning
    self._depth = 0
    self._owner: WorkdirLock | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    owner = WorkdirLock._held.get(self.path)
    if owner is not None and owner is not self:
      owner.__enter__()  # Already held by this process: count the nesting on the holder.
      self._owner = owner
      return self
    if self._depth == 0:
      self._acquire()
      WorkdirLock._held[self.path] = self
      self._stop.clear()
      self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="m5p-lock")
      self._thread.start()
    self._depth += 1
    return self

  def __exit__(self, *exc) -> None:
    owner = self._owner
    if owner is not None:
      self._owner = None
      owner.__exit__(*exc)
      return
    self._depth -= 1
    if self._depth > 0:
      return
    self._stop.set()
    WorkdirLock._held.pop(self.path, None)
    try:
      if self._read().get("pid") == os.getpid():
        os.remove(self.path)
    except OSError:
      pass

  def _record(self) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}

  def _read(self) -> dict[str, Any]:
    return _read_json(self.path)

  def _acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):  # Another process may take over a stale lock between our steps.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._record(), f)
      return
    raise WorkdirBusy(f"{self.path}: could not take the workdir lock (another run keeps taking it)")

  def _take_over_if_stale(self) -> None:
    holder = self._read()
    try:
      mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return  # Released meanwhile: try again.
    if not holder and time.time() - mtime < 5:
      time.sleep(0.5)  # Being written by its creator right now.
      holder = self._read()
    reason = stale_reason(holder, mtime) if holder else "it is unreadable"
    if reason is None:
      raise WorkdirBusy(
          f"{os.path.dirname(self.path)} is in use by another m5p run ({describe(holder)}; "
          f"{holder.get('command', '')!r}). Wait for it, stop it, or use another --workdir; "
          f"if that run is gone, delete {self.path}.")
    # Rename first: of several processes seeing the same stale lock, only one wins.
    aside = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if holder and _read_json(aside) != holder:
      # Another process took the stale lock over between our read and our rename: give it back.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.remove(aside)
      raise WorkdirBusy(f"{self.path}: another run took the workdir lock just now")
    os.remove(aside)
    self.announce(f"Took over the stale workdir lock {self.path} ({describe(holder)}: {reason}).")

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        return
