"""tools/drills.py's fast drills (the ones that train nothing) through the real CLI: user
errors are one line on stderr with exit code 2 and no traceback, before any compile.
The training drills run in `python tools/drills.py` (README "Reliability"); their CI
counterparts are tests/test_preemption.py and tests/test_reliability.py."""
import os
import subprocess
import sys

import pytest

from m5p import drills

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
  cache = os.environ.get("M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax"))
  return drills.Lab(str(tmp_path_factory.mktemp("drills")), cache_dir=cache, log=lambda s: None)


def test_user_errors_are_one_line_with_exit_code_2(lab):
  results = drills.drill_unknown_field(lab) + drills.drill_total_steps(lab)[:1]
  for r in results:
    assert r.holds, (r.name, r.expected, r.observed)


def test_drills_tool_lists_every_drill():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "drills.py"), "--list"],
                       capture_output=True, text=True, check=True).stdout.split()
  assert {n for n in out if n != "(fast)"} == set(drills.DRILLS)
