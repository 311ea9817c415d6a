#!/usr/bin/env python3
"""stage_stats analysis time vs pandas reading the same table.

  python bench/bench_export.py ...   # or: twdiag export BIG.wandb --out-dir /tmp/x
  python bench/bench_stats.py /tmp/x/dynamics_history_*_latest.csv [--repeat 5]

Reports the median of pandas `read_csv` (baseline), our table read, and the
analysis alone, with the analysis/baseline ratio (target < 3).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from twdiag import bundle, logs, rules, stats  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    thresholds = rules.load_thresholds()
    base, ours, analysis = [], [], []
    for _ in range(args.repeat):
        base.append(timed(lambda: pd.read_csv(args.table))[0])
        t, hist = timed(lambda: logs.load(bundle.discover([Path(args.table)]), progress=lambda m: None))
        ours.append(t)
        (merged,) = hist.values()
        analysis.append(timed(lambda: stats.analyse_stage(merged, thresholds))[0])
    b, o, a = (statistics.median(x) for x in (base, ours, analysis))
    rows = len(merged.frame)
    print(f"rows {rows}: pandas read_csv {b:.3f} s | our read {o:.3f} s | analysis {a:.3f} s")
    print(f"ratio analysis / pandas read {a / b:.2f} (target < 3)")


if __name__ == "__main__":
    main()
