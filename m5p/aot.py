"""Ahead-of-time compiles of the real train step for TPU topologies, on any host.

libtpu's compile-only mode (`jax.experimental.topologies.get_topology_desc`)
gives abstract TPU devices of any slice shape; the trainer's own jitted step
(`m5p.train.jit_train_step`, over the abstract sharded state) is lowered and
compiled for them, so per-chip memory, FLOPs, XLA's time estimate and the
collectives of a pod-scale program can be read off a CPU machine. Needs the
`tpu` extra (`pip install -e ".[tpu]"`: jax[tpu], i.e. libtpu).

    report = aot.compile_report(config, "v5p:4x4x4")
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from m5p import flops, optim, sharding, train
from m5p import state as state_lib
from m5p.data import batch_spec

GIB = 1024 ** 3

# HBM per chip (bytes), matched against device_kind by prefix, most specific first.
TPU_HBM_BYTES = (("TPU v5 lite", 16 * GIB), ("TPU v6 lite", 32 * GIB), ("TPU v5", 95 * GIB),
                 ("TPU v4", 32 * GIB), ("TPU v6", 32 * GIB))

# HBM bandwidth per chip (bytes/s), for the roofline estimate, same matching.
TPU_HBM_BANDWIDTH = (("TPU v5 lite", 819e9), ("TPU v6 lite", 1640e9), ("TPU v5", 2765e9),
                     ("TPU v4", 1228e9), ("TPU v6", 1640e9))

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def topology_devices(name: str) -> list:
  """The abstract devices of a TPU topology such as 'v5e:4x4' or 'v5p:4x4x4'
  (libtpu compile-only: no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # libtpu missing, or a name it does not know.
    raise ValueError(f"--topology={name!r}: libtpu could not describe it ({type(e).__name__}: "
                     f"{str(e)[:200]}); install the 'tpu' extra (pip install -e '.[tpu]') and use "
                     "names such as v5e:4x4, v5p:2x2x2, v4:2x2x1, v6e:2x2") from None


def hbm_bytes(device_kind: str) -> int | None:
  return next((b for prefix, b in TPU_HBM_BYTES if device_kind.startswith(prefix)), None)


def hbm_bandwidth(device_kind: str) -> float | None:
  return next((b for prefix, b in TPU_HBM_BANDWIDTH if device_kind.startswith(prefix)), None)


def abstract_inputs(config: ml_collections.ConfigDict, mesh, batch_size: int):
  """(model, tx, schedule, state shardings, abstract state, abstract batch) on
  `mesh`, as the trainer lays them out, without allocating anything."""
  model = train.make_model(config)
  tx, schedule = optim.make_optimizer(config)
  table = sharding.rules(config)
  key = jax.random.key(0)  # Outside the mesh: eager values cannot live on abstract devices.
  with jax.set_mesh(mesh), nn.logical_axis_rules(table):
    boxed = jax.eval_shape(state_lib.init_state_fn(model, tx, config, unbox=False), key)
    shardings = nn.meta.unbox(sharding.logical_sharding(boxed, mesh, table))
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       nn.meta.unbox(boxed), shardings)
  batch_shard = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shard)
           for k, (shape, dtype) in batch_spec.batch_shapes(config, batch_size).items()}
  return model, tx, schedule, shardings, state, batch


def compile_train_step(config: ml_collections.ConfigDict, devices: list, batch_size: int):
  """(compiled step, mesh): the trainer's jitted step compiled for `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  if batch_size % sharding.num_batch_shards(mesh):
    raise ValueError(f"batch {batch_size} is not divisible by the data x fsdp size "
                     f"{sharding.num_batch_shards(mesh)} of mesh {dict(mesh.shape)}")
  model, tx, schedule, shardings, state, batch = abstract_inputs(config, mesh, batch_size)
  # Built outside the mesh (the step's base dropout key is an eager value),
  # traced and compiled inside it, as the trainer does.
  step = train.jit_train_step(model, tx, schedule, config, shardings, mesh)
  # The persistent compilation cache cannot hold compile-only executables (it
  # warns on every read), so it is off for these compiles.
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
      return step.lower(state, batch).compile(), mesh
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)


def _result_bytes(shape_text: str) -> int:
  """Bytes of an instruction's result type (the largest array of a tuple: an
  async start's (operand, result) pair counts its result)."""
  sizes = []
  for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape_text):
    bits = int(re.sub(r"\D", "", dtype) or 8) if dtype != "pred" else 8
    sizes.append(math.prod(int(d) for d in dims.split(",") if d) * max(bits, 8) // 8)
  return max(sizes, default=0)


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'bytes'}} of the collectives one call runs (a loop
  body's counted `known_trip_count` times); an async op counts at its start."""
  runs = flops.computation_runs(hlo_text)
  stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  for comp, _, shape, op, _ in flops.hlo_instructions(hlo_text):
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in stats:
      times = runs.get(comp, 1)
      stats[kind]["count"] += times
      stats[kind]["bytes"] += times * _result_bytes(shape)
  return stats


def compile_report(config: ml_collections.ConfigDict, topology: str,
                   batch_size: int | None = None) -> dict[str, Any]:
  """Per-chip memory, FLOPs, XLA's time estimate and collectives of the
  config's train step compiled for `topology`."""
  devices = topology_devices(topology)
  batch_size = int(batch_size or config.batch_size)
  kind = devices[0].device_kind
  try:
    compiled, mesh = compile_train_step(config, devices, batch_size)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA refuses a program that cannot fit a chip's HBM; that is a finding
    # of the mesh study (how far over), not a crash.
    return {"topology": topology, "device_kind": kind, "chips": len(devices),
            "mesh": dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, len(devices)))),
            "batch_size": batch_size, "dtype": str(config.model.dtype),
            "hbm_bytes": hbm_bytes(kind), "does_not_fit": str(e).split("\n")[0][:400]}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  peak = next((p for name, p in flops.ACCELERATOR_PEAK_BF16 if name in kind), None)
  step_flops = flops.compiled_flops(compiled)
  # XLA's TPU cost model; libtpu 0.0.42.1's compile-only mode returns a
  # negative value for small programs (not an estimate), so a roofline from
  # the compiled FLOPs and bytes accessed stands beside it.
  xla_seconds = float(cost.get("optimal_seconds", 0.0) or 0.0)
  accessed = float(cost.get("bytes accessed", 0.0) or 0.0)
  bandwidth = hbm_bandwidth(kind)
  roofline = max(step_flops / peak if peak else 0.0, accessed / bandwidth if bandwidth else 0.0)
  per_chip = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
              for k in ("argument", "output", "temp", "alias", "generated_code")}
  total = per_chip["argument"] + per_chip["output"] + per_chip["temp"] - per_chip["alias"]
  return {
      "topology": topology, "device_kind": kind, "chips": len(devices), "mesh": dict(mesh.shape),
      "batch_size": batch_size, "dtype": str(config.model.dtype),
      "bytes_per_chip": dict(per_chip, total=total), "hbm_bytes": hbm_bytes(kind),
      "flops_per_chip": step_flops, "bytes_accessed_per_chip": accessed,
      "xla_optimal_seconds": xla_seconds, "roofline_seconds": roofline,
      "peak_bf16_flops": peak, "hbm_bandwidth": bandwidth,
      "mfu_estimate_xla": step_flops / xla_seconds / peak if xla_seconds > 0 and peak else None,
      "mfu_estimate_roofline": step_flops / roofline / peak if roofline > 0 and peak else None,
      "collectives": collective_stats(compiled.as_text()),
  }


def format_report(r: dict[str, Any]) -> str:
  head = (f"topology {r['topology']}: {r['chips']} x {r['device_kind']}; mesh {r['mesh']}; global "
          f"batch {r['batch_size']}; compute dtype {r['dtype']}")
  if "does_not_fit" in r:
    return f"{head}\nDOES NOT FIT: {r['does_not_fit']}"
  b, hbm = r["bytes_per_chip"], r["hbm_bytes"]
  mib = 1024 ** 2
  share = f" of {hbm / GIB:.0f} GiB HBM ({b['total'] / hbm:.0%})" if hbm else ""
  lines = [
      head,
      f"per chip: arguments {b['argument'] / mib:.1f} MiB, outputs {b['output'] / mib:.1f} MiB "
      f"(aliased {b['alias'] / mib:.1f}), temp {b['temp'] / mib:.1f} MiB; total "
      f"{b['total'] / GIB:.3f} GiB{share}",
      f"FLOPs per step per chip: {r['flops_per_chip'] / 1e9:.2f} GFLOP",
  ]
  peak = r["peak_bf16_flops"]
  if r["mfu_estimate_xla"] is not None:
    lines.append(f"XLA's estimate: {r['xla_optimal_seconds'] * 1e3:.1f} ms per step, "
                 f"{r['mfu_estimate_xla']:.1%} MFU against {peak / 1e12:.0f} TFLOP/s bf16")
  else:
    lines.append(f"XLA's estimate: none (optimal_seconds = {r['xla_optimal_seconds']:.4g}: libtpu's "
                 "compile-only cost model gave no time for this program)")
  if r["mfu_estimate_roofline"] is not None:
    lines.append(f"roofline: {r['roofline_seconds'] * 1e3:.1f} ms per step (the larger of FLOPs at "
                 f"{peak / 1e12:.0f} TFLOP/s and {r['bytes_accessed_per_chip'] / GIB:.1f} GiB at "
                 f"{r['hbm_bandwidth'] / 1e9:.0f} GB/s): at most {r['mfu_estimate_roofline']:.1%} MFU")
  lines.append("collectives per step (count, MiB per chip):")
  for kind, s in r["collectives"].items():
    lines.append(f"  {kind:<19s} {s['count']:>6d}  {s['bytes'] / mib:10.1f}")
  return "\n".join(lines)
