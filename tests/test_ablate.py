"""tools/ablate.py --quick end to end (CI's form of the ablation): runs as a user
would, writes the table, the claims and both plots, and resumes without retraining."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(*args: str) -> str:
  env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu")
  cache = os.environ.get("M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax"))
  proc = subprocess.run([sys.executable, "tools/ablate.py", f"--cache_dir={cache}", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_quick_ablation_writes_table_claims_and_plots(tmp_path):
  out = str(tmp_path / "ablation")
  variants = "base,corrupted"  # Two trainings: the table, claim (d) and both plots.
  _run(f"--output_dir={out}", "--quick", f"--only={variants}")
  md = open(os.path.join(out, "ablation.md"), encoding="utf-8").read()
  for name in variants.split(","):
    row = re.search(rf"^\| {name} \|.*\| 1 \| (-?[\d.]+) ± [\d.]+ \| (-?[\d.]+) ± [\d.]+ \| "
                    rf"(-?[\d.]+) ± [\d.]+ \|$", md, re.M)
    assert row, (name, md)
    assert all(0 <= float(v) <= 100 for v in row.groups())
  assert re.search(r"^\| random embeddings \| floor \|", md, re.M)
  assert re.search(r"clean -?[\d.]+ ± [\d.]+ vs corrupted -?[\d.]+ ± [\d.]+", md)  # Claim (d).
  for png in ("ablation.png", "modality_weights.png"):
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  runs = json.load(open(os.path.join(out, "ablation.json"), encoding="utf-8"))["runs"]
  assert sorted(runs) == sorted(variants.split(","))
  # Every run was a real training run of its own config, with its own log.
  for name in variants.split(","):
    log = open(os.path.join(out, "runs", name, "seed0", "train.log"), encoding="utf-8").read()
    assert "step 3/3" in log
  corrupted = json.load(open(os.path.join(out, "runs", "corrupted", "seed0", "result.json")))
  assert corrupted["key"]["variant"]["data"] == "corrupt"
  assert os.path.exists(os.path.join(out, "data", "corrupt_image", "data", "manifest.json"))

  # A rerun finds every result and trains nothing.
  again = _run(f"--output_dir={out}", "--quick", f"--only={variants}")
  assert "seed 0:" not in again and "ablation done" in again
