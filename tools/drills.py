r"""Runs issue 16's fault drills on the tiny config: a table drill / expected / observed / verdict.

  python tools/drills.py [--root=/tmp/m5p_drills] [--only=sigterm,diverging] [--fast]
  python tools/drills.py --kills=20 [--seed=0]    # SIGKILL at random moments, then resume
  python tools/drills.py --list

Each drill runs `python -m m5p.main` (one CPU device) or the converter as a new user
would, breaks something, and checks the README's "Reliability" promise for it
(m5p.drills). --fast runs only the drills that train nothing (what CI runs, with more,
in tests/test_drills.py). Exit status 0 when every drill holds.
"""
import textwrap
import time

from absl import app, flags
from absl import logging as absl_logging

from m5p import drills

flags.DEFINE_string("root", "/tmp/m5p_drills", "Work folder (dataset, runs, compile cache).")
flags.DEFINE_string("cache_dir", None, "Persistent JAX compilation cache (default: under --root).")
flags.DEFINE_list("only", [], "Drill names to run (default: all; --list shows them).")
flags.DEFINE_bool("fast", False, "Only the drills that train nothing.")
flags.DEFINE_integer("kills", 0, "Instead of the drills: SIGKILL a run this many times.")
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_bool("list", False, "List the drills and exit.")
FLAGS = flags.FLAGS

WIDTHS = (34, 44, 62, 7)


def _row(cells) -> str:
  wrapped = [textwrap.wrap(str(c), w) or [""] for c, w in zip(cells, WIDTHS)]
  lines = []
  for k in range(max(map(len, wrapped))):
    lines.append(" | ".join((col[k] if k < len(col) else "").ljust(w)
                            for col, w in zip(wrapped, WIDTHS)).rstrip())
  return "\n".join(lines)


def _print_result(r: drills.Result) -> None:
  print(_row((r.name, r.expected, r.observed, "holds" if r.holds else "FAILS")), flush=True)
  print("-" * (sum(WIDTHS) + 9), flush=True)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS chatter would break the table.
  if FLAGS.list:
    for name, (_, fast) in drills.DRILLS.items():
      print(f"{name}{'  (fast)' if fast else ''}")
    return 0
  lab = drills.Lab(FLAGS.root, FLAGS.cache_dir)
  t0 = time.time()
  if FLAGS.kills:
    print(f"{FLAGS.kills} SIGKILLs of a {drills.KILL_STEPS}-step run with async checkpoints every "
          "3 steps, each followed by a resume (work folder "
          f"{FLAGS.root}):", flush=True)

    def show(r: dict) -> None:
      if r["kill"] == "finish":
        print(f"  finish from step {r['resumed_from']:>2}: exit {r['exit']}, {r['detail']}, "
              f"{'each step once' if r['each_step_once'] else 'steps NOT once each'}", flush=True)
        return
      print(f"  kill {r['kill']:>2}: {r['how']:<22} resumed from step {r['resumed_from']:>2}, "
            f"killed at step {r['killed_at_step']:>2}"
            f"{' during a save' if r['during_save'] else ''}; rows so far: {r['detail']}",
            flush=True)

    records, ok = drills.kills(lab, FLAGS.kills, FLAGS.seed, on_kill=show)
    killed = [r for r in records if r["kill"] != "finish"]
    print(f"{sum(r['rows_equal'] for r in killed)} of {len(killed)} kills left rows equal to the "
          f"uninterrupted run's; {sum(r['during_save'] for r in killed)} during an async save; "
          f"{sum(r['kill'] == 'finish' for r in records)} chains finished; "
          f"{'all resumes equal, each step once' if ok else 'FAILS'} ({time.time() - t0:.0f} s)")
    return 0 if ok else 1
  names = FLAGS.only or [n for n, (_, fast) in drills.DRILLS.items() if fast or not FLAGS.fast]
  unknown = [n for n in names if n not in drills.DRILLS]
  if unknown:
    raise app.UsageError(f"unknown drills {unknown}; --list shows them")
  print(_row(("drill", "expected", "observed", "verdict")))
  print("=" * (sum(WIDTHS) + 9), flush=True)
  results = drills.run_drills(lab, names, on_result=_print_result)
  held = sum(r.holds for r in results)
  print(f"{held} of {len(results)} drills hold ({time.time() - t0:.0f} s)")
  return 0 if held == len(results) else 1


if __name__ == "__main__":
  app.run(main)
