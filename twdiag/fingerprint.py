"""A bundle's content signature: what changes when its inputs change.

Sizes and a hash of the first and last 64 KiB of every file under wandb/
and results/, never modification times (a copy resets them, a live writer
keeps appending). `scan` reuses a bundle's partition while its signature
holds; `query` answers from the tables a diagnose saved while it holds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from . import safefs

HEAD_TAIL = 64 << 10
MAX_FILES = 200_000    # files a signature reads per bundle


def signature(path: Path) -> str:
    """What changes when a bundle's inputs change: sizes and the head and tail
    of every file under wandb/ and results/ (content, never mtimes)."""
    h = hashlib.sha256()
    count = 0
    for sub in ("wandb", "results"):
        base = path / sub
        if not safefs.is_dir(base):
            continue
        for f in sorted(base.rglob("*")):
            if count >= MAX_FILES or not safefs.is_regular(f):
                continue
            count += 1
            rel = str(f.relative_to(path))
            if rel.startswith("docs/"):
                continue
            try:
                with safefs.open_regular(f) as fh:
                    size = fh.seek(0, 2)
                    fh.seek(0)
                    head = fh.read(HEAD_TAIL)
                    fh.seek(max(0, size - HEAD_TAIL))
                    tail = fh.read(HEAD_TAIL)
            except (safefs.Unreadable, OSError):
                size, head, tail = -1, b"", b""
            h.update(f"{rel}\0{size}\0".encode())
            h.update(hashlib.sha1(head + tail).digest())
    return h.hexdigest()
