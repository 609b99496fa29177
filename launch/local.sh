#!/usr/bin/env bash
# Runs m5p on this machine. Usage: launch/local.sh CONFIG WORKDIR [--config.x=y ...]
# With EMULATE_DEVICES=N (CPU only) JAX pretends to have N devices, to try meshes.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
if [ -n "${EMULATE_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${EMULATE_DEVICES}"
fi
exec python -m m5p.main --config="$config" --workdir="$workdir" "$@"
