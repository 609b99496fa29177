#!/usr/bin/env bash
# Trains m5p on a Cloud TPU VM pod slice: the same command on every host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#
# Expects on every host: this repository at $REPO (default ~/m5p), installed
# with `pip install -e '.[tpu]'` (run `launch/tpu_pod.sh ... --setup` style
# installs yourself: e.g. `gcloud compute tpus tpu-vm ssh NAME --zone=Z
# --worker=all --command="cd ~/m5p && pip install -e '.[tpu]'"`).
# WORKDIR must be one folder all hosts share (checkpoints are written by all
# processes together): a Filestore/NFS mount or a bucket mounted with GCS FUSE.
# Each host is one JAX process; M5P_DISTRIBUTED=auto makes m5p call
# jax.distributed.initialize(), which reads the pod's topology itself.
# A typical config for a v5e-64 is configs/scale_base.py with
# --config.batch_size=4096 --config.mesh.data=-1 (pure data parallel) or
# --config.mesh.fsdp=16 to shard parameters and optimizer state.
set -euo pipefail
usage="usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]"
tpu=${1:?$usage}
zone=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
repo=${REPO:-\~/m5p}
overrides=""
for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo && M5P_DISTRIBUTED=auto python -m m5p.main \
    --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")$overrides"
