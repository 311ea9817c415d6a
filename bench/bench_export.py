#!/usr/bin/env python3
"""Exporter benchmark, default outputs (CSV + JSON history), against the
naive floor measured in the same run.

  python ../shared/bench/gen_big_wandb.py 300000 /tmp/big 0 --kind dynamics
  python bench/bench_export.py /tmp/big/wandb/offline-run-*/run-*.wandb [--repeat 3] [--slope]

Variants, each a fresh process (imports included, as a user sees it),
interleaved so machine noise hits all alike:
  (a) scripts/export_local_wandb_history.py FILE --out-dir OUT  (defaults: csv,json)
  (b) the naive floor: framing + Record.FromString + json.loads per value into
      row dicts + pandas to_csv (bench/naive_export.py)
  (c) reading the file's bytes once
Prints medians of wall time and peak RSS, and (a)/(b) (target <= 0.4, peak
RSS of (a) <= 300 MB). --slope also exports the first 1/4, 1/2 and all of
the file (cut at block boundaries) and reports peak RSS against size.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import measure  # noqa: E402
from twdiag.wandb_log import BLOCK  # noqa: E402  (cuts fall on block boundaries)

VARIANTS = {
    "a_twdiag_export_default": lambda f, out: [sys.executable, str(ROOT / "scripts" / "export_local_wandb_history.py"),
                                               f, "--out-dir", out, "--source", "local"],
    "b_naive_floor_csv": lambda f, out: [sys.executable, str(ROOT / "bench" / "naive_export.py"), f,
                                         str(Path(out) / "naive.csv")],
    "c_raw_read": lambda f, out: [sys.executable, "-c", f"open({f!r},'rb').read()"],
}


def slope(path: str) -> None:
    data = Path(path).read_bytes()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for frac in (0.25, 0.5, 1.0):
            cut = len(data) if frac == 1.0 else int(len(data) * frac) // BLOCK * BLOCK
            part = Path(tmp) / f"p{frac}" / "wandb" / "offline-run-20261128_000000-slope000" / "run-slope000.wandb"
            part.parent.mkdir(parents=True)
            part.write_bytes(data[:cut])
            t, rss = measure(VARIANTS["a_twdiag_export_default"](str(part), str(Path(tmp) / f"o{frac}")))
            points.append((cut / 1e6, rss))
            print(f"  {cut / 1e6:7.1f} MB file: peak RSS {rss:6.0f} MB ({t:.1f} s)")
    (x0, y0), (x1, y1) = points[0], points[-1]
    print(f"RSS slope: {(y1 - y0) / (x1 - x0):.2f} MB of RSS per MB of .wandb "
          f"(intercept ~{y0 - (y1 - y0) / (x1 - x0) * x0:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wandb_file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slope", action="store_true")
    args = ap.parse_args()
    results = {k: [] for k in VARIANTS}
    for _ in range(args.repeat):
        for name, make in VARIANTS.items():
            with tempfile.TemporaryDirectory() as out:
                results[name].append(measure(make(args.wandb_file, out)))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v))
           for k, v in results.items()}
    for name, (t, rss) in med.items():
        print(f"{name:26s} median {t:7.2f} s   peak RSS {rss:7.0f} MB   runs {[round(x, 2) for x, _ in results[name]]}")
    a, b = med["a_twdiag_export_default"], med["b_naive_floor_csv"]
    print(f"ratio (a)/(b) time {a[0] / b[0]:.3f} (target <= 0.4); peak RSS (a) {a[1]:.0f} MB (target <= 300)")
    if args.slope:
        slope(args.wandb_file)


if __name__ == "__main__":
    main()
