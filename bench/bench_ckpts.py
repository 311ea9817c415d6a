#!/usr/bin/env python3
"""Benchmark: check_ckpts default mode vs torch.load of every file.

Builds N checkpoints of about SIZE_MB each (model + 2x optimizer + state.pt,
real torch.save, TinyWorlds layout), then times, interleaved, REPEATS times:
  (a) checkpoints.analyse in default mode (structure for all, deep scan of
      the newest valid), in this process;
  (b) torch.load(weights_only=True) of every model and optimizer file, in this
      process (torch imported once beforehand, so both sides time the work);
and the same two end to end as fresh subprocesses (interpreter start and the
~1 s torch import included), which also gives (a)'s own peak RSS.
Prints medians, the ratio a/b (target < 0.1) and peak RSS of (a) (target < 1 GB).

With --deep-all, (a) is the deep scan of every checkpoint (`--deep all`:
every CRC, every tensor of the model and optimizer files read with numpy
from the archive) against the same (b): target <= 0.3.

With --genuine, each model is shaped like a TinyWorlds transformer (blocks
of attention and MLP weights, biases and norms, most of them small: 274
parameters, 1,096 tensors a checkpoint) instead of 1 MiB tensors: per-tensor
costs, not bytes, then dominate both sides (torch's weights_only unpickler
is pure Python too).

    python bench/bench_ckpts.py [--deep-all] [--genuine] [N=100] [SIZE_MB=50] [DIR=/tmp/bench_ckpts] [REPEATS=3]
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A child's own peak, from /proc (VmHWM belongs to the process image, while
# ru_maxrss would carry this benchmark's RSS across the child's exec).
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
BASELINE = """
import sys, glob, torch
for f in sorted(glob.glob(sys.argv[1] + '/*/*_state_dict.pt')):
    torch.load(f, map_location='cpu', weights_only=True)
print(PEAK_KB)
""".replace("PEAK_KB", PEAK)
OURS = """
import sys, json
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from twdiag import bundle, pipeline, rules
a = pipeline.run(bundle.discover([Path(sys.argv[1])]), rules.load_thresholds(), parts=("checkpoints",),
                 progress=lambda m: None, deep=sys.argv[3])
print(json.dumps({'rss_kb': PEAK_KB,
                  'fallback': {s: f['step'] for s, f in a.fallbacks.items()},
                  'deep': {s: [c.step for c in r.checkpoints if c.deep != 'no'] for s, r in a.checkpoints.items()}}))
""".replace("PEAK_KB", PEAK)
BUILT = "built-v2"  # marks a set built by this version (v2: optimizer pickles differ)


def shapes(size_mb: float, genuine: bool) -> dict:
    """The model's parameter shapes, about size_mb / 3 MB of float32 in all."""
    floats = size_mb / 3 * 1e6 / 4
    if not genuine:  # 1 MiB tensors
        return {f"blocks.{i}.weight": (256 * 1024,) for i in range(max(1, int(floats / (256 * 1024))))}
    blocks = 17  # 17 blocks of 16 parameters, an embedding and a head: 274
    d = max(8, int((floats / blocks / 12) ** 0.5))
    out = {"embed.weight": (512, d)}
    for b in range(blocks):
        for name in ("q", "k", "v", "o"):
            out[f"blocks.{b}.attn.{name}.weight"] = (d, d)
            out[f"blocks.{b}.attn.{name}.bias"] = (d,)
        out[f"blocks.{b}.mlp.fc1.weight"], out[f"blocks.{b}.mlp.fc1.bias"] = (4 * d, d), (4 * d,)
        out[f"blocks.{b}.mlp.fc2.weight"], out[f"blocks.{b}.mlp.fc2.bias"] = (d, 4 * d), (d,)
        for ln in ("ln1", "ln2"):
            out[f"blocks.{b}.{ln}.weight"], out[f"blocks.{b}.{ln}.bias"] = (d,), (d,)
    out["head.weight"] = (512, d)
    return out


def build(target: Path, n: int, size_mb: float, genuine: bool = False) -> Path:
    import torch
    ckdir = target / "results" / "2026_11_28_06_35_02" / "dynamics" / "checkpoints"
    marker = target / (BUILT + ("-genuine" if genuine else ""))
    if ckdir.is_dir() and len(list(ckdir.iterdir())) == n and marker.is_file():
        return ckdir
    ckdir.mkdir(parents=True, exist_ok=True)
    # model : optimizer (exp_avg + exp_avg_sq) = 1 : 2 by bytes, as in AdamW.
    model = {k: torch.randn(shape) for k, shape in shapes(size_mb, genuine).items()}
    optim = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(t),
                           "exp_avg_sq": torch.rand_like(t)} for i, t in enumerate(model.values())},
             "param_groups": [{"lr": 1e-3, "params": list(range(len(model)))}]}
    for k in range(n):
        step = k * 500
        d = ckdir / f"dynamics_step_{step}"
        d.mkdir(exist_ok=True)
        torch.save(model, d / "model_state_dict.pt")
        # As in a real run, each optimizer pickle differs (its lr follows a
        # cosine schedule): identical pickles would be read once (ptfile
        # remembers reads) and flatter the scan.
        optim["param_groups"][0]["lr"] = 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * k / n)) / 2)
        torch.save(optim, d / "optim_state_dict.pt")
        torch.save({"step": step, "timestamp": f"2026_11_28_{6 + k // 60:02d}_{k % 60:02d}_00",
                    "scheduler_state_dict": {"last_epoch": step + 1}, "config": {}}, d / "state.pt")
    for old in target.glob(BUILT + "*"):
        old.unlink()
    marker.write_text("")
    return ckdir


def timed(code: str, *args: str) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return time.perf_counter() - t, r.stdout.strip()


def main() -> None:
    argv = sys.argv[1:]
    deep = "all" if "--deep-all" in argv else "auto"
    genuine = "--genuine" in argv
    argv = [x for x in argv if x not in ("--deep-all", "--genuine")]
    n = int(argv[0]) if len(argv) > 0 else 100
    size = float(argv[1]) if len(argv) > 1 else 50
    target = Path(argv[2] if len(argv) > 2 else "/tmp/bench_ckpts")
    repeats = int(argv[3]) if len(argv) > 3 else 3
    t = time.perf_counter()
    ckdir = build(target, n, size, genuine)
    total = sum(p.stat().st_size for p in ckdir.rglob("*.pt"))
    print(f"{n} checkpoints, {total / 1e9:.2f} GB on disk (built in {time.perf_counter() - t:.0f} s)",
          file=sys.stderr)
    import torch

    from twdiag import bundle, pipeline, rules
    th = rules.load_thresholds()
    files = sorted(ckdir.glob("*/*_state_dict.pt"))
    for f in files:  # warm the page cache for both sides
        torch.load(f, map_location="cpu", weights_only=True)
    a, b, ea, eb, rss = [], [], [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        res = pipeline.run(bundle.discover([ckdir]), th, parts=("checkpoints",), progress=lambda m: None, deep=deep)
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        for f in files:
            torch.load(f, map_location="cpu", weights_only=True)
        b.append(time.perf_counter() - t)
        ta, out = timed(OURS, str(ckdir), str(ROOT), deep)
        tb, _ = timed(BASELINE, str(ckdir))
        ea.append(ta), eb.append(tb), rss.append(json.loads(out)["rss_kb"] / 1024)
    med = statistics.median
    print(json.dumps({"checkpoints": n, "bytes": total, "deep_mode": deep, "genuine_shapes": genuine,
                      "tensors_per_checkpoint": len(res.checkpoints["dynamics"].checkpoints[0].files[
                          "model_state_dict.pt"].tensors) * 4,
                      "a_check_ckpts_s": round(med(a), 3), "b_torch_load_all_s": round(med(b), 3),
                      "ratio_a_over_b": round(med(a) / med(b), 4), "target_ratio": 0.3 if deep == "all" else 0.1,
                      "end_to_end_a_s": round(med(ea), 3), "end_to_end_b_s": round(med(eb), 3),
                      "end_to_end_ratio": round(med(ea) / med(eb), 4),
                      "a_peak_rss_mb": round(max(rss), 1), "target_rss_mb": 1024,
                      "runs_a": [round(x, 3) for x in a], "runs_b": [round(x, 3) for x in b],
                      "deep_scanned_files": sum(len(c.deep_files) for c in res.checkpoints["dynamics"].checkpoints),
                      "fallback": res.fallbacks["dynamics"]["step"],
                      "errors": res.errors}, indent=2))


if __name__ == "__main__":
    main()
