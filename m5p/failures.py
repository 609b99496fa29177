"""How a run ends when it does not finish: exceptions and the exit codes of `python -m m5p.main`.

Schedulers read the exit code, so each way of stopping has its own:

  0   finished (trained to total_steps and evaluated)
  1   a crash (a bug, or a failure m5p does not classify): traceback printed
  2   a user error (bad config, missing data, workdir held by another run):
      one line on stderr, no traceback; rerunning unchanged fails again
  3   diverged: non-finite steps stopped the run (config.optim.nonfinite);
      the last good checkpoint is kept, rerunning unchanged diverges again
  75  preempted (SIGTERM / SIGINT): the step finished and was checkpointed;
      rerun the same command to resume (EX_TEMPFAIL: "try again later")
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75


class UserError(Exception):
  """A mistake in what the user asked for: reported as one line, exit code 2."""


class ConfigError(UserError, ValueError):
  """A config field that cannot work; the message names the field."""


class Diverged(RuntimeError):
  """Non-finite steps ended the run (exit code 3); the message names the step and the terms.
  `first_bad_step`: the first of the bad steps in a row that ended it (None: not known)."""

  def __init__(self, message: str, first_bad_step: int | None = None):
    super().__init__(message)
    self.first_bad_step = first_bad_step


class Preempted(Exception):
  """A stop signal ended the run after checkpointing `step` (exit code 75)."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped by {signal_name} after step {step} (checkpointed); "
                     "rerun the same command to resume")
    self.step = step
    self.signal_name = signal_name
