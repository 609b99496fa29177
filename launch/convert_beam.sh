#!/usr/bin/env bash
# Converts a raw M5Product with Apache Beam: every shard is one Beam task.
#
#   launch/convert_beam.sh RAW_DIR DATA_DIR RUNNER [beam pipeline flags...]
#
# RUNNER: DirectRunner (this machine, e.g. --direct_num_workers=8
# --direct_running_mode=multi_processing), FlinkRunner (--flink_master=HOST:PORT),
# SparkRunner (--spark_master_url=spark://HOST:7077), DataflowRunner
# (--project=P --region=R --temp_location=gs://B/tmp --sdk_container_image=IMAGE).
# Needs `pip install 'm5p[beam]'` here and m5p installed on the workers (a
# container image or --setup_file=./setup.py). Shards are written with POSIX
# file I/O: RAW_DIR and DATA_DIR must be a filesystem mounted on every worker
# (NFS, Lustre, Filestore, or a FUSE mount of a bucket). The finishing step
# (tokenizer, TFDS metadata, manifest) runs here when the pipeline is done;
# rerunning the same command after a failure redoes only unfinished shards.
# SHARDS: shards per split (default 1024).
set -euo pipefail
raw=${1:?usage: launch/convert_beam.sh RAW_DIR DATA_DIR RUNNER [beam flags...]}
data=${2:?usage: launch/convert_beam.sh RAW_DIR DATA_DIR RUNNER [beam flags...]}
runner=${3:?usage: launch/convert_beam.sh RAW_DIR DATA_DIR RUNNER [beam flags...]}
shift 3
exec python tools/convert_m5product.py --input_dir="$raw" --output_dir="$data" \
  --num_shards="${SHARDS:-1024}" --beam_runner="$runner" --beam_options="$*"
