"""Shared by the end-to-end benchmarks: time a script as a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(script: str, *args: str) -> float:
    """Seconds for `python scripts/<script> args...` (output discarded)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


# Peaks are read by a small wrapper process from its RUSAGE_CHILDREN (the
# measured process and its own workers): Linux carries ru_maxrss across
# exec, so a child started straight from a large benchmark process would
# report the benchmark's RSS, not its own.
_MEASURE = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
            "subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,check=True);"
            "print(json.dumps([time.perf_counter()-t,resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024]))")


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command run as a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], capture_output=True,
                         text=True, check=True)
    return tuple(json.loads(out.stdout))
