"""Model FLOPs from XLA's cost analysis, and the measured peak to divide them by."""
from __future__ import annotations

import collections
import math
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp


def compiled_flops(compiled, conditionals: str = "cheapest") -> float:
  """FLOPs of one call of a compiled function per XLA's cost analysis: for an SPMD
  program, one device's share (multiply by the device count for the total).

  Two corrections to XLA's figure, both from the dot FLOPs of the compiled
  HLO (`dot_flops_correction`):
  - loops: XLA counts a while loop's body once; its dots are counted
    `known_trip_count` times (config.model.scan_layers runs each stack as
    one loop: without this, a 6-layer stack would count as one layer);
  - conditionals: XLA counts a conditional as its most expensive branch;
    with `conditionals='cheapest'` (default) the cheapest is counted,
    'xla' keeps the dearest. (m5p's train step has none since the LM head
    runs on fixed pick slots; a multi-platform program's platform switch
    is resolved before compiling.)
  """
  if conditionals not in ("cheapest", "xla"):
    raise ValueError(f"conditionals={conditionals!r}: expected 'cheapest' or 'xla'")
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  total = float((cost or {}).get("flops", 0.0))
  try:
    correction = dot_flops_correction(compiled.as_text(), cheapest_branch=conditionals == "cheapest")
  except Exception:  # An HLO dialect the parser does not follow: XLA's figure.
    return total
  return max(total + correction, 0.0)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"^[a-z0-9]+\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): ([a-z0-9]+\[[\d,]*\])")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(shape: str) -> list[int] | None:
  m = _SHAPE.match(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else None


def _computations(hlo_text: str):
  """Yields (computation, is_entry, header params text, instructions) of an HLO
  module's text; instructions as (name, result type, opcode, rest of line)."""
  comp, entry, params, insts = None, False, "", []
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      if comp is not None:
        yield comp, entry, params, insts
      comp, entry, params, insts = header.group(1), line.startswith("ENTRY"), header.group(2), []
      continue
    inst = _INSTRUCTION.match(line) if comp else None
    if inst:
      insts.append(inst.groups())
  if comp is not None:
    yield comp, entry, params, insts


def _callees(op: str, rest: str) -> list[tuple[str, int]]:
  """(callee, times per call) of one instruction: a while body runs its
  known_trip_count times (once when unknown), anything else once."""
  trips = 1
  if op == "while":
    found = _TRIP_COUNT.search(rest)
    trips = int(found.group(1)) if found else 1
  return [(c, trips if key == "body" else 1)
          for key in ("calls", "to_apply", "body", "condition")
          for c in re.findall(rf"{key}=%?([\w.\-]+)", rest)]


def hlo_instructions(hlo_text: str):
  """Yields (computation, name, result type, opcode, rest of line) of every
  instruction of an HLO module's text."""
  for comp, _, _, insts in _computations(hlo_text):
    for name, shape, op, rest in insts:
      yield comp, name, shape, op, rest


def computation_runs(hlo_text: str) -> dict[str, int]:
  """How many times each computation runs per call of the module: the entry
  once, a while body its known_trip_count times per run of its caller
  (conditional branches count as if each ran)."""
  calls: dict[str, list[tuple[str, int]]] = {}
  entry = None
  for comp, is_entry, _, insts in _computations(hlo_text):
    entry = comp if is_entry else entry
    calls[comp] = [c for _, _, op, rest in insts for c in _callees(op, rest)]
    calls[comp] += [(n.strip().lstrip("%"), 1) for _, _, op, rest in insts if op == "conditional"
                    for listed in [re.search(r"branch_computations=\{([^}]*)\}", rest)] if listed
                    for n in listed.group(1).split(",")]
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(c: str, times: int, depth: int = 0) -> None:
    if depth > 64:  # Guards against cycles.
      return
    runs[c] += times
    for callee, n in calls.get(c, ()):
      visit(callee, times * n, depth + 1)

  if entry:
    visit(entry, 1)
  return dict(runs)


def dot_flops_correction(hlo_text: str, cheapest_branch: bool = True) -> float:
  """The dot FLOPs of an HLO module (text) counted as it runs, minus as XLA's
  cost analysis counts them: while bodies `known_trip_count` times instead of
  once (a loop without a known count stays once), and each conditional at its
  cheapest branch (`cheapest_branch`) instead of its dearest. Fusions, calls
  and nesting are followed; dots only, the matmul work that dominates."""
  own: dict[str, float] = {}
  # Per computation: (callee, trip count) pairs, and its conditionals' branch lists.
  calls: dict[str, list[tuple[str, int]]] = {}
  branches: dict[str, list[list[str]]] = {}
  entry = None
  for comp, is_entry, params, insts in _computations(hlo_text):
    own[comp], calls[comp], branches[comp] = 0.0, [], []
    entry = comp if is_entry else entry
    shapes = {name: _dims(shape) for name, shape in _PARAM.findall(params)}
    for name, shape, op, rest in insts:
      shapes[name] = _dims(shape)
      if op == "dot":
        lhs = re.match(r"\s*%?([\w.\-]+)", rest).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        out, lhs_dims = shapes[name], shapes.get(lhs)
        if out is not None and lhs_dims is not None and contracting:
          k = math.prod(lhs_dims[int(c)] for c in contracting.group(1).split(",") if c)
          own[comp] += 2.0 * math.prod(out) * k
      calls[comp] += _callees(op, rest)
      if op == "conditional":
        listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
        names = ([n.strip().lstrip("%") for n in listed.group(1).split(",")] if listed else
                 re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest))
        if names:
          branches[comp].append(names)

  def count(as_run: bool) -> float:
    memo: dict[str, float] = {}

    def flops(c: str) -> float:
      if c not in memo:
        memo[c] = 0.0  # Guards against cycles.
        total = own.get(c, 0.0) + sum((n if as_run else 1) * flops(d) for d, n in calls.get(c, ()))
        for names in branches.get(c, ()):
          pick = min if (as_run and cheapest_branch) else max
          total += pick(map(flops, names))
        memo[c] = total
      return memo[c]

    roots = [entry] if entry else list(own)
    return sum(flops(r) for r in roots)

  return count(as_run=True) - count(as_run=False)


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32,
                        clock: Callable[[], float] = time.perf_counter) -> float:
  """FLOP/s of a large jitted matmul on this process's first device: the peak an
  MFU is measured against.

  The best of `repeats`. `clock=time.process_time` gives FLOP per CPU-second
  of this process instead (on CPU: what a busy machine's time-slicing does not
  change; compare with a step's own CPU time). A local device, since another
  process's device is not addressable: a matmul placed there returns at once
  and gave process 1 of a 2-process run a "peak" of 4.9 PFLOP/s.
  """
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  # Accumulated in float32, as the model's products are (a bf16 x bf16 -> bf16
  # product runs through float32 on XLA:CPU: m5p.models.cpu_kernels).
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = clock()
    f(a, a).block_until_ready()
    best = min(best, clock() - t0)
  return 2 * n ** 3 / max(best, 1e-9)


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity).
# Matched against `device.device_kind` by substring, most specific first.
ACCELERATOR_PEAK_BF16 = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 46e12),
)


def device_peak(dtype: str = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from).

  Accelerators in bf16: the table above. On CPU, or a device or dtype the
  table does not cover: a large jitted matmul measured now, in that dtype
  (emulated CPU devices share the machine's cores, so the machine's rate is
  divided among them).
  """
  device = jax.local_devices()[0]
  if device.platform != "cpu" and dtype == "bfloat16":
    for name, peak in ACCELERATOR_PEAK_BF16:
      if name.lower() in device.device_kind.lower():
        return peak, f"{name} bf16 data sheet"
  measured = measure_matmul_peak(dtype=jnp.dtype(dtype))
  if device.platform == "cpu":
    return measured / jax.local_device_count(), (
        f"measured {dtype} matmul {measured / 1e9:.0f} GFLOP/s / {jax.local_device_count()} "
        "emulated devices")
  return measured, f"measured {dtype} matmul on {device.device_kind}"
