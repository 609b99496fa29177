"""Train-step throughput, MFU and memory of a config on synthetic batches (no input pipeline).

python tools/benchmark.py --config=configs/scale_base.py --steps=5 --batch_sizes=8,64 \\
    [--config.field=value ...] [--json=FILE]

For each batch size: the real train step (`m5p.train.jit_train_step`) over
the sharded state (`m5p.state.create_sharded_state`, the config's mesh and
`sharding.rules(config)`), jitted as the trainer does (pinned shardings, a
donated state, `config.compiler_options`), fed one random batch of the config's shapes
(`batch_spec.random_batch`) resident on the devices. It prints:

  compile s     lowering + XLA compile of the step
  step s        median of `--steps` timed steps after `--warmup` untimed ones
  samples/s     global, and per device
  GFLOP/dev     one step's FLOPs per device, from XLA's cost analysis of the
                compiled step (m5p.flops.compiled_flops: the LM head's rarely
                taken fallback branch is not counted; the JSON also has
                XLA's own figure, which counts it)
  TFLOP/s/dev   those FLOPs / step time
  peak          per device: on CPU the fp32 (config.model.dtype) matmul rate
                measured in the same process before and after the steps, the
                higher (emulated devices share the machine, so it is divided
                among them); on
                GPU/TPU the bf16 data-sheet figure (m5p.flops.device_peak)
  MFU           TFLOP/s/dev / peak
  MFU(cpu)      CPU only: the same ratio in FLOP per CPU-second of this
                process (the step's own CPU time against a matmul's): other
                processes' turns on the cores change it much less than the
                wall-clock MFU, so it is the figure to read on a busy machine
  memory        on CPU: the process's peak RSS over its whole life (start-up,
                state, compiling, steps), the timed steps' own peak RSS
                ('steps': Linux's VmHWM reset before them; the JSON also has
                the growth since start-up), and XLA's compiled temp +
                argument bytes per device; on GPU/TPU: the devices'
                peak_bytes_in_use

Peak RSS only grows within a process, so by default (`--isolate`) each batch
size runs in its own child process (same flags, one batch size) and each row's
memory is its own. Other processes on the machine slow the step and the
matmul alike, so the MFU is fairer than the raw times; the load average is
printed, repeat if it is high.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.", lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps per batch size.")
flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
flags.DEFINE_list("batch_sizes", None, "Global batch sizes (default: the config's batch_size).")
flags.DEFINE_string("json", None, "Also write the results (and the setting) to this JSON file.")
flags.DEFINE_bool("isolate", True, "Run each batch size in its own process (clean peak RSS).")

GIB = 1024 ** 3


def _rss_bytes() -> int:
  """The process's peak resident set size so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return _rss_bytes()


def _reset_peak_rss() -> bool:
  """Linux: resets the process's RSS high-water mark (VmHWM) to its current
  RSS, so that `_peak_rss_since_reset` sees only what follows (the steps,
  not initialisation or compiling). False where the kernel refuses."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_since_reset() -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def machine() -> dict:
  """What the numbers were measured on."""
  cpu = platform.processor() or platform.machine()
  features: list[str] = []
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.readlines()
    names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
    cpu = names[0] if names else cpu
    flags_line = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    # What sets the fp32 / bf16 matmul rates XLA:CPU reaches.
    features = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags_line]
  except OSError:
    pass
  return {"cpu": cpu, "cpus": os.cpu_count(), "features": features,
          "platform": platform.platform(), "load_avg": [round(x, 2) for x in os.getloadavg()]}


def bench_one(config, batch_size: int, steps: int, warmup: int, rss_start: int) -> dict:
  """Compiles and times the train step at one global batch size."""
  import jax
  import numpy as np
  from flax import linen as nn

  from m5p import flops, host_memory, optim, sharding, state as state_lib
  from m5p.data import batch_spec
  from m5p.models.scale import ScaleModel
  from m5p.train import jit_train_step

  config.batch_size = batch_size
  mesh = sharding.make_mesh(config.mesh)
  if batch_size % sharding.num_batch_shards(mesh):
    raise ValueError(f"batch size {batch_size} does not divide over the data x fsdp size "
                     f"{sharding.num_batch_shards(mesh)} of mesh {dict(mesh.shape)}")
  model = ScaleModel(config)
  tx, schedule = optim.make_optimizer(config)
  t0 = time.perf_counter()
  state, shardings = state_lib.create_sharded_state(model, tx, config, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  batch_shard = sharding.batch_sharding(mesh)
  batch = {k: jax.device_put(v, batch_shard)
           for k, v in batch_spec.random_batch(config, batch_size).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    step = jit_train_step(model, tx, schedule, config, shardings, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    host_memory.release()  # As the trainer does after compiling.
    step_flops = flops.compiled_flops(compiled)  # One device's share, as the step normally runs.
    xla_flops = flops.compiled_flops(compiled, conditionals="xla")
    mem = compiled.memory_analysis()
    for _ in range(max(warmup, 0)):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    on_cpu = jax.devices()[0].platform == "cpu"

    def measure_peaks() -> tuple[float, str, float | None]:
      """(peak FLOP/s, its source, on CPU the FLOP per CPU-second of this
      process: see the module docstring)."""
      peak, source = flops.device_peak(str(config.model.dtype))
      cpu_peak = (flops.measure_matmul_peak(dtype=jax.numpy.dtype(str(config.model.dtype)),
                                            clock=time.process_time) if on_cpu else None)
      return peak, source, cpu_peak

    # Right before the timed steps: the same load as they see.
    peak, peak_source, cpu_peak = measure_peaks()
    times, cpu_times = [], []
    hwm_reset = on_cpu and _reset_peak_rss()
    for _ in range(steps):
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
    step_rss = _peak_rss_since_reset() if hwm_reset else None
    # Measured again after the steps, the better of the two kept: one dip (a
    # busy neighbour, a frequency drop) would otherwise inflate the MFU.
    after, _, cpu_after = measure_peaks()
    peak = max(peak, after)
    if on_cpu:
      cpu_peak = max(cpu_peak, cpu_after)
  step_s = float(np.median(times))
  loss = float(jax.device_get(metrics["loss"]))
  out = {
      "batch_size": batch_size, "devices": mesh.size, "mesh": dict(mesh.shape),
      "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
      "params_m": state_lib.num_params(state.params) / 1e6, "init_s": init_s,
      "compile_s": compile_s, "step_s": step_s, "step_times_s": times,
      "samples_per_s": batch_size / step_s, "samples_per_s_per_device": batch_size / step_s / mesh.size,
      "gflop_per_step_per_device": step_flops / 1e9,
      "gflop_xla_per_step_per_device": xla_flops / 1e9,  # Conditionals at their dearest branch.
      "model_tflops_per_device": step_flops / step_s / 1e12,
      "peak_tflops_per_device": peak / 1e12, "peak_source": peak_source,
      "mfu": step_flops / step_s / peak, "loss": loss,
      # CPU only: the same ratio in FLOP per CPU-second (all devices' FLOPs: they share the process).
      "step_cpu_s": float(np.median(cpu_times)) if on_cpu else None,
      "mfu_cpu_time": (step_flops * mesh.size / float(np.median(cpu_times)) / cpu_peak
                       if on_cpu and np.median(cpu_times) > 0 else None),
      "xla_temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
      "xla_argument_bytes": int(mem.argument_size_in_bytes) if mem else None,
  }
  if out["platform"] == "cpu":
    # getrusage and VmHWM read the kernel's RSS counters at different moments
    # and can differ by a few pages: the life's peak includes the steps' peak.
    out["peak_rss_bytes"] = max(_rss_bytes(), step_rss or 0)
    out["rss_growth_bytes"] = out["peak_rss_bytes"] - rss_start
    out["step_peak_rss_bytes"] = step_rss  # The timed steps' own peak (None: not measurable).
  else:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    out["device_peak_bytes"] = max(int(s.get("peak_bytes_in_use", 0)) for s in stats)
  return out


def _child_argv(batch_size: int, json_path: str) -> list[str]:
  """This run's own flags for one batch size, in a fresh process."""
  drop = ("--batch_sizes", "--json", "--isolate", "--noisolate")
  keep, args = [], iter(sys.argv[1:])
  for a in args:
    if a.split("=", 1)[0] in drop:
      if "=" not in a and a in drop[:2]:
        next(args, None)  # '--json FILE': its value too.
    else:
      keep.append(a)
  return [sys.executable, os.path.abspath(__file__), *keep, f"--batch_sizes={batch_size}",
          f"--json={json_path}", "--noisolate"]


def run_isolated(batch_sizes: list[int]) -> list[dict]:
  rows = []
  for b in batch_sizes:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "row.json")
      proc = subprocess.run(_child_argv(b, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
      if proc.returncode:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"batch size {b}: child process failed (exit {proc.returncode})")
      with open(path) as f:
        rows.extend(json.load(f)["results"])
  return rows


def print_table(rows: list[dict]) -> None:
  cpu = rows[0]["platform"] == "cpu"
  mem_head = (f"{'MFU(cpu)':>8} {'peak RSS GiB':>12} {'(steps)':>8} {'XLA tmp+arg GiB/dev':>20}" if cpu
              else f"{'device peak GiB':>16}")
  print(f"{'batch':>6} {'compile s':>10} {'step s':>9} {'samples/s':>10} {'/device':>9} "
        f"{'GFLOP/dev':>10} {'TFLOP/s/dev':>12} {'peak':>8} {'MFU':>7} {mem_head}")
  for r in rows:
    if cpu:
      xla = (r["xla_temp_bytes"] or 0) + (r["xla_argument_bytes"] or 0)
      steps = r.get("step_peak_rss_bytes")
      steps = f"{steps / GIB:>8.2f}" if steps else f"{'n/a':>8}"
      mem = (f"{100 * r['mfu_cpu_time']:>7.1f}% {r['peak_rss_bytes'] / GIB:>12.2f} {steps} "
             f"{xla / GIB:>20.3f}")
    else:
      mem = f"{r['device_peak_bytes'] / GIB:>16.2f}"
    print(f"{r['batch_size']:>6} {r['compile_s']:>10.1f} {r['step_s']:>9.3f} {r['samples_per_s']:>10.2f} "
          f"{r['samples_per_s_per_device']:>9.2f} {r['gflop_per_step_per_device']:>10.1f} "
          f"{r['model_tflops_per_device']:>12.4f} {r['peak_tflops_per_device']:>8.4f} "
          f"{100 * r['mfu']:>6.1f}% {mem}")


def main(argv):
  del argv
  rss_start = _current_rss_bytes()
  config = FLAGS.config
  if FLAGS.steps < 1:
    raise app.UsageError("--steps must be at least 1")
  sizes = [int(b) for b in FLAGS.batch_sizes] if FLAGS.batch_sizes else [int(config.batch_size)]
  before = machine()
  if FLAGS.isolate and len(sizes) > 1:
    rows = run_isolated(sizes)
  else:
    rows = [bench_one(config, b, FLAGS.steps, FLAGS.warmup, rss_start) for b in sizes]
  after = machine()
  m = rows[0]
  print(f"machine: {before['cpu']} ({' '.join(before['features']) or 'no CPU feature flags'}), "
        f"{before['cpus']} CPUs, {before['platform']}; load average "
        f"{before['load_avg'][0]:.2f} before, {after['load_avg'][0]:.2f} after")
  print(f"devices: {m['devices']} x {m['device_kind']} ({m['platform']}); mesh {m['mesh']}; "
        f"dtype {config.model.dtype}; remat {bool(config.model.get('remat', False))}; "
        f"accum_steps {config.get('accum_steps', 1)}")
  print(f"model: {m['params_m']:.1f}M parameters (width {config.model.width}, heads "
        f"{config.model.heads}); step time: median of {FLAGS.steps} after {FLAGS.warmup} warm-up")
  print(f"peak: {m['peak_source']}")
  print_table(rows)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"config": config.to_dict(), "argv": sys.argv[1:], "machine": before,
                 "machine_after": after, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                 "results": rows}, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
