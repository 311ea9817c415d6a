#!/usr/bin/env python3
"""Benchmark: compare_runs on two 300k-step runs vs exporting them.

Uses the 300,000-step dynamics file from
  python ../shared/bench/gen_big_wandb.py 300000 /tmp/big 0 --kind dynamics
(and, if given, a second one; otherwise the same file is linked into a
second bundle, which costs the same to decode). Times, interleaved, REPEATS
times, each as a fresh process:
  (a) scripts/compare_runs.py A --baseline B --out-dir OUT
  (b) scripts/export_local_wandb_history.py A B --out-dir OUT2  (CSV+JSON, the default)
Prints medians and a/b (target < 2).

    python bench/bench_compare.py [RUN_DIR_A] [RUN_DIR_B] [REPEATS=3]
"""
from __future__ import annotations

import glob
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timed  # noqa: E402


def bundle(run_dir: Path, target: Path) -> Path:
    (target / "wandb").mkdir(parents=True, exist_ok=True)
    link = target / "wandb" / run_dir.name
    if not link.exists():
        link.symlink_to(run_dir)
    return target


def main() -> None:
    found = sorted(glob.glob("/tmp/big/wandb/offline-run-*"))
    a_run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(found[-1])
    b_run = Path(sys.argv[2]) if len(sys.argv) > 2 else a_run
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    a_b, b_b = bundle(a_run, Path("/tmp/bench_cmp/current")), bundle(b_run, Path("/tmp/bench_cmp/baseline"))
    out = Path(tempfile.mkdtemp(prefix="bench_cmp_"))
    a, b = [], []
    for _ in range(repeats):
        a.append(timed("compare_runs.py", str(a_b), "--baseline", str(b_b), "--out-dir", str(out / "c")))
        b.append(timed("export_local_wandb_history.py", str(a_b), str(b_b), "--out-dir", str(out / "e")))
    doc = json.loads((out / "c" / "compare.json").read_text())
    drift = doc["stages"]["dynamics"]["drift"]
    med = statistics.median
    print(json.dumps({"a_compare_s": round(med(a), 3), "b_export_both_s": round(med(b), 3),
                      "ratio_a_over_b": round(med(a) / med(b), 4), "target_ratio": 2.0,
                      "common_steps": drift["common_steps"], "windows": drift["windows"],
                      "runs_a": [round(x, 3) for x in a], "runs_b": [round(x, 3) for x in b]}, indent=2))


if __name__ == "__main__":
    main()
