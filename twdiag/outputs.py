"""Writing results: where they may go, and writing a set of them atomically.

Inside a run bundle the only place we write is `docs/action/` (the seed's
place for generated analysis outputs); anywhere else in a bundle is refused.
A set of outputs is written into a hidden temp dir inside the target dir,
then each file is moved into place with `os.replace`, with SIGINT/SIGTERM
held off during the moves: an interrupted run leaves the old set or the new
one, and never a `.tmp` file. Nothing is created before the first write.
Files get the usual permissions (0666 minus the umask).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import safefs


class OutputError(Exception):
    """The output directory cannot be used."""


GOVERNED = Path("docs") / "action"  # the one place inside a bundle we write to


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out_dir: str | Path, bundle_roots: list[Path] = ()) -> Path:
    """Refuse a location inside a bundle other than its docs/action/, and one
    that cannot be created or written. Creates nothing."""
    out = safefs.resolve(out_dir)
    for root in bundle_roots:
        root = safefs.resolve(root)
        if _inside(out, root) and not _inside(out, root / GOVERNED):
            raise OutputError(f"refusing to write into the run bundle: {out} is inside {root}; "
                              f"inside a bundle only {root / GOVERNED} is used for outputs")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not safefs.is_dir(probe):
        raise OutputError(f"output path {out} runs into a file: {probe}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output dir is not writable: {probe}")
    return Path(out_dir)  # as given: relative inputs give relative paths in the JSON


def _symlinked_part(root: Path) -> Path | None:
    """The first of docs/, docs/action/ under the bundle that is a symlink
    (or not a directory): writing through it could land anywhere."""
    here = Path(root)
    for part in GOVERNED.parts:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return None
        except OSError:
            return here
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            return here
    return None


def bundle_writable(root: Path) -> bool:
    """Can docs/action/ be created (or written) inside this bundle, without
    following a symlink at docs/ or docs/action/?"""
    if _symlinked_part(root) is not None:
        return False
    probe = safefs.resolve(root) / GOVERNED
    while not probe.exists() and probe != safefs.resolve(root).parent:
        probe = probe.parent
    return safefs.is_dir(probe) and os.access(probe, os.W_OK | os.X_OK)


def choose_out_dir(bundle_root: Path, cwd: Path | None = None) -> tuple[Path, str | None]:
    """`<bundle>/docs/action/` when the bundle is writable; otherwise a folder
    named after the bundle under the current directory, with the reason when
    it is not the obvious one (a symlinked docs/ or docs/action/)."""
    if bundle_writable(bundle_root):
        return Path(bundle_root) / GOVERNED, None
    name = safefs.resolve(bundle_root).name or "bundle"
    out = Path(cwd or Path.cwd()) / f"twdiag-{name}"
    link = _symlinked_part(bundle_root)
    note = (f"{link} is a symlink or not a directory: outputs go to {out} instead (writing through it could "
            "land outside the bundle)") if link is not None else None
    return out, note


def default_out_dir(bundle_root: Path, cwd: Path | None = None) -> Path:
    return choose_out_dir(bundle_root, cwd)[0]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def _signals_held():
    """Defer SIGINT/SIGTERM while a few renames finish (POSIX only)."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class OutputSet:
    """Files written together: `path(name)` gives a temp path to write,
    `final(name)` where it will be, `commit()` moves them all into place.
    Use as a context manager: commit on success, clean up on any error."""

    def __init__(self, target: str | Path, order_last: tuple[str, ...] = ("diagnosis.json",)):
        self.target = Path(target)
        self.order_last = order_last
        self._tmp: Path | None = None
        self._created: Path | None = None  # the first dir we made, removed again if left empty
        self._names: list[str] = []
        self.committed: dict[str, str] = {}

    def final(self, name: str) -> Path:
        return self.target / name

    def tmp_dir(self) -> Path:
        """The set's temp dir (created on first use), for files renamed in later."""
        return self.path(".keep").parent

    def path(self, name: str) -> Path:
        if self._tmp is None:
            try:
                missing = [p for p in (self.target, *self.target.parents) if not p.exists()]
                self._created = missing[-1] if missing else None
                self.target.mkdir(parents=True, exist_ok=True)
                with _signals_held():  # known as soon as it exists, so an interrupt removes it
                    self._tmp = Path(tempfile.mkdtemp(prefix=".twdiag-tmp-", dir=self.target))
            except OSError as exc:
                raise OutputError(f"cannot create output dir {self.target}: {exc.strerror or exc}") from exc
        if name not in self._names and name != ".keep":
            self._names.append(name)
        if "/" in name:  # a file in a subfolder of the set (tables/...)
            (self._tmp / name).parent.mkdir(parents=True, exist_ok=True)
        return self._tmp / name

    def commit(self) -> dict[str, str]:
        if self._tmp is None:
            return {}
        mode = _file_mode()
        names = [n for n in self._names if n not in self.order_last] + \
                [n for n in self.order_last if n in self._names]
        with _signals_held():  # the temp dir goes too before a held SIGTERM unwinds
            for name in names:
                src = self._tmp / name
                if src.exists():
                    os.chmod(src, mode)
                    if "/" in name:
                        self.final(name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, self.final(name))
                    self.committed[name] = str(self.final(name))
            self.abort()
        return self.committed

    def abort(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._created is not None and not self.committed:
            for d in (self.target, *self.target.parents):  # only what we made, only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == self._created:
                    break
            self._created = None

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except OSError as err:
            self.abort()
            raise OutputError(f"cannot write outputs to {self.target}: {err.strerror or err}") from err
        except BaseException:  # an interrupt as the commit began: nothing is left half-made
            self.abort()
            raise

    # --- writers (a full disk is an OutputError, exit 5, not a crash) ------------------
    def write_text(self, name: str, text: str) -> Path:
        with self._writing(name):
            self.path(name).write_text(text, encoding="utf-8")
        return self.final(name)

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, dumps(obj) + "\n")

    def write_image(self, name: str, image) -> Path:
        """A PIL image or a matplotlib figure, as PNG (`png`: unfiltered
        rows, fast deflate; the same pixels)."""
        from . import png
        data = png.figure_bytes(image) if hasattr(image, "savefig") else png.image_bytes(image)
        return self.write_bytes(name, data)

    def write_bytes(self, name: str, data: bytes) -> Path:
        with self._writing(name):
            self.path(name).write_bytes(data)
        return self.final(name)

    @contextmanager
    def _writing(self, name: str):
        try:
            yield
        except OSError as exc:
            raise OutputError(f"cannot write {self.final(name)}: {exc.strerror or exc}") from exc


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


def emit(obj, max_bytes: int | None = None) -> None:
    """The one JSON document a script prints on stdout, at most `max_bytes`:
    longer lists are cut (longest first) and each cut list gets a sibling
    `<key>_not_shown` count, so the document says what it left out."""
    text = dumps(obj)
    if max_bytes:
        keep = 50
        while len(text) > max_bytes and keep >= 1:
            obj = _cut_lists(to_jsonable(obj), keep)
            obj["stdout_truncated"] = f"lists cut to {keep} items to stay under {max_bytes:,} bytes"
            text = dumps(obj)
            keep //= 2
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _cut_lists(obj, keep: int):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, list) and len(v) > keep:
                out[k] = [_cut_lists(x, keep) for x in v[:keep]]
                out[f"{k}_not_shown"] = len(v) - keep
            else:
                out[k] = _cut_lists(v, keep)
        return out
    if isinstance(obj, list):
        return [_cut_lists(x, keep) for x in obj]
    if isinstance(obj, str) and len(obj) > 20 * keep + 200:
        return obj[:20 * keep + 200] + "…"
    return obj


def log(msg: str) -> None:
    """Progress for humans: stderr only, stdout stays JSON. Bundle text in it
    (paths, names) cannot carry terminal escape sequences or forge lines."""
    from .safetext import terminal
    print(terminal(str(msg)), file=sys.stderr, flush=True)


def install_sigterm_handler() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (temp dirs) runs."""
    def _raise(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # not the main thread
        pass
