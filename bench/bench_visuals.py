#!/usr/bin/env python3
"""Benchmark: visual analysis + contact sheet vs plain Pillow decode.

Draws a few real TinyWorlds-layout figures (2373x1216, matplotlib) and copies
them to N files in a stage's visualizations/ dir, then times, interleaved,
REPEATS times in this process:
  (a) plain decode: Image.open(...).load() of every file;
  (b) visuals.analyse(): decode, panels, grid sampling, metrics, findings,
      trend and the contact sheet.
Prints medians and (b - a) / N, the work per image beyond decoding
(target <= 20 ms).

    python bench/bench_visuals.py [N=200] [DIR=/tmp/bench_visuals] [REPEATS=3]
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from twdiag import bundle, rules, synth, visuals  # noqa: E402


def build(target: Path, n: int) -> Path:
    vis = target / "results" / synth.TS / "dynamics" / "visualizations"
    if vis.is_dir() and len(list(vis.glob("*.png"))) == n:
        return vis
    vis.mkdir(parents=True, exist_ok=True)
    protos = []
    for i, kind in enumerate(("good", "texture", "blurry", "flat", "stripes")):
        o = synth.pong_frames(16, seed=i)
        protos.append(synth.write_grid_png(target / f"proto_{i}.png", synth.masked(o, seed=i),
                                           synth.predictions(kind, o, seed=i)))
    for k in range(n):
        shutil.copy(protos[k % len(protos)], vis / f"dynamics_prediction_step_{k * 250}.png")
    return vis


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/bench_visuals")
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    vis = build(target, n)
    files = sorted(vis.glob("*.png"))
    th = rules.load_thresholds()
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for f in files:
            with Image.open(f) as im:
                im.load()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = visuals.analyse(bundle.discover([vis.parent]), th)
        drawn = visuals.sheet(res, th)
        b.append(time.perf_counter() - t)
    ma, mb = statistics.median(a), statistics.median(b)
    st = res["doc"]["stages"]["dynamics"]
    print(json.dumps({"images": n, "size": st["latest"]["size"],
                      "a_plain_decode_s": round(ma, 3), "b_analyse_with_sheet_s": round(mb, 3),
                      "decode_ms_per_image": round(1000 * ma / n, 2),
                      "work_beyond_decode_ms_per_image": round(1000 * (mb - ma) / n, 2),
                      "target_ms": 20, "sheet_built": drawn is not None,
                      "runs_a": [round(x, 3) for x in a], "runs_b": [round(x, 3) for x in b]},
                     indent=2))


if __name__ == "__main__":
    main()
