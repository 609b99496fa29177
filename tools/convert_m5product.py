r"""Converts a raw M5Product layout into m5p's dataset (tokenizer, ArrayRecord, manifest).

  python tools/convert_m5product.py --input_dir=RAW --output_dir=DATA \
      [--image_size=32 --max_frames=4 --n_mels=80 --max_audio_seconds=12 \
       --num_shards=4 --vocab_size=2000 --workers=N --overwrite]

At scale (see launch/convert_beam.sh and launch/convert_slurm_array.sh):
  ... --num_tasks=K --task_index=I   one task of a cluster job array; then
                                     the same command without them finishes
  ... --beam_runner=DirectRunner|DataflowRunner|FlinkRunner|SparkRunner \
      --beam_options="--project=... --region=..."   shards as Beam tasks

A rerun of an interrupted conversion skips the finished shards; the shards
are byte-identical however the conversion was run.
Defaults come from m5p.default_config. The raw layout is described in
shared/M5PRODUCT_LAYOUT.md; the summary printed at the end (and
DATA/manifest.json) counts items, modality presence, faults and skips.
"""
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from m5p import default_config  # noqa: E402
from m5p.data import convert as convert_lib  # noqa: E402

_D = default_config.get_config().data
flags.DEFINE_string("input_dir", None, "Raw M5Product layout.", required=True)
flags.DEFINE_string("output_dir", None, "Where to write the converted dataset.", required=True)
flags.DEFINE_integer("image_size", _D.image_size, "Side of the stored square images and frames.")
flags.DEFINE_integer("max_frames", _D.max_frames, "Video frames kept (1 fps).")
flags.DEFINE_integer("n_mels", _D.n_mels, "Log-mel bins.")
flags.DEFINE_float("max_audio_seconds", _D.max_audio_seconds, "Seconds of audio kept.")
flags.DEFINE_integer("num_shards", _D.num_shards, "ArrayRecord shards per split (at most).")
flags.DEFINE_integer("vocab_size", _D.vocab_size, "SentencePiece vocabulary size.")
flags.DEFINE_integer("workers", None, "Media-decoding processes (default: all cores; 0: decode in-process).")
flags.DEFINE_bool("overwrite", False, "Replace an earlier conversion in --output_dir.")
flags.DEFINE_integer("num_tasks", 1, "Split the shards over this many job-array tasks.")
flags.DEFINE_integer("task_index", 0, "This task's index in [0, num_tasks).")
flags.DEFINE_string("beam_runner", None, "Run the shards on Apache Beam with this runner.")
flags.DEFINE_string("beam_options", "", "Beam pipeline flags, space-separated.")
FLAGS = flags.FLAGS


def summary(m: dict) -> str:
  lines = [f"items in {m['items_in']}, written {m['items_written']}, "
           f"skipped {m['items_in'] - m['items_written']}"]
  for split, n in m["splits"].items():
    pres = ", ".join(f"{k} {v}" for k, v in m["presence"][split].items())
    lines.append(f"  {split}: {n} records ({pres}; audio from video {m['audio_from_video'][split]})")
  for reason, r in m["skipped"].items():
    lines.append(f"  skipped {reason}: {r['count']} (e.g. {', '.join(r['examples'])})")
  for modality, reasons in m["faults"].items():
    for reason, r in reasons.items():
      lines.append(f"  fault {modality}:{reason}: {r['count']} (e.g. {', '.join(r['examples'])})")
  if m["empty_splits"]:
    lines.append(f"  splits left out (no usable item): {', '.join(m['empty_splits'])}")
  lines.append(f"  categories {m['num_categories']} ({m['labels_seen']} seen), "
               f"fine groups {m['fine_groups']}, id lists {sorted(m.get('splits_files', {}))}")
  lines.append(f"  dataset {m['dataset_dir']}, tokenizer {m['tokenizer']}")
  return "\n".join(lines)


def main(argv):
  del argv
  tfds.disable_progress_bar()
  try:
    manifest = convert_lib.convert(
        FLAGS.input_dir, FLAGS.output_dir, image_size=FLAGS.image_size,
        max_frames=FLAGS.max_frames, n_mels=FLAGS.n_mels,
        max_audio_seconds=FLAGS.max_audio_seconds, num_shards=FLAGS.num_shards,
        vocab_size=FLAGS.vocab_size, workers=FLAGS.workers, overwrite=FLAGS.overwrite,
        num_tasks=FLAGS.num_tasks, task_index=FLAGS.task_index, beam_runner=FLAGS.beam_runner,
        beam_options=shlex.split(FLAGS.beam_options))
  except convert_lib.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if manifest is not None:  # None: one task of several, nothing to summarise yet.
    print(summary(manifest))
  return 0


if __name__ == "__main__":
  app.run(main)
