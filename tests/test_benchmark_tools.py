"""Smoke tests of tools/benchmark_input.py, tools/benchmark_convert.py and
tools/benchmark.py at a tiny size.

Each runs as a user would (`python tools/...`, a subprocess with one CPU
device) and must print its tables with positive, finite numbers.
"""
import json
import math
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUM = r"([0-9][0-9,]*\.?[0-9]*)"
# Half the compile time on CPU; the smoke tests check the output, not the speed.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(tool: str, *args: str, timeout: int = 180, xla_flags: str | None = None) -> str:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest asks for 8 emulated devices; a plain run has one.
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
      "M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run([sys.executable, os.path.join("tools", tool), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout


def _numbers(pattern: str, text: str) -> list[float]:
  """The numbers captured by `pattern` (one or more groups), checked positive and finite."""
  found = re.findall(pattern, text, re.M)
  assert found, f"no line matches {pattern!r} in:\n{text}"
  values = [float(str(v).replace(",", "")) for m in found for v in (m if isinstance(m, tuple) else (m,))]
  assert all(math.isfinite(v) and v > 0 for v in values), (pattern, values)
  return values


def test_benchmark_convert_prints_rates_and_extrapolation():
  out = _run("benchmark_convert.py", "--num_products=20", "--workers=0")
  _numbers(rf"^raw set .*: 2\d items, {_NUM} KiB of media per item", out)
  _numbers(rf"^  workers=0: 2\d products in {_NUM} s \({_NUM} products/s, {_NUM} CPU s\)", out)
  # Table row: workers, cores, wall s, products/s, per core, CPU ms/product.
  _numbers(rf"^ +0 +1 +{_NUM} +{_NUM} +{_NUM} +{_NUM} ", out)
  _numbers(r"^  decode image -> JPEG +" + _NUM + " ms", out)
  _numbers(rf"^  workers=0 CPU time +{_NUM} +{_NUM} (?:h|min) +{_NUM} ", out)


def test_benchmark_input_prints_rates_ratios_and_breakdown(tiny_dataset):
  out = _run("benchmark_input.py", "--config=demo:tiny", f"--data_dir={tiny_dataset}",
             "--compare_config=", "--workers=0", "--threads=1", "--num_batches=2",
             "--warmup_batches=1", "--profile_records=16", "--steps=1", "--fed_steps=1")
  assert re.search(r"^machine: .*\d+ CPUs", out, re.M) and "devices: 1 x" in out
  _numbers(rf"^  workers=0 threads=1: {_NUM} examples/s", out)
  # Step table: params, compile s, step ms, examples/s, cores busy.
  _numbers(rf"^  demo:tiny +16 +{_NUM}M +{_NUM} +{_NUM} +{_NUM} +{_NUM}$", out)
  # Pipeline vs step: examples/s, ratios, CPU ms/example, cores busy.
  _numbers(rf"^  demo:tiny +0 +1 +{_NUM} +{_NUM}x +{_NUM}x +{_NUM} +{_NUM}$", out)
  # demo:tiny reads with worker_count=0, read_threads=1: the setting measured.
  _numbers(rf"^  (?:HOLDS|DOES NOT HOLD) at the config's own setting \(workers=0, threads=1\): "
           rf"{_NUM} examples/s = {_NUM}x", out)
  _numbers(rf"^  decode image JPEG +{_NUM} ", out)
  _numbers(rf"^  tokenize \(title, table\) +{_NUM} ", out)
  _numbers(rf"^  total \(CPU\) +{_NUM} +100.0%  = {_NUM} examples/s per core", out)


def test_benchmark_prints_step_table_and_json(tmp_path):
  """tools/benchmark.py on the tiny config at two batch sizes, each in its
  own process (the default), compiled at XLA's lowest optimisation level."""
  out_json = tmp_path / "bench.json"
  out = _run("benchmark.py", "--config=configs/demo.py:tiny", "--config.model.video_layers=0",
             "--config.model.audio_layers=0", "--steps=2", "--warmup=0", "--batch_sizes=4,8",
             f"--json={out_json}", xla_flags=FAST_XLA)
  assert re.search(r"^machine: .*\d+ CPUs.*load average", out, re.M) and "devices: 1 x" in out
  _numbers(rf"^peak: measured float32 matmul {_NUM} GFLOP/s", out)
  # Row: batch, compile s, step s, samples/s, per device, GFLOP/dev, TFLOP/s/dev, peak, MFU %,
  # MFU(cpu) %, peak RSS GiB, the steps' peak RSS GiB, XLA temp + argument GiB.
  row = rf"^ +{{b}} +{_NUM} +{_NUM} +{_NUM} +{_NUM} +{_NUM} +{_NUM} +{_NUM} +{_NUM}% +{_NUM}% +{_NUM} +{_NUM} +{_NUM}$"
  _numbers(row.format(b=4), out)
  _numbers(row.format(b=8), out)
  with open(out_json) as f:
    results = json.load(f)["results"]
  assert [r["batch_size"] for r in results] == [4, 8]
  for r in results:
    assert r["step_s"] > 0 and 0 < r["mfu"] < 1.5 and 0 < r["mfu_cpu_time"] < 1.5
    assert math.isfinite(r["loss"])
    assert r["gflop_per_step_per_device"] > 0 and r["peak_rss_bytes"] > r["rss_growth_bytes"] > 0
    # The steps' own peak: at least the state and the batch, at most the lifetime peak.
    assert 0 < r["step_peak_rss_bytes"] <= r["peak_rss_bytes"]
  # FLOPs grow with the batch (the per-row work dominates).
  assert results[1]["gflop_per_step_per_device"] > 1.5 * results[0]["gflop_per_step_per_device"]
