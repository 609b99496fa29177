r"""Shows what a converted dataset holds: manifest, a few decoded records, a contact sheet.

  python tools/inspect_data.py DATA [--split=train] [--num=4] \
      [--contact_sheet=PATH.png] [--num_sheet=12] [--seed=0]

DATA is a folder written by tools/convert_m5product.py. Printed: the manifest
(splits, modality presence, faults and skips, conversion settings), `--num`
records of `--split` decoded (with the title as the dataset's tokenizer cuts
it), and one line per contact-sheet row. The contact sheet (default
DATA/contact_sheet.png; `--num_sheet=0`: none) has one row per product: image,
video frames, log-mel spectrogram, title and table. Products are drawn with
`--seed`; the sheet prefers, among a seeded sample, those with most modalities.
Exit status 2: DATA is not a converted dataset, or no such split.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import unicodedata
import warnings
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from m5p.data import convert  # noqa: E402
from m5p.data import schema  # noqa: E402
from m5p.data.tokenizer import Tokenizer  # noqa: E402

# Fields every record has (convert.open_split); others are shown generically.
KNOWN_FIELDS = ("item_id", "title", "fine_group", "label", "fine_group_id", "table_keys",
                "table_values", "image", "video", "audio", "faults")
MEDIA = ("image", "video", "audio")
# Fonts with CJK glyphs, in order of preference (titles and tables are mostly Chinese).
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC",
             "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN", "SimHei", "Microsoft YaHei",
             "PingFang SC", "Heiti SC", "Hiragino Sans GB", "Arial Unicode MS")


def _s(value: Any) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _n(x: Any) -> int:
  """Length of a list field or rows of an array field (0 for None)."""
  return 0 if x is None else len(x)


def _pct(n: int, total: int) -> str:
  return f"{n} ({100 * n / total:.0f}%)" if total else str(n)


def _shape(value: Any) -> str:
  """A short description of any field value, for fields this tool does not know."""
  if isinstance(value, np.ndarray):
    if value.size <= 8 and value.dtype.kind in "biu":
      return f"{value.dtype} {value.tolist()}"
    return f"{value.dtype} {list(value.shape)}"
  if isinstance(value, (bytes, str)):
    text = _s(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")
  if isinstance(value, (list, tuple)):
    if not value:
      return "[] (empty)"
    if all(isinstance(v, (bytes, str)) for v in value):
      return "[" + ", ".join(_s(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    inner = sorted({_shape(v) for v in value[:16]})
    return f"{len(value)} x " + (inner[0] if len(inner) == 1 else "{" + "; ".join(inner) + "}")
  return repr(value)


def extra_fields(r: dict) -> dict[str, Any]:
  """Fields beyond the documented ones; a flat array `x` with an int `x_shape` is shown reshaped."""
  extra = {k: r[k] for k in sorted(set(r) - set(KNOWN_FIELDS))}
  for k in list(extra):
    value, shape = extra.get(k), extra.get(k + "_shape")
    if isinstance(value, np.ndarray) and isinstance(shape, np.ndarray) and shape.ndim == 1 \
        and np.issubdtype(shape.dtype, np.integer) and int(np.prod(shape)) == value.size:
      extra[k] = extra[k].reshape([int(d) for d in shape])
      del extra[k + "_shape"]
  return extra


def _audio_seconds(rows: int, conv: dict) -> float:
  return rows * conv.get("audio_hop", schema.AUDIO_HOP) / conv.get("audio_sample_rate",
                                                                 schema.AUDIO_SAMPLE_RATE)


# --- manifest ------------------------------------------------------------------------------
def manifest_text(data_dir: str, m: dict) -> str:
  """The manifest as aligned lines; keys it does not know are listed at the end."""
  lines = [f"dataset {os.path.abspath(data_dir)} (record version {m.get('record_version')})",
           f"  records {m.get('dataset_dir')}, tokenizer {m.get('tokenizer')}"]
  if "items_in" in m:
    lines.append(f"  items in {m['items_in']}, written {m.get('items_written')}, "
                 f"skipped {m['items_in'] - m.get('items_written', 0)}")
  splits, presence = m.get("splits", {}), m.get("presence", {})
  mods = list(dict.fromkeys(k for p in presence.values() for k in p))
  afv = m.get("audio_from_video", {})
  widths = {k: max(11, len(k)) for k in mods}
  head = f"  {'split':<10} {'records':>8}" + "".join(f" {k:>{widths[k]}}" for k in mods)
  lines += ["", "splits (records; items with each modality)", head + (" {:>16}".format(
      "audio from video") if afv else "")]
  for split, n in splits.items():
    row = f"  {split:<10} {n:>8}" + "".join(
        f" {_pct(presence.get(split, {}).get(k, 0), n):>{widths[k]}}" for k in mods)
    lines.append(row + (f" {afv.get(split, 0):>16}" if afv else ""))
  if m.get("empty_splits"):
    lines.append(f"  splits left out (no usable item): {', '.join(m['empty_splits'])}")

  faults = m.get("faults", {})
  lines += ["", "faults (items; the modality is absent from those records)" if faults
            else "faults: none"]
  for modality, reasons in faults.items():
    for reason, r in reasons.items():
      lines.append(f"  {modality + ':' + reason:<28} {r.get('count', '?'):>6}  "
                   f"e.g. {', '.join(map(str, r.get('examples', [])))}")
  skipped = m.get("skipped", {})
  lines.append("skipped items (not written)" if skipped else "skipped items: none")
  for reason, r in skipped.items():
    lines.append(f"  {reason:<28} {r.get('count', '?'):>6}  "
                 f"e.g. {', '.join(map(str, r.get('examples', [])))}")

  lines.append("")
  if "num_categories" in m:
    lines.append(f"categories {m['num_categories']} ({m.get('labels_seen')} seen in labels), "
                 f"fine groups {m.get('fine_groups')}")
  if m.get("splits_files"):
    lines.append("id lists: " + ", ".join(f"{k} {_n(v)}" for k, v in m["splits_files"].items()))
  conv = m.get("conversion", {})
  if conv:
    lines.append("conversion:")
    line = " "
    for item in (f"{k} {v}" for k, v in conv.items()):
      if len(line) + len(item) > 98:
        lines.append(line.rstrip(","))
        line = " "
      line += f" {item},"
    lines.append(line.rstrip(","))
  known = {"record_version", "dataset_dir", "tokenizer", "items_in", "items_written", "splits",
           "presence", "audio_from_video", "empty_splits", "faults", "skipped", "num_categories",
           "labels_seen", "fine_groups", "splits_files", "conversion"}
  for k, v in m.items():
    if k not in known:
      text = repr(v)
      lines.append(f"{k}: {text if len(text) <= 200 else text[:197] + '...'}")
  return "\n".join(lines)


# --- records -------------------------------------------------------------------------------
def record_text(index: int, r: dict, conv: dict, tok: Tokenizer | None, sp: Any) -> str:
  """One decoded record, field by field, with its title tokenized."""
  label = r.get("label", -1)
  group = _s(r.get("fine_group", b""))
  group_text = f"{group} (id {r.get('fine_group_id')})" if group else "none"
  lines = [f"[{index}] item {_s(r.get('item_id', b'?'))}  label {label}"
           f"{' (unknown)' if label == -1 else ''}  fine group {group_text}"]
  title = _s(r.get("title", b""))
  lines.append(f"  title: {title!r}" if title else "  title: (none)")
  if title and tok is not None:
    ids = tok.encode(title.strip())
    pieces = [sp.id_to_piece(i) for i in ids] if sp is not None else []
    more = f" ... (+{len(ids) - 24})" if len(ids) > 24 else ""
    lines.append(f"  title tokens ({len(ids)}): " + " | ".join(pieces[:24]) + more)
    lines.append(f"  title ids: {ids[:24]}{more}")
  keys, values = r.get("table_keys", []), r.get("table_values", [])
  if keys:
    lines.append(f"  table ({len(keys)} pairs): " + "; ".join(
        f"{_s(k)}: {_s(v)}" for k, v in zip(keys, values)))
  else:
    lines.append("  table: (none)")
  image, video = r.get("image", []), r.get("video", [])
  lines.append(f"  image: {_shape(np.asarray(image[0])) if _n(image) else '(none)'}")
  lines.append(f"  video: {_n(video)} frames of {list(np.asarray(video[0]).shape)}" if _n(video)
               else "  video: (none)")
  audio = np.asarray(r.get("audio", np.zeros((0, 0))))
  if audio.shape[0]:
    a = audio.astype(np.float32)
    lines.append(f"  audio: log-mel {audio.dtype} {list(audio.shape)} = "
                 f"{_audio_seconds(audio.shape[0], conv):.2f} s, values {a.min():.1f} .. {a.max():.1f}")
  else:
    lines.append("  audio: (none)")
  faults = r.get("faults", [])
  lines.append(f"  faults: {', '.join(_s(f) for f in faults) if _n(faults) else 'none'}")
  for k, v in extra_fields(r).items():
    lines.append(f"  {k}: {_shape(v)}")
  return "\n".join(lines)


def _present(r: dict) -> dict[str, bool]:
  return {"text": bool(_s(r.get("title", b"")).strip()), "table": _n(r.get("table_keys")) > 0,
          "image": _n(r.get("image")) > 0, "video": _n(r.get("video")) > 0,
          "audio": np.asarray(r.get("audio", np.zeros((0, 0)))).shape[0] > 0}


def pick_for_sheet(src: Any, order: np.ndarray, num: int) -> list[tuple[int, dict]]:
  """`num` records of a seeded sample of 4x as many (at least 32), most modalities first.

  Full rows show the most per row; the sample is kept small (each record
  decodes its JPEGs) and ties keep the seeded order, so a set where few
  products have every modality still shows some rows with absent ones.
  """
  pool = [(int(i), src[int(i)]) for i in order[:min(len(order), max(4 * num, 32))]]
  ranked = sorted(enumerate(pool), key=lambda p: (-sum(_present(p[1][1]).values()), p[0]))
  return [p for _, p in ranked[:num]]


# --- contact sheet -------------------------------------------------------------------------
def find_cjk_font() -> str | None:
  """A font family matplotlib knows that has CJK glyphs, or None."""
  from matplotlib import font_manager, ft2font
  by_name: dict[str, str] = {}
  for f in font_manager.fontManager.ttflist:
    by_name.setdefault(f.name, f.fname)

  def has_cjk(path: str) -> bool:
    try:
      font = ft2font.FT2Font(path)
      return all(font.get_char_index(ord(c)) for c in "中文品牌")
    except Exception:  # pylint: disable=broad-except  (unreadable or unsupported font file)
      return False

  for name in CJK_FONTS:
    if name in by_name and has_cjk(by_name[name]):
      return name
  for name, path in sorted(by_name.items()):
    if any(w in name for w in ("CJK", "Han", "Hei", "Ming", "Song", "Kai", "Gothic", "Fallback")) \
        and has_cjk(path):
      return name
  return None


def _width(text: str) -> int:
  return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
  """Greedy wrap by display width (CJK characters count 2); words longer than a line are cut."""
  lines, cur = [], ""
  for word in text.split(" "):
    while _width(word) > width:
      room = width - _width(cur) - (1 if cur else 0)
      if room < 4 and cur:
        lines.append(cur)
        cur, room = "", width
      cut = 0
      while cut < len(word) and _width(word[:cut + 1]) <= room:
        cut += 1
      cut = max(cut, 1)  # A character wider than the line still moves on.
      lines.append((cur + " " if cur else "") + word[:cut])
      cur, word = "", word[cut:]
    cand = (cur + " " if cur else "") + word
    if _width(cand) > width and cur:
      lines.append(cur)
      cur = word
    else:
      cur = cand
  if cur:
    lines.append(cur)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:max(0, len(lines[-1]) - 2)] + " …"
  return lines


def _mosaic(frames: Sequence[np.ndarray], cols: int, rows: int, gap: int = 2) -> np.ndarray:
  """Frames tiled left to right, top to bottom, on white, `gap` pixels apart."""
  h, w = np.asarray(frames[0]).shape[:2]
  out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
  for k, f in enumerate(frames[:rows * cols]):
    f = np.asarray(f)
    if f.shape[:2] != (h, w):  # Frames of one record share a size; be lenient anyway.
      f = np.asarray(_resize(f, h, w))
    y, x = divmod(k, cols)
    out[y * (h + gap): y * (h + gap) + h, x * (w + gap): x * (w + gap) + w] = f[..., :3]
  return out


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def _absent(ax: Any, what: str, reasons: list[str]) -> None:
  ax.set_facecolor("#eeeeee")
  ax.text(0.5, 0.5, f"no {what}" + ("\n" + "\n".join(reasons) if reasons else ""),
          ha="center", va="center", fontsize=9, color="#b00000" if reasons else "#666666",
          transform=ax.transAxes)


def _bare(ax: Any) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


def row_text(r: dict) -> str:
  """The text column of one sheet row (also printed, for terminals and fontless machines)."""
  title = _s(r.get("title", b"")).strip() or "(no title)"
  pairs = "  ·  ".join(f"{_s(k)}: {_s(v)}" for k, v in zip(r.get("table_keys", []),
                                                          r.get("table_values", [])))
  return f"{title}\n{pairs or '(no table)'}"


def write_contact_sheet(path: str, rows: list[tuple[int, dict]], m: dict, data_dir: str,
                        split: str) -> str | None:
  """Writes the PNG; returns the CJK font used (None: text drawn without one)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  conv = m.get("conversion", {})
  max_frames = conv.get("max_frames", "?")
  shown = max([_n(r.get("video")) for _, r in rows] + [1])  # Tiles fit the longest video shown.
  tile_cols = min(shown, 6)
  tile_rows = math.ceil(shown / tile_cols)
  # One time axis for all rows (the longest clip shown, whole seconds): lengths compare at a glance.
  max_sec = math.ceil(max([_audio_seconds(np.asarray(r.get("audio", np.zeros((0, 0)))).shape[0],
                                          conv) for _, r in rows] + [1.0]))
  font = find_cjk_font()
  rc = {"font.family": ["DejaVu Sans", font] if font else ["DejaVu Sans"], "font.size": 9}
  ratios = [1.2, 1.0, 0.95 * tile_cols / tile_rows, 2.0, 4.2]
  row_h = 1.55
  height = row_h * len(rows) + 0.6
  bold = {"fontweight": "bold", "family": "DejaVu Sans"}  # CJK fonts here have no bold face.
  with plt.rc_context(rc), warnings.catch_warnings():
    if font is None:  # Every missing glyph would warn; the text is printed to stdout instead.
      warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
    fig, axes = plt.subplots(len(rows), 5, figsize=(row_h * sum(ratios), height),
                             gridspec_kw={"width_ratios": ratios, "hspace": 0.35, "wspace": 0.08},
                             squeeze=False)
    heads = ["product", "image", f"video (1 fps, up to {max_frames} frames)",
             "audio log-mel (x: s, y: mel bin)",
             "title / table" + ("" if font else "   (no CJK font here: see stdout)")]
    for ax, h in zip(axes[0], heads):
      ax.set_title(h, fontsize=11, loc="left", **bold)
    for (index, r), ax in zip(rows, axes):
      faults = [_s(f) for f in r.get("faults", [])]
      by_mod = {mod: [f.split(":", 1)[-1] for f in faults if f.startswith(mod + ":")]
                for mod in ("text", "table") + MEDIA}
      for a in ax:
        _bare(a)
      # Product label.
      label = r.get("label", -1)
      group = _s(r.get("fine_group", b""))
      info = [f"{_s(r.get('item_id', b'?'))}", f"label {label}" + (" (?)" if label == -1 else ""),
              f"#{index} of {split}"] + ([f"group {group}"] if group else [])
      ax[0].axis("off")
      ax[0].text(0.0, 0.95, info[0], fontsize=11, va="top", transform=ax[0].transAxes, **bold)
      ax[0].text(0.0, 0.75, "\n".join(info[1:]), fontsize=9.5, va="top", linespacing=1.4,
                 transform=ax[0].transAxes)
      pres = _present(r)
      missing = [k for k, v in pres.items() if not v]
      ax[0].text(0.0, 0.0, "missing: " + ", ".join(missing) if missing else "all 5 modalities",
                 fontsize=8.5, va="bottom", color="#b00000" if missing else "#307030",
                 transform=ax[0].transAxes)
      # Image.
      if pres["image"]:
        ax[1].imshow(np.asarray(r["image"][0]), interpolation="nearest")
      else:
        ax[1].set_box_aspect(1)
        _absent(ax[1], "image", by_mod["image"])
      # Video.
      if pres["video"]:
        frames = list(r["video"])
        ax[2].imshow(_mosaic(frames, tile_cols, tile_rows), interpolation="nearest")
        ax[2].set_xlabel(f"{len(frames)} frame{'s' if len(frames) > 1 else ''}", fontsize=8,
                         labelpad=1)
      else:
        ax[2].set_box_aspect(tile_rows / tile_cols)
        _absent(ax[2], "video", by_mod["video"])
      # Audio.
      audio = np.asarray(r.get("audio", np.zeros((0, 0))), np.float32)
      if pres["audio"]:
        sec = _audio_seconds(audio.shape[0], conv)
        ax[3].imshow(audio.T, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                     extent=(0, sec, 0, audio.shape[1]))
        ax[3].set_xlim(0, max_sec)
        ax[3].set_facecolor("#eeeeee")
        ax[3].set_xticks(range(0, max_sec + 1, max(1, max_sec // 6)))
        ax[3].tick_params(labelsize=7, length=2, pad=1)
        ax[3].set_xlabel(f"{sec:.1f} s ({audio.shape[0]} x {audio.shape[1]})", fontsize=8,
                         labelpad=1)
      else:
        _absent(ax[3], "audio", by_mod["audio"])
      # Text.
      ax[4].axis("off")
      width = int(ratios[4] * row_h * 72 / 9.5 * 1.85)  # Latin characters per line at 9.5 pt.
      title, table = row_text(r).split("\n", 1)
      t_lines = _wrap(title, width, 2)
      tb_lines = _wrap(table, width, 6 - len(t_lines))
      extra = [f"{k} {_shape(v)}" for k, v in extra_fields(r).items()]
      ax[4].text(0.0, 0.97, "\n".join(t_lines), fontsize=11, va="top", linespacing=1.25,
                 transform=ax[4].transAxes, color="#666666" if not pres["text"] else "black")
      ax[4].text(0.0, 0.95 - 0.16 * len(t_lines), "\n".join(tb_lines), fontsize=9.5, va="top",
                 linespacing=1.3, transform=ax[4].transAxes,
                 color="#666666" if not pres["table"] else "#1a1a80")
      if faults:
        ax[4].text(0.0, 0.17 if extra else 0.0, "faults: " + ", ".join(faults), fontsize=8.5,
                   va="bottom", color="#b00000", transform=ax[4].transAxes)
      if extra:
        ax[4].text(0.0, 0.0, "\n".join(_wrap("; ".join(extra), int(width * 1.15), 1)),
                   fontsize=8, va="bottom", color="#707070", transform=ax[4].transAxes)
    fig.suptitle(f"{data_dir}: {len(rows)} products of split '{split}'",
                 x=0.01, y=1.0 - 0.12 / height, ha="left", va="top", fontsize=12, **bold)
    fig.subplots_adjust(left=0.01, right=0.995, bottom=0.15 / height, top=1.0 - 0.62 / height)
    for k in range(1, len(rows)):  # A rule between rows.
      y = (axes[k - 1][1].get_position().y0 + axes[k][1].get_position().y1) / 2
      fig.add_artist(plt.Line2D([0.01, 0.995], [y - 0.06 / height] * 2, color="#cccccc", lw=0.8))
    fig.savefig(path, dpi=100, facecolor="white")
    plt.close(fig)
  return font


# --- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("data", metavar="DATA", help="A converted dataset (tools/convert_m5product.py).")
  p.add_argument("--split", default="train", help="Split to read records from.")
  p.add_argument("--num", type=int, default=4, help="Records to print decoded.")
  p.add_argument("--contact_sheet", default=None,
                 help="PNG to write (default DATA/contact_sheet.png).")
  p.add_argument("--num_sheet", type=int, default=12, help="Products on the sheet (0: no sheet).")
  p.add_argument("--seed", type=int, default=0, help="Picks the records printed and drawn.")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the manifest and records, writes the sheet; returns the exit status."""
  args = parse_args(argv)
  try:
    m = convert.load_manifest(args.data)
  except (FileNotFoundError, ValueError, OSError) as e:  # Not a (readable, current) dataset.
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(manifest_text(args.data, m))
  if args.split not in m.get("splits", {}):
    print(f"error: {args.data} has no split {args.split!r}; its splits are "
          f"{', '.join(m.get('splits', {})) or '(none)'}", file=sys.stderr)
    return 2
  src = convert.open_split(args.data, args.split)
  order = np.random.default_rng(args.seed).permutation(len(src))
  tok_path = os.path.join(args.data, m.get("tokenizer", convert.TOKENIZER))
  tok = sp = None
  try:
    tok = Tokenizer(tok_path)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tok_path)  # For piece names (Tokenizer gives ids).
  except (OSError, ValueError, RuntimeError) as e:
    print(f"(tokenizer not usable: {e})")
  conv = m.get("conversion", {})
  print(f"\n{len(src)} records in split {args.split!r}"
        + (f"; tokenizer {tok.vocab_size} pieces" if tok else "")
        + f"; {min(args.num, len(src))} of them (seed {args.seed}):")
  for i in order[:args.num]:
    print(record_text(int(i), src[int(i)], conv, tok, sp))

  if args.num_sheet > 0 and len(src):
    path = args.contact_sheet or os.path.join(args.data, "contact_sheet.png")
    rows = pick_for_sheet(src, order, args.num_sheet)
    print(f"\ncontact sheet rows ({len(rows)} of a seeded sample, most modalities first):")
    for index, r in rows:
      missing = [k for k, v in _present(r).items() if not v]
      pres = "no " + "+".join(missing) if missing else "all 5"
      faults = [_s(f) for f in r.get("faults", [])]
      print(f"  #{index:<6} {_s(r.get('item_id', b'?')):<14} label {r.get('label', -1):<4} "
            f"{pres:<16}" + row_text(r).replace("\n", "  |  ")
            + (f"  [faults: {', '.join(faults)}]" if faults else ""))
    try:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      font = write_contact_sheet(path, rows, m, args.data, args.split)
    except OSError as e:
      print(f"error: cannot write the contact sheet {path}: {e}", file=sys.stderr)
      return 1
    note = (f"CJK font {font!r}" if font else
            "no CJK font found (install e.g. fonts-noto-cjk): Chinese text is drawn as boxes; "
            "it is printed above")
    print(f"wrote {path} ({note})")
  return 0


if __name__ == "__main__":
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS: "OpenCV is not installed ...".
  sys.exit(main())
