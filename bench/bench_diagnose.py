#!/usr/bin/env python3
"""Benchmark: how long an answer takes.

Default (the answer-in-two-seconds target): a fresh `diagnose.py` of the
unhealthy example bundle against the yardstick `python -c "import numpy,
pandas, PIL.Image"`, interleaved, REPEATS times each, in one run; prints
the medians, their ratio (target <= 3) and diagnose's peak RSS (target
<= 250 MiB):

    python bench/bench_diagnose.py [--repeat N] [--against OLD_CHECKOUT] [BUNDLE]

Both sides run with compiled bytecode cached, as after `pip install` or
any earlier run (a private PYTHONPYCACHEPREFIX, warmed by one untimed run
each): an environment with PYTHONDONTWRITEBYTECODE would otherwise compile
twdiag's 13k lines on every run (about 0.2 s) while the yardstick's
packages are cached. `--against DIR` also times DIR/scripts/diagnose.py
(e.g. a `git worktree` of an older commit) in the same interleaved loop.

With --big: diagnose.py vs the step scripts it combines, run alone.
Assembles (with symlinks, nothing copied) a bundle holding a 300,000-step
dynamics .wandb file, 100 checkpoints and 200 image grids, made by:
  python ../shared/bench/gen_big_wandb.py 300000 /tmp/big 0 --kind dynamics
  python bench/bench_ckpts.py 100 50 /tmp/bench_ckpts
  python bench/bench_visuals.py 200 /tmp/bench_visuals
then times, interleaved, REPEATS times, each as a fresh process:
  (a) scripts/diagnose.py BUNDLE --out-dir OUT
  (b) scripts/stage_stats.py, scripts/check_ckpts.py and scripts/contact_sheet.py
      on the same bundle, one after another (their sum).
Prints medians and a / sum(b) (target < 2).

    python bench/bench_diagnose.py --big [BIG_WANDB_RUN_DIR] [REPEATS=3]
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, measure, timed  # noqa: E402
TS = "2026_11_28_06_35_02"


def assemble(big_run: Path, target: Path) -> Path:
    dyn = target / "results" / TS / "dynamics"
    dyn.mkdir(parents=True, exist_ok=True)
    (target / "wandb").mkdir(exist_ok=True)
    links = {dyn / "checkpoints": Path(f"/tmp/bench_ckpts/results/{TS}/dynamics/checkpoints"),
             dyn / "visualizations": Path(f"/tmp/bench_visuals/results/{TS}/dynamics/visualizations"),
             target / "wandb" / big_run.name: big_run}
    for link, src in links.items():
        if not src.exists():
            sys.exit(f"missing {src}: build it first (see the docstring)")
        if not link.exists():
            link.symlink_to(src)
    return target


def _option(argv: list[str], name: str, default=None):
    if name not in argv:
        return argv, default
    i = argv.index(name)
    return argv[:i] + argv[i + 2:], argv[i + 1]


def yardstick(argv: list[str]) -> None:
    argv, repeats = _option(argv, "--repeat", 5)
    argv, against = _option(argv, "--against")
    repeats = int(repeats)
    bundle = Path(argv[0]) if argv else ROOT / "examples" / "bundle-unhealthy"
    out = Path(tempfile.mkdtemp(prefix="bench_diag_"))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="bench_pyc_")
    commands = {"diagnose": [sys.executable, ROOT / "scripts" / "diagnose.py", bundle, "--out-dir", out],
                "yardstick": [sys.executable, "-c", "import numpy, pandas, PIL.Image"]}
    if against:
        commands["against"] = [sys.executable, Path(against) / "scripts" / "diagnose.py", bundle,
                               "--out-dir", out / "against"]
    for cmd in commands.values():  # warm the bytecode cache
        measure(cmd)
    times: dict = {k: [] for k in commands}
    rss: dict = {k: [] for k in commands}
    for _ in range(repeats):
        for k, cmd in commands.items():
            t, peak = measure(cmd)
            times[k].append(t)
            rss[k].append(peak)
    med = statistics.median
    doc = json.loads((out / "diagnosis.json").read_text())
    result = {"bundle": str(bundle), "repeats": repeats, "bytecode": "cached (PYTHONPYCACHEPREFIX, warmed)",
              "diagnose_s": round(med(times["diagnose"]), 3),
              "yardstick_import_numpy_pandas_pil_s": round(med(times["yardstick"]), 3),
              "ratio": round(med(times["diagnose"]) / med(times["yardstick"]), 3), "target_ratio": 3.0,
              "diagnose_peak_rss_mib": round(max(rss["diagnose"]), 1), "target_rss_mib": 250}
    if against:
        result.update({"against": str(against), "against_s": round(med(times["against"]), 3),
                       "against_ratio": round(med(times["against"]) / med(times["yardstick"]), 3),
                       "against_peak_rss_mib": round(max(rss["against"]), 1)})
    result["diagnose_internal_timings"] = doc["timings"]
    result["runs"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    print(json.dumps(result, indent=2))


def main() -> None:
    argv = sys.argv[1:]
    if "--big" not in argv:
        return yardstick(argv)
    argv.remove("--big")
    big = Path(argv[0]) if argv else Path(sorted(glob.glob("/tmp/big/wandb/offline-run-*"))[-1])
    repeats = int(argv[1]) if len(argv) > 1 else 3
    bundle = assemble(big, Path("/tmp/bench_bundle"))
    out = Path(tempfile.mkdtemp(prefix="bench_diag_"))
    a, b, parts = [], [], []
    for _ in range(repeats):
        a.append(timed("diagnose.py", str(bundle), "--out-dir", str(out / "d")))
        p = (timed("stage_stats.py", str(bundle)),
             timed("check_ckpts.py", str(bundle)),
             timed("contact_sheet.py", str(bundle), "--out-dir", str(out / "v")))
        parts.append(p)
        b.append(sum(p))
    med = statistics.median
    doc = json.loads((out / "d" / "diagnosis.json").read_text())
    print(json.dumps({"bundle": str(bundle), "history_rows": doc["stages"]["dynamics"]["stats"]["metrics"]["rows"],
                      "checkpoints": doc["stages"]["dynamics"]["checkpoints"]["total"],
                      "images": doc["stages"]["dynamics"]["visuals"]["images"],
                      "a_diagnose_s": round(med(a), 3), "b_sum_of_step_scripts_s": round(med(b), 3),
                      "b_parts_s": {"stage_stats": round(med(p[0] for p in parts), 3),
                                    "check_ckpts": round(med(p[1] for p in parts), 3),
                                    "contact_sheet": round(med(p[2] for p in parts), 3)},
                      "ratio_a_over_b": round(med(a) / med(b), 4), "target_ratio": 2.0,
                      "diagnose_internal_timings": doc["timings"],
                      "runs_a": [round(x, 3) for x in a], "runs_b": [round(x, 3) for x in b]}, indent=2))


if __name__ == "__main__":
    main()
