"""One torch `.pt` file, checked without running its pickle.

The structural check reads the archive with our one strict zip reader
(`ziparchive`: an archive every reader reads alike, or a refusal), requires
torch's own layout (one `<archive>/` prefix; `data.pkl`, metadata entries and
`data/<key>` tensor storages; every entry stored uncompressed, as torch.save
writes them), verifies the CRCs of the pickle and metadata entries, and reads
the pickle with the allowlist unpickler (`safe_pickle`). A legacy (non-zip)
file is read the way torch would read it, pickle after pickle, through the
same allowlist; it is never `valid`.

Only bounded summaries outlive the read: the caller's `describe` turns the
unpickled object into facts while it exists, the tensors are kept as
`TensorRecord`s (bounded by `max_nodes`), and the object graph is dropped.

The deep scan (`scan`) reads every storage's bytes: every CRC, and each
tensor viewed with numpy (`tensors`) for NaN/Inf and, in a weights file, the
weight norm and max |w|, in chunks, with no torch. `load_and_scan` keeps
torch's own loader as a second opinion (`--deep torch`).

Nothing here raises on a bad file: every problem is a `Problem` with a
status and a reason.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import mmap
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import forking, readcache, safefs, safe_pickle, tensors, ziparchive
from .checksum import crc32

# Worst first: a checkpoint's status is its worst problem.
STATUSES = ("unsafe_pickle", "missing_files", "truncated", "corrupt", "empty",
            "non_finite", "inconsistent", "valid")
UNUSABLE = frozenset(STATUSES[:6])
_META_ENTRIES = ("byteorder", "version", ".format_version", ".storage_alignment",
                 ".data/version", ".data/serialization_id")
META_MAX_BYTES = 1 << 16  # torch's metadata entries are a few bytes each
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PICKLES = 5  # magic, protocol, sys_info, the object, the storage keys: what torch.load reads


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
    max_entries: int
    max_directory_bytes: int
    run_large_pickle_bytes: int
    large_pickle_bytes: int
    state_max_items: int
    fork_checks_seconds: float
    spent: forking.Counter = field(default_factory=forking.Counter)  # large-pickle bytes read so far with these limits

    @classmethod
    def from_thresholds(cls, t: dict) -> "Limits":
        c = t["checkpoints"]
        return cls(int(c["max_pickle_bytes"]), safe_pickle.Budget.from_thresholds(c),
                   tuple(c.get("config_globals", ())), int(c["budget"]["max_nodes"]),
                   int(c["archive"]["max_entries"]), int(c["archive"]["max_directory_bytes"]),
                   int(c["run_large_pickle_bytes"]), int(c["large_pickle_bytes"]), int(c["state_max_items"]),
                   float(c["fork_checks_seconds"]))


@dataclass
class FileCheck:
    """One .pt file: what its structure and pickle say (bounded summaries only)."""

    name: str
    size: int = 0
    format: str = "zip"  # zip | legacy | unreadable
    entries: int = 0
    globals: list[str] = field(default_factory=list)
    crc_checked: str = "none"  # none | metadata | all
    facts: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    storages_nbytes: int = 0
    tensors: list = field(default_factory=list)   # [tensors.TensorRecord], for the deep scan
    layout: dict = field(default_factory=dict)    # entry name -> ziparchive.Entry (certified)
    prefix: str = ""
    big_endian: bool = False
    config: dict | None = None                    # state.pt's config, as plain values
    identity: tuple | None = None                 # the file checked (`identity`): a scan knows it is the same one

    def problem(self, status: str, detail: str) -> None:
        self.problems.append(Problem(status, self.name, detail))

    def __reduce__(self):
        """Pickled as plain tuples: a forked worker sends each file check
        back, and a genuine checkpoint's ~1,000 zip entries and tensor
        records, pickled as named tuples (a Python call each), cost the
        worker 4.3 ms and the main process 2.6 ms a checkpoint."""
        state = dict(vars(self))
        state["layout"] = [tuple(e) for e in self.layout.values()]
        state["tensors"] = [tuple(t) for t in self.tensors]
        return _file_check, (state,)

    def public(self) -> dict:
        """What checkpoints.json shows of this file."""
        hidden = ("problems", "tensors", "layout", "config", "prefix", "big_endian", "identity")
        return {k: v for k, v in vars(self).items() if k not in hidden}


Describe = Callable[[object, FileCheck], None]


def _file_check(state: dict) -> FileCheck:
    """A FileCheck from what `FileCheck.__reduce__` sent."""
    fc = FileCheck.__new__(FileCheck)
    entry, record = ziparchive.Entry._make, tensors.TensorRecord._make
    state["layout"] = {e[0]: entry(e) for e in state["layout"]}
    state["tensors"] = [record(t) for t in state["tensors"]]
    fc.__dict__.update(state)
    return fc


def check_file(path: Path, limits: Limits, allow_config: bool, describe: Describe | None = None) -> FileCheck:
    """Structure, CRCs of the pickle and metadata entries, and the pickle read
    through the allowlist. `allow_config`: TinyWorlds' config classes may
    appear (state.pt, single-file checkpoints). `describe(obj, fc)` turns the
    inert object into facts before it is dropped."""
    fc = FileCheck(path.name)
    try:
        with safefs.open_regular(path) as fh:
            fc.size = safefs.check_regular(path).st_size
            fc.identity = identity(os.fstat(fh.fileno()))
            if fc.size == 0:
                fc.format = "unreadable"
                fc.problem("truncated", "zero bytes")
                return fc
            if fh.read(4) != ziparchive.SIG_LFH:
                _not_a_zip(fh, fc, limits, allow_config, describe)
            else:
                _check_archive(fh, fc, limits, allow_config, describe)
    except safefs.Unreadable as exc:
        fc.format = "unreadable"
        fc.problem("missing_files", f"not readable: {exc}")
    except OSError as exc:
        fc.format = "unreadable"
        fc.problem("corrupt", f"read error: {exc.strerror or exc}")
    except MemoryError:
        fc.problem("unsafe_pickle", "reading it exhausted the memory budget (refused)")
    except Exception as exc:  # a hostile or broken file must never stop the report
        fc.problem("corrupt", f"unexpected structure: {type(exc).__name__}: {exc}"[:300])
    return fc


def _check_archive(fh, fc: FileCheck, limits: Limits, allow_config: bool, describe: Describe | None) -> None:
    try:
        entries = ziparchive.read_directory(fh, fc.size, limits.max_entries, limits.max_directory_bytes)
    except ziparchive.ArchiveError as exc:
        fc.format = "zip"
        fc.problem(exc.status, exc.detail)
        return
    fc.entries = len(entries)
    prefix = _check_layout(entries, fc)
    if prefix is None:
        return
    fc.layout = {e.name: e for e in entries}
    fc.prefix = prefix
    data = _read_pickle(fh, fc, limits)
    if data is None:
        return
    fc.crc_checked = "metadata"
    rest = _rest_key(data, fc, limits, allow_config, describe)
    if not readcache.recall(describe, rest, data, fc):
        seen = len(fc.problems), len(fc.globals)
        obj, reader = _unpickle(data, fc, limits, allow_config)
        if obj is _REFUSED:
            return
        _summarise(obj, fc, limits, describe)
        readcache.remember(describe, rest, data, fc, seen, reader, obj, limits.max_nodes)
    _check_storages(fc)


def _rest_key(data: bytes, fc: FileCheck, limits: Limits, allow_config: bool,
              describe: Describe | None) -> tuple | None:
    """Everything but the bytes that a read's outcome depends on (`readcache`),
    or None when it is not to be remembered: large pickles are not kept, so
    memory stays bounded."""
    if describe not in readcache.PURE_DESCRIBERS or len(data) > limits.large_pickle_bytes:
        return None
    return (fc.name, fc.size, allow_config, limits.config_globals, limits.max_nodes,
            tuple(vars(limits.budget).values()))


def _not_a_zip(fh, fc: FileCheck, limits: Limits, allow_config: bool, describe: Describe | None) -> None:
    """torch.load treats any file that does not start with a zip local header
    as its legacy format and unpickles it: read it the same way, inertly."""
    fh.seek(0)
    head = fh.read(1)
    if fh.seek(257) == 257 and fh.read(5) == b"ustar":
        fc.format = "unreadable"
        fc.problem("corrupt", "a tar-format torch file (pre-0.4): not verified, never resume from it")
        return
    if head != b"\x80":  # a pickle protocol 2+ header
        fc.format = "unreadable"
        fc.problem("corrupt", "not a torch zip archive, nor a pickle")
        return
    fc.format = "legacy"
    fh.seek(0)
    data = fh.read(limits.max_pickle_bytes + 1)
    if len(data) > limits.max_pickle_bytes:
        data = data[:limits.max_pickle_bytes]
    stream = io.BytesIO(data)
    obj = None
    for i in range(_LEGACY_PICKLES):
        value, _ = _unpickle(stream, fc, limits, allow_config)
        if value is _REFUSED:
            return
        if i == 0 and value != _LEGACY_MAGIC:
            fc.problem("corrupt", "a pickle, but not a torch file (no torch magic number)")
            return
        if i == 3:
            obj = value
    _summarise(obj, fc, limits, describe)
    fc.tensors = []  # the storages follow the pickles unframed: not verified
    fc.problem("inconsistent", "legacy (pre-1.6, non-zip) torch format: its pickles pass the allowlist, "
                               "but its tensor data has no CRCs to verify; re-save it with a current torch")


_REFUSED = object()


def _unpickle(data, fc: FileCheck, limits: Limits, allow_config: bool) -> tuple:
    """(the inert object or _REFUSED, the reader: what it saw of the floats)."""
    up = safe_pickle.RestrictedUnpickler(data, limits.budget, limits.config_globals, allow_config)
    try:
        return safe_pickle.safe_load(up), up
    except safe_pickle.UnsafePickle as exc:
        fc.problem("unsafe_pickle", f"pickle names {exc}, which is not on the allowlist of what a "
                                    "TinyWorlds checkpoint holds (refused before anything ran; "
                                    "torch.load(weights_only=False) would import and run it)")
    except safe_pickle.BudgetExceeded as exc:
        fc.problem("unsafe_pickle", f"pickle exceeds the read budget: {exc} (refused, not allocated)")
    except pickle.UnpicklingError as exc:
        fc.problem("corrupt", f"pickle unreadable: {exc}"[:300])
    finally:
        for g in up.report.all:
            if g not in fc.globals and len(fc.globals) < 200:
                fc.globals.append(g)
    return _REFUSED, up


def _summarise(obj, fc: FileCheck, limits: Limits, describe: Describe | None) -> None:
    """Facts and tensor records from the inert object; nothing else is kept."""
    fc.tensors = tensor_records(obj, limits.max_nodes)
    if describe is not None:
        describe(obj, fc)


def tensor_records(obj, max_nodes: int) -> list:
    out = []
    for key, t in leaves(obj, safe_pickle.TensorInfo, max_nodes):
        if t.storage is None:
            continue
        out.append(tensors.TensorRecord(key, t.storage.key, t.dtype, t.shape, t.stride, t.offset,
                                        t.storage.numel, t.storage.storage_type))
    return out


def _check_layout(entries: list, fc: FileCheck) -> str | None:
    """torch.save's archive layout; returns the `<archive>/` prefix or None."""
    pkls = [e for e in entries if e.name.endswith("/data.pkl") or e.name == "data.pkl"]
    if len(pkls) != 1:
        fc.problem("corrupt", "no data.pkl entry in the archive" if not pkls else
                   f"{len(pkls)} data.pkl entries: not a torch.save archive")
        return None
    prefix = pkls[0].name[: -len("data.pkl")]
    names = set()
    for e in entries:
        rest = e.name[len(prefix):] if e.name.startswith(prefix) else None
        if e.flags & 0x1:
            fc.problem("corrupt", f"entry {e.name!r} is encrypted: not a torch.save archive")
            return None
        if e.method != 0 or e.size != e.file_size:
            fc.problem("corrupt", f"entry {e.name!r} uses compression method {e.method} "
                                  f"({e.file_size:,} bytes declared); torch.save stores entries "
                                  "uncompressed, so another tool rewrote this file (not inflated)")
            return None
        if rest is None or not (rest == "data.pkl" or rest in _META_ENTRIES or
                                (rest.startswith("data/") and "/" not in rest[5:] and rest[5:])):
            fc.problem("corrupt", f"entry {e.name!r} is outside the torch.save layout")
            return None
        names.add(rest)
    if "version" not in names and ".data/version" not in names:
        fc.problem("corrupt", "no version record: torch.load refuses such an archive")
        return None
    return prefix


def _read_entry(fh, e: ziparchive.Entry, cap: int) -> bytes:
    if e.size > cap:
        raise ValueError(f"entry {e.name!r} is {e.size:,} bytes (cap {cap:,})")
    fh.seek(e.data_offset)
    data = fh.read(e.size)
    if len(data) != e.size:
        raise EOFError(f"entry {e.name!r} runs past the end of the file")
    if crc32(data) != e.crc:
        raise ValueError(f"bad CRC in entry {e.name!r}")
    return data


def _read_pickle(fh, fc: FileCheck, limits: Limits) -> bytes | None:
    """data.pkl (size-capped) and the metadata entries, each read once, CRCs checked."""
    try:
        for name, e in fc.layout.items():
            rest = name[len(fc.prefix):]
            if rest in _META_ENTRIES:
                value = _read_entry(fh, e, META_MAX_BYTES)
                if rest == "byteorder":
                    fc.big_endian = value.strip() == b"big"
        e = fc.layout[fc.prefix + "data.pkl"]
        if e.size > limits.max_pickle_bytes:
            fc.problem("inconsistent", f"data.pkl is {e.size:,} bytes (> {limits.max_pickle_bytes:,}, "
                                       "far more than any state dict needs); not read, so not verified")
            return None
        if e.size > limits.large_pickle_bytes and not _charge(limits, e.size):
            fc.problem("inconsistent", f"data.pkl is {e.size:,} bytes and this run has already read "
                                       f"{limits.spent.value:,} bytes of large pickles (budget "
                                       f"{limits.run_large_pickle_bytes:,}); not read, so not verified")
            return None
        return _read_entry(fh, e, limits.max_pickle_bytes)
    except (ValueError, EOFError, OSError) as exc:
        fc.problem("corrupt", f"{exc}"[:300])
        return None


def _charge(limits: Limits, size: int) -> bool:
    """Count a large pickle against the run's budget; False when it would
    pass it (or when the shared count cannot be had: then the pickle is not
    read, rather than the pass waiting on a dead worker's lock)."""
    return limits.spent.claim(size, limits.run_large_pickle_bytes) is not None


@contextlib.contextmanager
def shared_spending(limits: Limits):
    """For a pass whose files are checked by forked workers: the run's
    large-pickle count in shared memory, so the workers spend one budget
    (each with its own copy, they could together read the budget once per
    worker); the count comes back to `limits.spent` afterwards. Where shared
    memory cannot be had, each worker keeps to the budget on its own."""
    plain = limits.spent
    limits.spent = forking.Counter(plain.value, shared=True)
    try:
        yield
    finally:
        plain.value = limits.spent.value
        limits.spent = plain


def leaves(obj, kind: type, max_nodes: int, path: str = ""):
    """(dotted path, leaf) for every `kind` leaf in nested dicts/lists/tuples.

    Each container is visited once (a pickle can share one list under many
    parents: 40 nested [x, x] pairs would otherwise mean 2**40 visits), and
    at most `max_nodes` items are looked at in all (a tuple of 7 million
    references to one object costs max_nodes steps, not 7 million paths)."""
    stack, seen, steps = [(path, iter(((path, obj),)))], set(), 0
    while stack:
        here, items = stack[-1]
        nxt = next(items, None)
        if nxt is None:
            stack.pop()
            continue
        steps += 1
        if steps > max_nodes:
            return
        key, node = nxt
        if isinstance(node, kind):
            yield key, node
            continue
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((key, _children(key, node)))


def count_items(obj, cap: int) -> int:
    """Items in nested dicts/lists/tuples/sets, each container once, counted up to `cap`."""
    stack, seen, n = [obj], set(), 0
    while stack and n <= cap:
        node = stack.pop()
        if not isinstance(node, (dict, list, tuple, set, frozenset)) or id(node) in seen:
            continue
        seen.add(id(node))
        n += len(node)
        if n <= cap:
            stack.extend(itertools.islice(node.values() if isinstance(node, dict) else node, cap))
    return n


def _children(parent: str, node):
    """(dotted path, value) of a container's items, made as they are asked for."""
    pairs = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in pairs:
        yield (f"{parent}.{k}" if parent else str(k)), v


def _check_storages(fc: FileCheck) -> None:
    """Every storage the pickle references exists with the size it claims, and
    every tensor fits in its storage."""
    seen: dict = {}
    for t in fc.tensors:
        ref = seen.setdefault(t.storage_key, (t.storage_type, t.storage_numel))
        if ref != (t.storage_type, t.storage_numel):
            fc.problem("corrupt", f"storage {t.storage_key} is described two ways")
            return
        extent = safe_pickle.extent(t.shape, t.stride, t.offset)
        itemsize = safe_pickle.STORAGE_ITEMSIZE.get(t.storage_type, 1)
        elem = tensors.numpy_dtype(t.dtype)
        elem_size = elem[0].itemsize if elem else itemsize
        if extent * elem_size > t.storage_numel * itemsize:
            fc.problem("corrupt", f"tensor {t.key} {list(t.shape)} does not fit in its storage "
                                  f"({t.storage_numel} elements)")
            return
    total = 0
    for key, (stype, numel) in seen.items():
        entry = f"{fc.prefix}data/{key}"
        nbytes = numel * safe_pickle.STORAGE_ITEMSIZE.get(stype, 1)
        e = fc.layout.get(entry)
        if e is None:
            fc.problem("corrupt", f"tensor storage {entry} is missing")
        elif e.size != nbytes:
            fc.problem("corrupt", f"tensor storage {entry} holds {e.size} bytes, the pickle says {nbytes}")
        total += nbytes
    fc.storages_nbytes = total


# --- deep scan (numpy) --------------------------------------------------------------

def identity(st: os.stat_result) -> tuple:
    """Which file, in which state: device, inode, size, and the modification
    and change times (any write moves the change time)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def scan(path: Path, fc: FileCheck, limits: Limits, chunk_elems: int,
         norms: bool = True) -> tuple[dict, Problem | None]:
    """Every entry's CRC, then every tensor viewed with numpy: NaN/Inf per
    float tensor, and (`norms`: a weights file) the L2 norm and max |w| over
    all of them. A file swapped or written since its structural check is
    not scanned as if it were the one checked: the open file must be the
    one checked, unchanged (`identity`), or else its archive is certified
    again and must have the same layout."""
    if fc.format != "zip" or not fc.layout:
        return {}, Problem("corrupt", path.name, "no certified archive to scan")
    try:
        with safefs.open_regular(path) as fh:
            size = safefs.check_regular(path).st_size
            if fc.identity is None or identity(os.fstat(fh.fileno())) != fc.identity:
                entries = ziparchive.read_directory(fh, size, limits.max_entries, limits.max_directory_bytes)
                if {e.name: e for e in entries} != fc.layout:
                    return {}, Problem("corrupt", path.name, "the file changed since its structural check")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _scan_mapped(mm, fh.fileno(), fc, chunk_elems, norms)
    except ziparchive.ArchiveError as exc:
        return {}, Problem(exc.status, path.name, exc.detail)
    except (safefs.Unreadable, OSError, ValueError) as exc:
        return {}, Problem("corrupt", path.name, f"{exc}"[:300])


def _scan_mapped(mm: mmap.mmap, fd: int, fc: FileCheck, chunk_elems: int,
                 norms: bool) -> tuple[dict, Problem | None]:
    fused = _fused_entries(fc)
    buf = bytearray(tensors.READ_BLOCK) if fused else None
    for e in fc.layout.values():  # the rest is checked as its tensor is measured
        if e.name not in fused and not tensors.crc_ok(mm, e.data_offset, e.size, e.crc):
            return {}, Problem("corrupt", fc.name, f"bad CRC in entry {e.name!r}")
    measure = tensors.Measure(norms)
    small = []  # measured together, after the loop
    for rec in fc.tensors:
        e = fc.layout.get(f"{fc.prefix}data/{rec.storage_key}")
        if e is None:
            return {}, Problem("corrupt", fc.name, f"tensor storage data/{rec.storage_key} is missing")
        item = tensors.small(rec, e.data_offset, e.size, e.crc, fc.big_endian) if e.name in fused else None
        if item is not None:
            small.append(item)
            continue
        try:
            arr, floating, bf16 = tensors.tensor_view(mm, rec, e.data_offset, e.size, fc.big_endian)
            if e.name in fused:
                start = e.data_offset + rec.offset * arr.itemsize
                measure.add(rec.key, tensors.read_chunks(fd, arr.dtype, bf16, start, arr.size, e.data_offset,
                                                         e.size, e.crc, buf))
            elif floating:
                measure.add(rec.key, tensors.chunks(arr, bf16, chunk_elems))
        except tensors.CrcError:
            return {}, Problem("corrupt", fc.name, f"bad CRC in entry {e.name!r}")
        except tensors.ScanError as exc:
            return {}, Problem("corrupt", fc.name, str(exc))
        del arr
    try:
        failed = tensors.measure_small(fd, small, measure, buf, bytearray(len(buf))) if small else None
    except tensors.ScanError as exc:
        return {}, Problem("corrupt", fc.name, str(exc))
    if failed is not None:
        e = fc.layout[f"{fc.prefix}data/{next(r.storage_key for r in fc.tensors if r.key == failed)}"]
        return {}, Problem("corrupt", fc.name, f"bad CRC in entry {e.name!r}")
    if measure.bad:  # in the pickle's order, small tensors or not
        order = {rec.key: i for i, rec in enumerate(fc.tensors)}
        measure.bad.sort(key=lambda kc: order.get(kc[0], 0))
    facts = measure.facts()
    if measure.bad:
        shown = ", ".join(f"{k} ({c})" for k, c in measure.bad[:5])
        return facts, Problem("non_finite", fc.name, f"{len(measure.bad)} tensors hold NaN/Inf: {shown}")
    return facts, None


def _fused_entries(fc: FileCheck) -> set[str]:
    """Storage entries whose CRC is checked while their one tensor is
    measured: entries viewed by exactly one contiguous float tensor (what
    torch.save writes for a state dict of parameters). Shared or strided
    storages are checked in a pass of their own."""
    views: dict[str, int] = {}
    for rec in fc.tensors:
        views[rec.storage_key] = views.get(rec.storage_key, 0) + 1
    fused = set()
    for rec in fc.tensors:
        found = tensors.numpy_dtype(rec.dtype)
        contiguous = rec.stride is None or tuple(rec.stride) == safe_pickle.contiguous(tuple(rec.shape))
        if views[rec.storage_key] == 1 and found is not None and found[1] and contiguous:
            fused.add(f"{fc.prefix}data/{rec.storage_key}")
    return fused


# --- a second opinion: torch's own loader (--deep torch) --------------------------

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
