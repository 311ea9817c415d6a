#!/usr/bin/env python3
"""Follow benchmark: one --follow poll of a 300k-step live log that grew by
1,000 steps, against a fresh diagnose of the same bundle (same run).

  python ../shared/bench/gen_big_wandb.py 300000 /tmp/big 0 --kind dynamics
  python bench/bench_follow.py /tmp/big/wandb/offline-run-*/run-*.wandb [--repeat 3]

The bundle holds that log (cut 1,000 steps before its end, block-aligned, as
a live writer leaves it) and a few genuine-shaped checkpoints and grids.
  (a) a fresh `scripts/diagnose.py` of the full bundle, as a process
  (b) in one process: a Follower's first poll on the cut bundle (not timed),
      then the file grows by the last 1,000 steps, then one poll, timed
  (c) a Follower run of 100 polls, as a process, the file growing before
      each poll; its peak RSS against (a)'s, both read the same way (see
      _common.measure)
Prints medians and ratios: (b)/(a) (target <= 0.05), RSS (c)/(a) (<= 1.2).

  python bench/bench_follow.py LOG.wandb --grow [--old-tree DIR]

--grow: the attack case "--follow while the log grows by ~180 MB". The log
starts at 5% of LOG and grows to all of it over 40 polls; prints the
follower's peak RSS (process and children), for this tree and, with
--old-tree (e.g. a `git worktree` of an earlier commit), for that one,
measured in the same run (target: under 1 GB).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import measure  # noqa: E402
from twdiag.wandb_log import BLOCK  # noqa: E402  (the live cut falls on a block boundary)

POLL_ONCE = """
import json, sys, time, types
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from twdiag import follow, rules
root, log, tail = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
args = types.SimpleNamespace(deep="auto", now=None, count=None, read_outside_bundle=False)
f = follow.Follower(root, {}, None, rules.load_thresholds(), args, root / "out")
a, doc = f.poll()
before = follow.summary(doc)
with open(log, "ab") as fh:
    fh.write(tail.read_bytes())
t = time.perf_counter()
a, doc = f.poll()
changes = follow._changes(before, follow.summary(doc))
print(json.dumps({"poll_s": time.perf_counter() - t, "new_records": f.new_records, "changed": changes,
                  "rows": len(a.histories["dynamics"].frame)}))
"""

FOLLOW_100 = """
import sys, types
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from twdiag import follow, rules
root, log, tail = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]).read_bytes()
args = types.SimpleNamespace(deep="auto", now=None, count=None, read_outside_bundle=False)
f = follow.Follower(root, {}, None, rules.load_thresholds(), args, root / "out")
step = len(tail) // 100 + 1
for i in range(100):
    f.poll()
    with open(log, "ab") as fh:
        fh.write(tail[i * step:(i + 1) * step])
"""


FOLLOW_GROW = """
import sys, types
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from twdiag import follow, rules
root, log, tail = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]).read_bytes()
args = types.SimpleNamespace(deep="auto", now=None, count=None, read_outside_bundle=False)
t = rules.load_thresholds()
if len(sys.argv) > 5:  # a smaller bound than the default, to see it work on a 300k-row log
    t["limits"].update(follow_max_rows=int(sys.argv[5]), follow_window_rows=int(sys.argv[5]) // 4)
f = follow.Follower(root, {}, None, t, args, root / "out")
step = len(tail) // 40 + 1
for i in range(41):
    a, doc = f.poll()
    with open(log, "ab") as fh:
        fh.write(tail[i * step:(i + 1) * step])
print(len(a.histories["dynamics"].frame), file=sys.stderr)
"""


def grow(big: Path, work: Path, trees: dict[str, Path], max_rows: int | None) -> None:
    from twdiag import synth
    data = big.read_bytes()
    cut = int(len(data) * 0.05) // BLOCK * BLOCK
    for name, tree in trees.items():
        target = work / f"grow_{name}"
        shutil.rmtree(target, ignore_errors=True)
        log = target / "wandb" / big.parent.name / big.name
        log.parent.mkdir(parents=True)
        log.write_bytes(data[:cut])
        (target / "tail.bin").write_bytes(data[cut:])
        synth.write_checkpoint(target / "results" / synth.TS / "dynamics", "dynamics", 0)
        secs, rss = measure([sys.executable, "-c", FOLLOW_GROW, str(tree), str(target), str(log),
                             str(target / "tail.bin"), *([str(max_rows)] if max_rows else [])])
        print(json.dumps({"tree": name, "follow_max_rows": max_rows or "default", "grew_mb": round((len(data) - cut) / 1e6, 1), "polls": 41,
                          "seconds": round(secs, 1), "peak_rss_mb": round(rss, 1), "target_mb": 1000}))
        shutil.rmtree(target)


def build(big: Path, target: Path) -> tuple[Path, Path, Path]:
    """The bundle (log cut ~1,000 steps early), the log, and its missing tail."""
    from twdiag import synth
    shutil.rmtree(target, ignore_errors=True)
    data = big.read_bytes()
    per_step = len(data) / 300_000
    cut = int(len(data) - 1000 * per_step) // BLOCK * BLOCK
    log = target / "wandb" / big.parent.name / big.name
    log.parent.mkdir(parents=True)
    log.write_bytes(data[:cut])
    tail = target / "tail.bin"
    tail.write_bytes(data[cut:])
    stage = target / "results" / synth.TS / "dynamics"
    o = synth.pong_frames(16, seed=1)
    for k, step in enumerate((0, 100000, 200000)):
        synth.write_checkpoint(stage, "dynamics", step)
        synth.write_grid_png(stage / "visualizations" / f"dynamics_prediction_step_{step}.png", synth.masked(o),
                             synth.predictions("good", o, seed=k))
    return target, log, tail


def run(code: str, *args) -> str:
    return subprocess.run([sys.executable, "-c", code, str(ROOT), *map(str, args)], capture_output=True,
                          text=True, check=True).stdout


def fresh_diagnose(bundle: Path, out: Path) -> tuple[float, float]:
    return measure([sys.executable, str(ROOT / "scripts" / "diagnose.py"), str(bundle), "--out-dir", str(out)])


def follow_100(bundle: Path, log: Path, tail: Path) -> float:
    return measure([sys.executable, "-c", FOLLOW_100, str(ROOT), str(bundle), str(log), str(tail)])[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wandb_file", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--grow", action="store_true", help="the growing-log memory case (see above)")
    ap.add_argument("--old-tree", type=Path, help="--grow: also measure this source tree")
    ap.add_argument("--max-rows", type=int, help="--grow: limits.follow_max_rows for this tree's run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_follow_"))
    if args.grow:
        trees = {"this": ROOT, **({"old": args.old_tree} if args.old_tree else {})}
        grow(args.wandb_file, work, trees, args.max_rows)
        return
    a, b, c, rss_a, meta = [], [], [], [], {}
    for _ in range(args.repeat):
        bundle, log, tail = build(args.wandb_file, work / "bundle")
        full = work / "full"
        shutil.copytree(bundle, full, dirs_exist_ok=True)
        with open(full / "wandb" / log.parent.name / log.name, "ab") as fh:
            fh.write(tail.read_bytes())
        t, rss = fresh_diagnose(full, work / "out_a")
        a.append(t)
        rss_a.append(rss)
        meta = json.loads(run(POLL_ONCE, bundle, log, tail))
        b.append(meta["poll_s"])
        bundle, log, tail = build(args.wandb_file, work / "bundle")
        c.append(follow_100(bundle, log, tail))
        shutil.rmtree(full)
    med = statistics.median
    print(json.dumps({"a_fresh_diagnose_s": round(med(a), 3), "b_one_poll_s": round(med(b), 4),
                      "ratio_b_over_a": round(med(b) / med(a), 4), "target_ratio": 0.05,
                      "poll_new_records": meta.get("new_records"), "poll_changes": meta.get("changed"),
                      "rows": meta.get("rows"),
                      "a_peak_rss_mb": round(med(rss_a), 1), "c_follow_100_polls_peak_rss_mb": round(med(c), 1),
                      "rss_ratio_c_over_a": round(med(c) / med(rss_a), 3), "target_rss_ratio": 1.2,
                      "runs_a": [round(x, 3) for x in a], "runs_b": [round(x, 4) for x in b]}, indent=2))


if __name__ == "__main__":
    main()
