#!/usr/bin/env python3
"""Benchmark: scanning many bundles, and one query.

Copies the three example bundles into N timestamped folders (N=20 by
default), then, in one run:
  (a) `scan_bundles.py ROOT --out OUT --workers 2`, from an empty OUT;
  (b) N serial `diagnose.py BUNDLE --out-dir ...` processes (the baseline);
  (c) the same scan again, nothing changed (target <= 0.05 x (a));
Prints a/b (target <= 0.6), c/a, and the peak RSS of one scan worker
against one diagnose's (target: within it).

With --query BUNDLE (a writable bundle holding e.g. the 300k-step log):
  (d) `query.py BUNDLE "SELECT step, \"train/loss\" FROM history WHERE
      stage='dynamics' AND step BETWEEN 1000 AND 2000"`, after
  (e) `diagnose.py BUNDLE` (its default output dir, where it saves the
      tables), against (e) (target d/e <= 0.3); and the same query before
      any diagnose (decoded on the fly), for reference.

    python bench/bench_scan.py [N=20] [--query BUNDLE]
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, measure  # noqa: E402

EXAMPLES = ROOT / "examples"


def build(n: int, root: Path) -> list[Path]:
    names = ["bundle-healthy", "bundle-unhealthy", "bundle-weak-tokenizer"]
    out = []
    for i in range(n):
        dst = root / f"202611{(i % 28) + 1:02d}_{100000 + i:06d}"
        shutil.copytree(EXAMPLES / names[i % 3], dst, ignore=shutil.ignore_patterns("docs"))
        out.append(dst)
    return out


def main() -> None:
    argv = sys.argv[1:]
    query_bundle = None
    if "--query" in argv:
        i = argv.index("--query")
        query_bundle = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    n = int(argv[0]) if argv else 20
    work = Path(tempfile.mkdtemp(prefix="bench_scan_"))
    bundles = build(n, work / "root")
    py = sys.executable
    t_scan, rss_scan = measure([py, ROOT / "scripts" / "scan_bundles.py", work / "root", "--out", work / "out",
                                "--workers", "2"])
    serial, rss_diag = 0.0, 0.0
    for b in bundles:
        t, r = measure([py, ROOT / "scripts" / "diagnose.py", b, "--out-dir", work / "d" / b.name])
        serial += t
        rss_diag = max(rss_diag, r)
    t_again, _ = measure([py, ROOT / "scripts" / "scan_bundles.py", work / "root", "--out", work / "out"])
    doc = {"bundles": n, "scan_2_workers_s": round(t_scan, 2), "serial_diagnose_s": round(serial, 2),
           "ratio_scan_over_serial": round(t_scan / serial, 3), "target": 0.6,
           "unchanged_rescan_s": round(t_again, 2), "ratio_rescan_over_scan": round(t_again / t_scan, 3),
           "target_rescan": 0.05,
           # the scan's peak is its largest process: the parent or one worker (RUSAGE_CHILDREN)
           "scan_peak_rss_mb": round(rss_scan, 1), "one_diagnose_peak_rss_mb": round(rss_diag, 1)}
    if query_bundle:
        sql = "SELECT step, \"train/loss\" FROM history WHERE stage='dynamics' AND step BETWEEN 1000 AND 2000"
        t_q0, _ = measure([py, ROOT / "scripts" / "query.py", query_bundle, sql])  # nothing saved yet: decodes
        t_d, _ = measure([py, ROOT / "scripts" / "diagnose.py", query_bundle])  # default out dir: saves the tables
        t_q, _ = measure([py, ROOT / "scripts" / "query.py", query_bundle, sql])  # from the saved tables
        doc.update(query_after_diagnose_s=round(t_q, 2), diagnose_s=round(t_d, 2),
                   ratio_query_over_diagnose=round(t_q / t_d, 3), target_query=0.3,
                   query_before_any_diagnose_s=round(t_q0, 2))
    print(json.dumps(doc, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
