"""One torch `.pt` file, checked without running its pickle.

The structural check reads the zip's central directory, requires torch's
own archive layout (one `<archive>/` prefix; `data.pkl`, metadata entries
and `data/<key>` tensor storages; every entry stored uncompressed, as
torch.save writes them), verifies the CRCs of the pickle and metadata
entries, and reads the pickle with the allowlist unpickler (`safe_pickle`).
Tensor data is only read by the deep scan: every CRC, then
`torch.load(weights_only=True, mmap=True)`, finiteness and weight norms,
streamed in chunks so memory stays flat whatever the file size.

Nothing here raises on a bad file: every problem is a `Problem` with a
status and a reason.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import safefs, safe_pickle

# Worst first: a checkpoint's status is its worst problem.
STATUSES = ("unsafe_pickle", "missing_files", "truncated", "corrupt", "empty",
            "non_finite", "inconsistent", "valid")
UNUSABLE = frozenset(STATUSES[:6])
_CHUNK = 1 << 20
_META_ENTRIES = ("byteorder", "version", ".format_version", ".storage_alignment",
                 ".data/version", ".data/serialization_id")
META_MAX_BYTES = 1 << 16  # torch's metadata entries are a few bytes each


@dataclass
class Problem:
    status: str  # one of STATUSES (not "valid")
    file: str | None
    detail: str


@dataclass
class Limits:
    """Caps from the thresholds file (checkpoints.*)."""

    max_pickle_bytes: int
    budget: safe_pickle.Budget
    config_globals: tuple[str, ...]
    max_nodes: int

    @classmethod
    def from_thresholds(cls, t: dict) -> "Limits":
        c = t["checkpoints"]
        return cls(int(c["max_pickle_bytes"]), safe_pickle.Budget.from_thresholds(c),
                   tuple(c.get("config_globals", ())), int(c["budget"]["max_nodes"]))


@dataclass
class FileCheck:
    """One .pt file: what its structure and pickle say."""

    name: str
    size: int = 0
    format: str = "zip"  # zip | legacy | unreadable
    entries: int = 0
    globals: list[str] = field(default_factory=list)
    crc_checked: str = "none"  # none | metadata | all
    facts: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    content: object = None  # the inert unpickled object (not serialised)
    storages_nbytes: int = 0

    def problem(self, status: str, detail: str) -> None:
        self.problems.append(Problem(status, self.name, detail))


def check_file(path: Path, limits: Limits, allow_config: bool) -> FileCheck:
    """Structure, CRCs of the pickle and metadata entries, and the pickle read
    through the allowlist. `allow_config`: TinyWorlds' config classes may
    appear (state.pt, single-file checkpoints)."""
    fc = FileCheck(path.name)
    try:
        with safefs.open_regular(path) as fh:
            fc.size = safefs.check_regular(path).st_size
            if fc.size == 0:
                fc.format = "unreadable"
                fc.problem("truncated", "zero bytes")
                return fc
            _check_archive(fh, fc, limits, allow_config)
    except safefs.Unreadable as exc:
        fc.format = "unreadable"
        fc.problem("missing_files", f"not readable: {exc}")
    except OSError as exc:
        fc.format = "unreadable"
        fc.problem("corrupt", f"read error: {exc.strerror or exc}")
    except Exception as exc:  # a hostile or broken file must never stop the report
        fc.problem("corrupt", f"unexpected structure: {type(exc).__name__}: {exc}"[:300])
    return fc


def _check_archive(fh, fc: FileCheck, limits: Limits, allow_config: bool) -> None:
    try:
        zf = zipfile.ZipFile(fh)
    except zipfile.BadZipFile as exc:
        _not_a_zip(fh, fc, exc)
        return
    with zf:
        prefix = _check_layout(zf, fc)
        if prefix is None:
            return
        data = _read_pickle(zf, prefix, fc, limits)
        if data is None:
            return
        fc.crc_checked = "metadata"
        _inspect_pickle(data, fc, zf, prefix, limits, allow_config)


def _not_a_zip(fh, fc: FileCheck, exc: Exception) -> None:
    fh.seek(0)
    head = fh.read(4)
    fc.format = "unreadable"
    if head.startswith(b"PK\x03\x04"):
        fc.problem("truncated", f"zip without a central directory ({fc.size} bytes): "
                                f"the write stopped early ({exc})")
    elif head[:1] == b"\x80":
        fc.format = "legacy"
        fc.problem("inconsistent", "legacy (pre-1.6) torch format: no zip structure to verify")
    else:
        fc.problem("corrupt", f"not a torch zip archive ({exc})")


def _check_layout(zf: zipfile.ZipFile, fc: FileCheck) -> str | None:
    """torch.save's archive layout; returns the `<archive>/` prefix or None."""
    infos = zf.infolist()
    fc.entries = len(infos)
    dup = [n for n, k in Counter(i.filename for i in infos).items() if k > 1]
    if dup:
        fc.problem("unsafe_pickle", f"duplicate zip entry {dup[0]!r} ({len(dup)} duplicated names): "
                                    "readers disagree on which copy they load, so a payload can hide "
                                    "behind a clean one")
        return None
    pkls = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkls) != 1:
        fc.problem("corrupt", "no data.pkl entry in the archive" if not pkls else
                   f"{len(pkls)} data.pkl entries: not a torch.save archive")
        return None
    prefix = pkls[0].filename[: -len("data.pkl")]
    for info in infos:
        name = info.filename
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if info.flag_bits & 0x1:
            fc.problem("corrupt", f"entry {name!r} is encrypted: not a torch.save archive")
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            fc.problem("corrupt", f"entry {name!r} uses compression method {info.compress_type} "
                                  f"({info.file_size:,} bytes declared); torch.save stores entries "
                                  "uncompressed, so another tool rewrote this file (not inflated)")
            return None
        if rest is None or not (rest == "data.pkl" or rest in _META_ENTRIES or
                                (rest.startswith("data/") and "/" not in rest[5:] and rest[5:])):
            fc.problem("corrupt", f"entry {name!r} is outside the torch.save layout")
            return None
        if info.header_offset + info.compress_size > fc.size:
            fc.problem("truncated", f"entry {name!r} runs past the end of the file")
            return None
    return prefix


def _read_pickle(zf: zipfile.ZipFile, prefix: str, fc: FileCheck, limits: Limits) -> bytes | None:
    """data.pkl (size-capped) and the metadata entries, each read once; zipfile
    checks every CRC."""
    try:
        for info in zf.infolist():
            rest = info.filename[len(prefix):]
            if rest in _META_ENTRIES and info.file_size > META_MAX_BYTES:
                fc.problem("corrupt", f"metadata entry {info.filename!r} is {info.file_size:,} bytes")
                return None
            if rest in _META_ENTRIES:
                _read_capped(zf, info, META_MAX_BYTES)
        info = zf.getinfo(prefix + "data.pkl")
        if info.file_size > limits.max_pickle_bytes:
            fc.problem("inconsistent", f"data.pkl is {info.file_size:,} bytes (> {limits.max_pickle_bytes:,}, "
                                       "far more than any state dict needs); not read, so not verified")
            return None
        return _read_capped(zf, info, limits.max_pickle_bytes)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        fc.problem("corrupt", f"{exc}"[:300])
        return None


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    with zf.open(info) as fh:  # raises BadZipFile on a CRC mismatch at EOF
        data = fh.read(cap + 1)
        if len(data) > cap:
            raise ValueError(f"entry {info.filename!r} is larger than its {cap:,}-byte cap")
        if fh.read(1):
            raise ValueError(f"entry {info.filename!r} holds more than it declares")
        return data


def _inspect_pickle(data: bytes, fc: FileCheck, zf: zipfile.ZipFile, prefix: str,
                    limits: Limits, allow_config: bool) -> None:
    up = safe_pickle.RestrictedUnpickler(data, limits.budget, limits.config_globals, allow_config)
    try:
        obj = safe_pickle.safe_load(up)
    except safe_pickle.UnsafePickle as exc:
        fc.problem("unsafe_pickle", f"pickle names {exc}, which is not on the allowlist of what a "
                                    "TinyWorlds checkpoint holds (refused before anything ran; "
                                    "torch.load(weights_only=False) would import and run it)")
        return
    except safe_pickle.BudgetExceeded as exc:
        fc.problem("unsafe_pickle", f"pickle exceeds the read budget: {exc} (refused, not allocated)")
        return
    except pickle.UnpicklingError as exc:
        fc.problem("corrupt", f"pickle unreadable: {exc}")
        return
    finally:
        fc.globals = up.report.all
    fc.content = obj
    _check_storages(obj, fc, zf, prefix, limits.max_nodes)


def leaves(obj, kind: type, max_nodes: int, path: str = ""):
    """(dotted path, leaf) for every `kind` leaf in nested dicts/lists/tuples.

    Each container is visited once (a pickle can share one list under many
    parents: 40 nested [x, x] pairs would otherwise mean 2**40 visits), and
    at most `max_nodes` containers are walked."""
    stack, seen, visited = [(path, obj)], set(), 0
    while stack:
        here, node = stack.pop()
        if isinstance(node, kind):
            yield here, node
            continue
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            continue
        seen.add(id(node))
        visited += 1
        if visited > max_nodes:
            return
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((f"{here}.{k}" if here else str(k), v) for k, v in reversed(list(items)))


def _check_storages(obj, fc: FileCheck, zf: zipfile.ZipFile, prefix: str, max_nodes: int) -> None:
    """Every storage the pickle references exists with the size it claims, and
    every tensor fits in its storage."""
    sizes = {i.filename: i.file_size for i in zf.infolist()}
    seen: dict = {}
    for key, t in leaves(obj, safe_pickle.TensorInfo, max_nodes):
        if t.storage is None:
            continue
        ref = seen.setdefault(t.storage.key, t.storage)
        if ref != t.storage:
            fc.problem("corrupt", f"storage {t.storage.key} is described two ways")
            return
        if t.numel and t.offset + t.numel > ref.numel:
            fc.problem("corrupt", f"tensor {key} {list(t.shape)} does not fit in its storage "
                                  f"({ref.numel} elements)")
            return
    for key, ref in seen.items():
        entry = f"{prefix}data/{key}"
        if entry not in sizes:
            fc.problem("corrupt", f"tensor storage {entry} is missing")
        elif sizes[entry] != ref.nbytes:
            fc.problem("corrupt", f"tensor storage {entry} holds {sizes[entry]} bytes, "
                                  f"the pickle says {ref.nbytes}")
    fc.storages_nbytes = sum(r.nbytes for r in seen.values())


# --- deep scan (torch) ------------------------------------------------------------

def verify_all_crcs(path: Path) -> Problem | None:
    """Read every entry to its end: zipfile checks each CRC (tensor data too)."""
    try:
        with safefs.open_regular(path) as fh, zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                with zf.open(info) as entry:
                    while entry.read(_CHUNK):
                        pass
    except (safefs.Unreadable, zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        return Problem("corrupt", path.name, f"{exc}"[:300])
    return None


def load_and_scan(path: Path, max_nodes: int, chunk_elems: int) -> tuple[dict, Problem | None]:
    """torch.load(weights_only=True, mmap=True), then per float tensor the
    non-finite count, and over all float tensors the L2 norm and max |w|,
    chunk by chunk (no full-size temporaries)."""
    import torch
    try:
        safefs.check_regular(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return {}, Problem("unsafe_pickle", path.name, "weights_only load refused: "
                           f"{str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # torch raises many kinds on bad archives
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return {}, Problem("corrupt", path.name, f"torch.load failed: {type(exc).__name__}: {first}")
    bad, sumsq, maxabs, n = [], 0.0, 0.0, 0
    for key, t in leaves(obj, torch.Tensor, max_nodes):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        flat = t.detach().reshape(-1)
        nonfinite = 0
        for i in range(0, flat.numel(), chunk_elems):
            c = flat[i:i + chunk_elems]
            finite = torch.isfinite(c)
            k = int(c.numel() - finite.sum())
            nonfinite += k
            c = c[finite] if k else c
            if c.numel():
                c64 = c.abs().to(torch.float64)
                sumsq += float((c64 * c64).sum())
                maxabs = max(maxabs, float(c64.max()))
        n += flat.numel()
        if nonfinite:
            bad.append((key, nonfinite))
    facts = {"non_finite_tensors": len(bad), "weight_norm": sumsq ** 0.5, "max_abs_weight": maxabs,
             "float_elements": n}
    if bad:
        shown = ", ".join(f"{k} ({c})" for k, c in bad[:5])
        return facts, Problem("non_finite", path.name, f"{len(bad)} tensors hold NaN/Inf: {shown}")
    return facts, None
