r"""Writes a synthetic M5Product in the raw layout (shared/M5PRODUCT_LAYOUT.md).

  python tools/make_synthetic.py --output_dir=RAW --num_products=1200 --seed=0 \
      [--image_size=64 --video_fraction=0.45 --audio_fraction=0.45 \
       --damaged_fraction=0.01 --corrupt_modality=image --corrupt_fraction=0.2 \
       --summary_json=PATH --overwrite]

The same arguments give byte-identical files. The latent structure (long-tailed
categories, multi-listing products, per-modality signatures, noise, damaged
files) is described in m5p/data/synthetic.py. Convert the result with
tools/convert_m5product.py.
"""
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m5p.data import synthetic  # noqa: E402

flags.DEFINE_string("output_dir", None, "Where to write the raw layout.", required=True)
flags.DEFINE_integer("num_products", 1200, "Number of items (listings).")
flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of all flags.")
flags.DEFINE_integer("image_size", 64, "Side of images and video frames in pixels (even).")
flags.DEFINE_float("video_fraction", 0.45, "Share of items with a video file.")
flags.DEFINE_float("audio_fraction", 0.45, "Share of items with a separate audio file.")
flags.DEFINE_float("damaged_fraction", 0.01, "Share of each modality's media files damaged.")
flags.DEFINE_enum("corrupt_modality", None, sorted(synthetic.MODALITY_ALIASES),
                  "Modality whose content comes from another category for --corrupt_fraction of items.")
flags.DEFINE_float("corrupt_fraction", 0.0, "Share of items (having that modality) corrupted.")
flags.DEFINE_integer("log_every", 200, "Progress line every that many items (0: none).")
flags.DEFINE_integer("num_threads", 0, "Items written in parallel (0: min(4, CPUs)); output unchanged.")
flags.DEFINE_string("summary_json", None, "Also write the summary there.")
flags.DEFINE_bool("overwrite", False, "Write into a non-empty folder that is not a generated set.")
FLAGS = flags.FLAGS


def summary_text(s: dict) -> str:
  m = s["modalities"]
  sizes = sorted(s["category_sizes"], reverse=True)
  lines = [
      f"wrote {s['num_products']} items to {s['output_dir']} in {s['seconds']} s "
      f"(seed {s['seed']}, {s['image_size']} px)",
      "  splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
      f"  categories {s['num_categories']}, sizes {sizes[0]} .. {sizes[-1]} "
      f"(largest: {s['categories'][s['category_sizes'].index(sizes[0])]})",
      f"  instances {s['num_instances']}, fine groups {s['fine_groups']} "
      f"({s['fine_group_items']} items)",
      f"  images {m['image']} (none: {m['no_image']}), videos {m['video']} "
      f"(h264 {m['video_h264']}), audio mp3 {m['audio_mp3']} wav {m['audio_wav']} "
      f"in-video {m['audio_in_video']}",
      f"  titles empty {m['title_empty']} noisy {m['title_noisy']}; tables empty {m['pv_empty']} "
      f"malformed {m['pv_malformed']}; labels -1 {m['label_minus_one']} absent {m['label_absent']}",
      "  id lists: " + ", ".join(f"{k} {v}" for k, v in s["split_lists"].items()),
  ]
  kinds: dict[str, int] = {}
  for d in s["damaged"]:
    kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
  lines.append(f"  damaged files {len(s['damaged'])}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
  if s["ghost_items"]:
    lines.append(f"  items with no usable modality: {', '.join(s['ghost_items'])}")
  if s["corrupt_modality"]:
    lines.append(f"  corrupted {s['corrupt_modality']}: {len(s['corrupted_items'])} items")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.getLogger("m5p").setLevel(logging.INFO)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
  s = synthetic.generate(
      FLAGS.output_dir, FLAGS.num_products, FLAGS.seed, image_size=FLAGS.image_size,
      video_fraction=FLAGS.video_fraction, audio_fraction=FLAGS.audio_fraction,
      damaged_fraction=FLAGS.damaged_fraction, corrupt_modality=FLAGS.corrupt_modality,
      corrupt_fraction=FLAGS.corrupt_fraction, log_every=FLAGS.log_every,
      overwrite=FLAGS.overwrite, num_threads=FLAGS.num_threads)
  if FLAGS.summary_json:
    with open(FLAGS.summary_json, "w", encoding="utf-8") as f:
      json.dump(s, f, ensure_ascii=False, indent=1)
  print(summary_text(s), flush=True)


if __name__ == "__main__":
  app.run(main)
