"""Writing results: atomically, and never inside a run bundle."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


class OutputError(Exception):
    """The output directory cannot be used."""


PROTECTED_PARTS = ("results", "wandb")


def prepare_out_dir(out_dir: str | Path, bundle_roots: list[Path] = ()) -> Path:
    """Create `out_dir` and refuse locations inside a bundle's results/ or wandb/."""
    out = Path(out_dir).resolve()
    for root in bundle_roots:
        root = Path(root).resolve()
        for part in PROTECTED_PARTS:
            guarded = root / part
            if out == guarded or guarded in out.parents:
                raise OutputError(f"refusing to write into the run bundle: {out} is inside {guarded}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output dir {out}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK):
        raise OutputError(f"output dir is not writable: {out}")
    return Path(out_dir)  # as given: relative inputs give relative paths in the JSON


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` on success."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_image(target: str | Path, image) -> Path:
    """A PIL image (or a matplotlib figure) saved as PNG, atomically."""
    with atomic_path(target) as tmp:
        if hasattr(image, "savefig"):
            image.savefig(tmp, format="png")
        else:
            image.save(tmp, format="PNG", optimize=False)
    return Path(target)


def to_jsonable(obj):
    """Plain JSON types only: numpy scalars, Paths, non-finite floats as text."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "Infinity" if f > 0 else "-Infinity"
        return f
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(target: str | Path, obj) -> Path:
    return write_text(target, dumps(obj) + "\n")


def emit(obj) -> None:
    """The one JSON document a script prints on stdout."""
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    """Progress for humans: stderr only, stdout stays JSON."""
    print(msg, file=sys.stderr, flush=True)
