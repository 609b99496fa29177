#!/usr/bin/env bash
# Converts a raw M5Product on a SLURM cluster: a job array of conversion tasks,
# then one finishing job (tokenizer, TFDS metadata, manifest) once all succeed.
#
#   launch/convert_slurm.sh RAW_DIR DATA_DIR [TASKS] [extra converter flags...]
#
# RAW_DIR and DATA_DIR must be on a filesystem every node sees (NFS, Lustre,
# GPFS). Each task converts shards k with k % TASKS == its index, decoding
# media with all its CPUs; a task that dies (preemption, node failure) can
# simply be resubmitted: finished shards are skipped. Tune with the
# environment: CPUS (per task, default 16), PARTITION, TIME (default 12:00:00),
# SHARDS (shards per split, default 1024: ~6k products each for 6.3M).
set -euo pipefail
raw=${1:?usage: launch/convert_slurm.sh RAW_DIR DATA_DIR [TASKS] [flags...]}
data=${2:?usage: launch/convert_slurm.sh RAW_DIR DATA_DIR [TASKS] [flags...]}
tasks=${3:-64}
shift $(( $# >= 3 ? 3 : $# ))
cpus=${CPUS:-16}
shards=${SHARDS:-1024}
common=(--input_dir="$raw" --output_dir="$data" --num_shards="$shards" "$@")
partition=()
if [ -n "${PARTITION:-}" ]; then partition=(--partition="$PARTITION"); fi

array_job=$(sbatch --parsable "${partition[@]}" --job-name=m5p-convert \
  --array=0-$((tasks - 1)) --cpus-per-task="$cpus" --time="${TIME:-12:00:00}" \
  --output=convert-%A_%a.log \
  --wrap="python tools/convert_m5product.py ${common[*]} --workers=$cpus \
          --num_tasks=$tasks --task_index=\$SLURM_ARRAY_TASK_ID")
echo "submitted conversion array job $array_job ($tasks tasks)"
final_job=$(sbatch --parsable "${partition[@]}" --job-name=m5p-convert-finish \
  --dependency=afterok:"$array_job" --cpus-per-task=4 --time=02:00:00 \
  --output=convert-finish-%j.log \
  --wrap="python tools/convert_m5product.py ${common[*]} --workers=4")
echo "submitted finishing job $final_job (runs after all tasks succeed)"
