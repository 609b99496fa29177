r"""Writes a synthetic M5Product in the raw layout (shared/M5PRODUCT_LAYOUT.md).

  python tools/make_synthetic.py --output_dir=RAW --num_products=1200 --seed=0 \
      [--image_size=64 --video_fraction=0.45 --audio_fraction=0.45 \
       --damaged_fraction=0.01 --corrupt_modality=image --corrupt_fraction=0.2 \
       --num_categories=40 --zipf_exponent=0.9 --attributes_per_category=3 \
       --multi_listing_fraction=0.3 --group_size_range=2,4 \
       --caption_quality=0.8,0.1,0.1 --feature_fraction=0.2 --feature_only_fraction=0.5 \
       --split_format=auto --summary_json=PATH --overwrite]

The same arguments give byte-identical files. The latent structure (long-tailed
categories, multi-listing products, per-modality signatures, noise, damaged
files, precomputed features) is described in m5p/data/synthetic.py. Memory
stays flat as --num_products grows (1M is fine); the last line reports items/s
and the peak RSS. Convert the result with tools/convert_m5product.py.
"""
import json
import logging
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m5p.data import synthetic  # noqa: E402

flags.DEFINE_string("output_dir", None, "Where to write the raw layout.", required=True)
flags.DEFINE_integer("num_products", 1200, "Number of items (listings).")
flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of all flags.")
flags.DEFINE_integer("image_size", 64, "Side of images and video frames in pixels (even).")
flags.DEFINE_float("video_fraction", 0.45, "Share of items with a video file (the rest: missing video).")
flags.DEFINE_float("audio_fraction", 0.45,
                   "Share of items with a separate audio file (the rest: missing audio).")
flags.DEFINE_float("damaged_fraction", 0.01, "Share of each modality's media files damaged.")
flags.DEFINE_enum("corrupt_modality", None, sorted(synthetic.MODALITY_ALIASES),
                  "Modality whose content comes from another category for --corrupt_fraction of items.")
flags.DEFINE_float("corrupt_fraction", 0.0, "Share of items (having that modality) corrupted.")
flags.DEFINE_integer("num_categories", None,
                     "Number of labels (unset: max(8, min(40, N // 40))); 41..400 add synthesized "
                     "variants of the 40 named categories; at most 400.")
flags.DEFINE_float("zipf_exponent", 0.9, "Category sizes ~ 1 / rank^exponent (0: equal sizes).")
flags.DEFINE_integer("attributes_per_category", 3, "Table keys per category (1..5).")
flags.DEFINE_float("multi_listing_fraction", 0.3,
                   "Share of products (instances) with several listings: the fine-grained groups.")
flags.DEFINE_list("group_size_range", ["2", "4"], "min,max listings of a multi-listing product.")
flags.DEFINE_list("caption_quality", ["0.9", "0.1", "0.0"],
                  "Shares of well, partially and poorly matched titles (sum 1).")
flags.DEFINE_float("feature_fraction", 0.0,
                   "Share of items that also get image_/video_/audio_feature/<id>.npy files.")
flags.DEFINE_float("feature_only_fraction", 0.0,
                   "Share of the feature items written with features instead of media files.")
flags.DEFINE_enum("split_format", "auto", list(synthetic.SPLIT_FORMATS),
                  "<split>_id_label.json or .jsonl (auto: jsonl from 100,000 items on).")
flags.DEFINE_integer("summary_list_cap", synthetic.SUMMARY_LIST_CAP,
                     "Per-item lists in the summary keep at most this many entries.")
flags.DEFINE_integer("log_every", 200, "Progress line every that many items (0: none).")
flags.DEFINE_integer("num_threads", 0, "Items written in parallel (0: min(4, CPUs)); output unchanged.")
flags.DEFINE_string("summary_json", None, "Also write the summary there.")
flags.DEFINE_bool("overwrite", False, "Write into a non-empty folder that is not a generated set.")
FLAGS = flags.FLAGS


def peak_rss_mib() -> float:
  """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def summary_text(s: dict) -> str:
  m = s["modalities"]
  sizes = sorted(s["category_sizes"], reverse=True)
  lines = [
      f"wrote {s['num_products']} items to {s['output_dir']} in {s['seconds']} s "
      f"(seed {s['seed']}, {s['image_size']} px)",
      "  splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
      + f" ({s['split_files']})",
      f"  categories {s['num_categories']}, sizes {sizes[0]} .. {sizes[-1]} "
      f"(largest: {s['categories'][s['category_sizes'].index(sizes[0])]})",
      f"  instances {s['num_instances']}, fine groups {s['fine_groups']} "
      f"({s['fine_group_items']} items)",
      f"  images {m['image']} (none: {m['no_image']}), videos {m['video']} "
      f"(h264 {m['video_h264']}), audio mp3 {m['audio_mp3']} wav {m['audio_wav']} "
      f"in-video {m['audio_in_video']}",
      f"  titles empty {m['title_empty']} noisy {m['title_noisy']} poor {m['title_poor']}; "
      f"tables empty {m['pv_empty']} malformed {m['pv_malformed']}; "
      f"labels -1 {m['label_minus_one']} absent {m['label_absent']}",
      "  id lists: " + ", ".join(f"{k} {v}" for k, v in s["split_lists"].items()),
  ]
  if m["image_feature"] or m["video_feature"] or m["audio_feature"]:
    lines.append(f"  features image {m['image_feature']} video {m['video_feature']} "
                 f"audio {m['audio_feature']}; feature-only items {m['feature_only']}")
  kinds = {k: v for k, v in s["damaged_by_kind"].items() if v}
  lines.append(f"  damaged files {s['damaged_count']}"
               + "".join(f", {k} {v}" for k, v in sorted(kinds.items())))
  if s["ghost_items"]:
    lines.append(f"  items with no usable modality: {', '.join(s['ghost_items'])}")
  if s["corrupt_modality"]:
    lines.append(f"  corrupted {s['corrupt_modality']}: {s['corrupted_count']} items")
  lines.append(f"  {s['num_products'] / max(s['seconds'], 1e-9):.1f} items/s, "
               f"peak RSS {peak_rss_mib():.0f} MiB")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.getLogger("m5p").setLevel(logging.INFO)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    group_size_range = tuple(int(g) for g in FLAGS.group_size_range)
    caption_quality = tuple(float(q) for q in FLAGS.caption_quality)
  except ValueError as e:
    raise app.UsageError(f"--group_size_range / --caption_quality: {e}") from None
  s = synthetic.generate(
      FLAGS.output_dir, FLAGS.num_products, FLAGS.seed, image_size=FLAGS.image_size,
      video_fraction=FLAGS.video_fraction, audio_fraction=FLAGS.audio_fraction,
      damaged_fraction=FLAGS.damaged_fraction, corrupt_modality=FLAGS.corrupt_modality,
      corrupt_fraction=FLAGS.corrupt_fraction, log_every=FLAGS.log_every,
      overwrite=FLAGS.overwrite, num_threads=FLAGS.num_threads,
      num_categories=FLAGS.num_categories, zipf_exponent=FLAGS.zipf_exponent,
      attributes_per_category=FLAGS.attributes_per_category,
      multi_listing_fraction=FLAGS.multi_listing_fraction, group_size_range=group_size_range,
      caption_quality=caption_quality, feature_fraction=FLAGS.feature_fraction,
      feature_only_fraction=FLAGS.feature_only_fraction, split_format=FLAGS.split_format,
      summary_list_cap=FLAGS.summary_list_cap)
  if FLAGS.summary_json:
    with open(FLAGS.summary_json, "w", encoding="utf-8") as f:
      json.dump(s, f, ensure_ascii=False, indent=1)
  print(summary_text(s), flush=True)


if __name__ == "__main__":
  app.run(main)
