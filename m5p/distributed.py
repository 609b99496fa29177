"""Multi-process JAX start-up, from flags, m5p's environment variables or the cluster's.

Call `initialize()` once, before anything touches a JAX device. In order:

1. explicit `M5P_COORDINATOR_ADDRESS` (host:port of process 0),
   `M5P_NUM_PROCESSES`, `M5P_PROCESS_ID` (and optionally
   `M5P_LOCAL_DEVICE_IDS`, comma-separated): any cluster, or several
   processes on one machine (the 2-process test does this);
2. `M5P_DISTRIBUTED=auto` (set by launch/tpu_pod.sh), a SLURM job step with
   more than one task (`SLURM_NTASKS` > 1), or a TPU pod slice with several
   hosts (`TPU_WORKER_HOSTNAMES` or `MEGASCALE_COORDINATOR_ADDRESS`):
   `jax.distributed.initialize()` reads the cluster's own variables;
3. otherwise one process: nothing to do.

On CPU, cross-process collectives go through Gloo (JAX's default CPU
backend has none).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("m5p")
_done = False


def _cluster_kind(env: dict[str, str]) -> str | None:
  if env.get("M5P_COORDINATOR_ADDRESS"):
    return "explicit"
  if env.get("M5P_DISTRIBUTED") == "auto":
    return "auto"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_STEP_ID") is not None:
    return "slurm"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(env: dict[str, str] | None = None) -> str | None:
  """Joins the job's processes if it has several; returns how ('explicit', 'auto', 'slurm', 'tpu') or None."""
  global _done
  env = dict(os.environ if env is None else env)
  kind = _cluster_kind(env)
  if kind is None or _done:
    return None
  if kind == "explicit":
    try:
      num, pid = int(env["M5P_NUM_PROCESSES"]), int(env["M5P_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ValueError("M5P_COORDINATOR_ADDRESS needs integer M5P_NUM_PROCESSES and "
                       "M5P_PROCESS_ID") from None
  if env.get("JAX_PLATFORMS", "").startswith("cpu") or kind == "explicit":
    # Harmless on GPU/TPU (only the CPU client reads it); required for CPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if kind == "explicit":
    local = env.get("M5P_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=env["M5P_COORDINATOR_ADDRESS"], num_processes=num, process_id=pid,
        local_device_ids=[int(i) for i in local.split(",")] if local else None)
  else:
    jax.distributed.initialize()
  _done = True
  log.info("JAX distributed (%s): process %d of %d, %d local / %d global devices.", kind,
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return kind


_barriers = 0


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process gets here (no-op for one process).

  Goes through the coordination service, not a device collective: it is for
  before the first collectives of a freshly compiled program, since processes
  finish compiling at different times and Gloo gives up on a peer that is
  more than 30 s late.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  _barriers += 1
  jax_distributed.global_state.client.wait_at_barrier(f"m5p_{name}_{_barriers}",
                                                      int(timeout_s * 1000))
