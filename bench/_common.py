"""Shared by the end-to-end benchmarks: time a script as a fresh process."""
from __future__ import annotations

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
