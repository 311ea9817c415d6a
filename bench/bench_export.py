#!/usr/bin/env python3
"""Exporter benchmark: (a) our export to CSV, (b) a naive loop, (c) raw read.

  python ../shared/bench/gen_big_wandb.py 300000 /tmp/big 0 --kind dynamics
  python bench/bench_export.py /tmp/big/wandb/offline-run-*/run-*.wandb [--repeat 3]

Each variant runs in a fresh process (imports included, as a user sees it);
wall time and peak RSS (ru_maxrss of the process and its children) are
reported as medians, with (a)/(b) ratios from the same run.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "a_twdiag_export_csv": lambda f, out: [sys.executable, str(ROOT / "scripts" / "export_local_wandb_history.py"),
                                           f, "--out-dir", out, "--format", "csv"],
    "b_naive_loop": lambda f, out: [sys.executable, str(ROOT / "bench" / "naive_export.py"), f,
                                    str(Path(out) / "naive.csv")],
    "c_raw_read": lambda f, out: [sys.executable, "-c",
                                  f"open({f!r},'rb').read()"],
}


def measure(cmd) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process tree."""
    script = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
              "subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,check=True);"
              "print(json.dumps([time.perf_counter()-t,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024]))")
    out = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wandb_file")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    results = {k: [] for k in VARIANTS}
    for _ in range(args.repeat):
        for name, make in VARIANTS.items():  # interleaved: noise hits all alike
            with tempfile.TemporaryDirectory() as out:
                results[name].append(measure(make(args.wandb_file, out)))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v))
           for k, v in results.items()}
    for name, (t, rss) in med.items():
        print(f"{name:22s} median {t:7.2f} s   peak RSS {rss:7.0f} MB")
    a, b = med["a_twdiag_export_csv"], med["b_naive_loop"]
    print(f"ratio (a)/(b) time {a[0] / b[0]:.2f} (target <= 0.6); RSS (a) {a[1]:.0f} MB (target <= 400)")


if __name__ == "__main__":
    main()
