"""Checkpoint integrity, resumability and the safe fallback, per stage.

Every checkpoint gets a structural check that never runs a pickle: the zip's
central directory and local headers, CRCs of the pickle and metadata entries,
the globals its pickles name, and an inert read of each pickle (see
`safe_pickle`) that yields key sets, tensor shapes, optimizer groups and the
saved step without touching tensor data. A deep scan adds CRCs of every
tensor entry and `torch.load(weights_only=True, mmap=True)` with a finiteness
check; by default it runs only where it changes the answer: newest first
until one checkpoint passes (that one is the fallback), plus any checkpoint
whose structure already looks inconsistent.
"""
from __future__ import annotations

import importlib.util
import pickle
import re
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import bundle, safe_pickle
from .rules import Finding

EXPECTED_FILES = ("model_state_dict.pt", "optim_state_dict.pt", "state.pt")
MUON_FILES = ("all_optimizers.pt", "all_schedulers.pt")
_CKPT_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<kind>step|checkpoint)_(?P<step>\d+)"
                        r"(?P<ext>\.(?:pt|pth|ckpt))?$")
# Worst first: a checkpoint's status is its worst problem.
STATUSES = ("unsafe_pickle", "missing_files", "truncated", "corrupt", "empty",
            "non_finite", "inconsistent", "valid")
UNUSABLE = frozenset(STATUSES[:6])
_CHUNK = 1 << 20
_TS_FORMAT = "%Y_%m_%d_%H_%M_%S"


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# --- records -------------------------------------------------------------------

@dataclass
class Problem:
    status: str  # one of STATUSES (not "valid")
    file: str | None
    detail: str


@dataclass
class FileCheck:
    """One .pt file: what its structure and pickle say."""

    name: str
    size: int = 0
    format: str = "zip"  # zip | legacy | unreadable
    entries: int = 0
    globals: list[str] = field(default_factory=list)
    foreign_globals: list[str] = field(default_factory=list)
    crc_checked: str = "none"  # none | metadata | all
    facts: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    content: object = None  # the inert unpickled object (not serialised)
    storages_nbytes: int = 0


@dataclass
class Checkpoint:
    stage: str
    step: int
    path: Path
    single_file: bool = False
    files: dict[str, FileCheck] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    deep: str = "no"  # no | passed | failed | unavailable
    key_signature: frozenset | None = None

    @property
    def status(self) -> str:
        found = {p.status for p in self.problems}
        return next((s for s in STATUSES if s in found), "valid")

    @property
    def usable(self) -> bool:
        return self.status not in UNUSABLE

    @property
    def model_file(self) -> str:
        """The file holding the weights: model_state_dict.pt, or the one file."""
        return self.path.name if self.single_file else "model_state_dict.pt"

    def file_path(self, name: str) -> Path:
        return self.path if self.single_file else self.path / name

    def newest_mtime(self) -> float:
        """When anything in the checkpoint was last written (OSError if gone)."""
        files = [self.path] if self.single_file else [*self.path.iterdir(), self.path]
        return max(p.stat().st_mtime for p in files)

    def fact(self, file: str, key: str, default=None):
        fc = self.files.get(file)
        return fc.facts.get(key, default) if fc else default

    def summary(self) -> dict:
        return {"step": self.step, "path": str(self.path), "status": self.status,
                "deep_scan": self.deep,
                "evidence": [{"file": p.file, "status": p.status, "detail": p.detail}
                             for p in self.problems][:10]}

    def details(self) -> dict:
        out = self.summary()
        out["files"] = {n: {k: v for k, v in vars(fc).items() if k not in ("content", "problems")}
                        for n, fc in self.files.items()}
        out["extra_files"] = self.extra_files
        return out


# --- discovery -------------------------------------------------------------------

def parse_checkpoint_name(name: str) -> tuple[str | None, int] | None:
    """`dynamics_step_1200` -> ('dynamics', 1200); aliases map to their stage."""
    m = _CKPT_NAME.match(name)
    if not m:
        return None
    return bundle.canonical_stage(m.group("prefix")), int(m.group("step"))


def _checkpoints_in(ckpt_dir: Path, stage: str) -> list[tuple[int, Path]]:
    out = []
    for child in ckpt_dir.iterdir():
        parsed = parse_checkpoint_name(child.name)
        if parsed and (child.is_dir() or child.suffix in (".pt", ".pth", ".ckpt")):
            out.append((parsed[1], child))
    return sorted(out, key=lambda t: t[0])


@dataclass
class StageCheckpoints:
    stage: str
    checkpoints_dir: Path
    run_root: Path | None
    found: list[tuple[int, Path]]


def discover(path: Path) -> list[StageCheckpoints]:
    """Checkpoints under a bundle root, run root, stage dir, checkpoints dir or
    one checkpoint dir. For a bundle with several run roots, each stage comes
    from the newest run root that has checkpoints for it."""
    path = Path(path)
    parsed = parse_checkpoint_name(path.name)
    if parsed and (path.is_dir() or path.is_file()):
        stage = parsed[0] or bundle.locate_stage(path)[0] or "unknown"
        return [StageCheckpoints(stage, path.parent, _run_root_of(path.parent), [(parsed[1], path)])]
    if path.name == "checkpoints" and path.is_dir():
        stage = bundle.locate_stage(path.parent)[0] or "unknown"
        return [StageCheckpoints(stage, path, _run_root_of(path), _checkpoints_in(path, stage))]
    stage, stage_dir = bundle.locate_stage(path)
    if stage and stage_dir == path:
        return _from_stage_dir(stage, path)
    out: dict[str, StageCheckpoints] = {}
    for root in bundle.find_run_roots(path):  # oldest first: newer ones replace
        for stage, sdir in bundle.stage_dirs(root).items():
            for sc in _from_stage_dir(stage, sdir):
                if sc.found or stage not in out:
                    out[stage] = sc
    return [out[s] for s in bundle.STAGES if s in out]


def _from_stage_dir(stage: str, stage_dir: Path) -> list[StageCheckpoints]:
    cdir = stage_dir / "checkpoints"
    found = _checkpoints_in(cdir, stage) if cdir.is_dir() else []
    return [StageCheckpoints(stage, cdir, stage_dir.parent, found)]


def _run_root_of(ckpt_dir: Path) -> Path | None:
    _, sdir = bundle.locate_stage(ckpt_dir)
    return sdir.parent if sdir else None


# --- structural check (no pickle is ever run) -------------------------------------

def check_file(path: Path, thresholds: dict) -> FileCheck:
    """Zip structure, CRCs of the pickle and metadata entries, pickle globals
    and an inert read of the pickle. Tensor data CRCs are the deep scan's."""
    fc = FileCheck(path.name)
    try:
        fc.size = path.stat().st_size
    except OSError as exc:
        fc.format = "unreadable"
        fc.problems.append(Problem("missing_files", path.name, f"cannot stat: {exc.strerror}"))
        return fc
    if fc.size == 0:
        fc.format = "unreadable"
        fc.problems.append(Problem("truncated", path.name, "zero bytes"))
        return fc
    try:
        with zipfile.ZipFile(path) as zf:
            _check_zip(zf, fc, thresholds)
    except zipfile.BadZipFile as exc:
        _not_a_zip(path, fc, exc)
    except OSError as exc:
        fc.format = "unreadable"
        fc.problems.append(Problem("corrupt", path.name, f"read error: {exc.strerror or exc}"))
    return fc


def _not_a_zip(path: Path, fc: FileCheck, exc: Exception) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04"):
        fc.format = "unreadable"
        fc.problems.append(Problem("truncated", fc.name,
                                   f"zip without a central directory ({fc.size} bytes): "
                                   f"the write stopped early ({exc})"))
    elif head[:1] == b"\x80":
        fc.format = "legacy"
        fc.problems.append(Problem("inconsistent", fc.name,
                                   "legacy (pre-1.6) torch format: no zip structure to verify"))
    else:
        fc.format = "unreadable"
        fc.problems.append(Problem("corrupt", fc.name, f"not a torch zip archive ({exc})"))


def _check_zip(zf: zipfile.ZipFile, fc: FileCheck, thresholds: dict) -> None:
    infos = zf.infolist()
    fc.entries = len(infos)
    pkl = next((i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None)
    if pkl is None:
        fc.problems.append(Problem("corrupt", fc.name, "no data.pkl entry in the archive"))
        return
    prefix = pkl.filename[: -len("data.pkl")]
    for info in infos:
        if info.header_offset + info.compress_size > fc.size:
            fc.problems.append(Problem("truncated", fc.name,
                                       f"entry {info.filename} runs past the end of the file"))
            return
    limit = int(thresholds["checkpoints"]["max_pickle_bytes"])
    if pkl.file_size > limit:
        fc.problems.append(Problem("inconsistent", fc.name,
                                   f"data.pkl is {pkl.file_size} bytes (> {limit}); not read"))
        return
    try:
        data = zf.read(pkl)  # zipfile verifies the CRC
        for info in infos:
            if info is pkl:
                continue
            # Metadata entries only: reading every tensor byte of every
            # checkpoint would cost more than loading them (deep scan does).
            if not info.filename.startswith(prefix + "data/"):
                _read_entry(zf, info)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        fc.problems.append(Problem("corrupt", fc.name, f"{exc}"))
        return
    fc.crc_checked = "metadata"
    _inspect_pickle(data, fc, zf, prefix)


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    with zf.open(info) as fh:  # raises BadZipFile on a CRC mismatch at EOF
        while fh.read(_CHUNK):
            pass


def _inspect_pickle(data: bytes, fc: FileCheck, zf: zipfile.ZipFile, prefix: str) -> None:
    up = safe_pickle.RestrictedUnpickler(data)
    try:
        obj = safe_pickle.safe_load(data, up)
    except safe_pickle.UnsafePickle as exc:
        fc.problems.append(Problem("unsafe_pickle", fc.name,
                                   f"pickle names a code-execution global: {exc} (refused, nothing ran)"))
        return
    except pickle.UnpicklingError as exc:
        fc.problems.append(Problem("corrupt", fc.name, f"pickle unreadable: {exc}"))
        return
    finally:
        fc.globals, fc.foreign_globals = up.report.all, up.report.foreign
    fc.content = obj
    _check_storages(obj, fc, zf, prefix)


def _leaves(obj, kind: type, path: str = ""):
    """(dotted path, leaf) for every `kind` leaf in nested dicts/lists/tuples.

    Each container is visited once (a pickle can share one list under many
    parents: 40 nested [x, x] pairs would otherwise mean 2**40 visits), and
    at most MAX_NODES containers are walked."""
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
        if visited > MAX_NODES:
            return
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((f"{here}.{k}" if here else str(k), v) for k, v in reversed(list(items)))


MAX_NODES = 1_000_000


def _tensors(obj):
    """(dotted path, TensorInfo) for every tensor the pickle describes."""
    return _leaves(obj, safe_pickle.TensorInfo)


def _check_storages(obj, fc: FileCheck, zf: zipfile.ZipFile, prefix: str) -> None:
    """Every storage the pickle references exists with the size it claims."""
    sizes = {i.filename: i.file_size for i in zf.infolist()}
    seen = {}
    for _, t in _tensors(obj):
        if t.storage is not None:
            seen[t.storage.key] = t.storage
    for key, ref in seen.items():
        entry = f"{prefix}data/{key}"
        if entry not in sizes:
            fc.problems.append(Problem("corrupt", fc.name, f"tensor storage {entry} is missing"))
        elif sizes[entry] != ref.nbytes:
            fc.problems.append(Problem("corrupt", fc.name,
                                       f"tensor storage {entry} holds {sizes[entry]} bytes, "
                                       f"the pickle says {ref.nbytes}"))
    fc.storages_nbytes = sum(r.nbytes for r in seen.values())


# --- what each file must hold -----------------------------------------------------

def _model_facts(fc: FileCheck) -> None:
    obj = fc.content
    if isinstance(obj, dict) and not _is_plain_state_dict(obj):
        for key in ("model_state_dict", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k: t for k, t in obj.items() if isinstance(t, safe_pickle.TensorInfo)} \
        if isinstance(obj, dict) else {}
    fc.facts.update(tensors=len(tensors), parameters=sum(t.numel for t in tensors.values()))
    fc.facts["keys"] = sorted(tensors)
    if not tensors:
        fc.problems.append(Problem("empty", fc.name,
                                   f"holds no tensors ({type(obj).__name__} with "
                                   f"{len(obj) if hasattr(obj, '__len__') else 0} items, "
                                   f"{fc.size} bytes)"))


def _is_plain_state_dict(d: dict) -> bool:
    return any(isinstance(v, safe_pickle.TensorInfo) for v in d.values())


def _optim_facts(fc: FileCheck) -> None:
    obj = fc.content
    if not isinstance(obj, dict) or not obj:
        fc.problems.append(Problem("empty", fc.name, f"holds an empty {type(obj).__name__}"))
        return
    state, groups = obj.get("state"), obj.get("param_groups")
    if not isinstance(groups, list) or not groups:
        fc.problems.append(Problem("inconsistent", fc.name, "no param_groups"))
        groups = []
    params = [p for g in groups if isinstance(g, dict) for p in g.get("params", [])]
    lrs = [g.get("lr") for g in groups if isinstance(g, dict)]
    fc.facts.update(state_entries=len(state) if isinstance(state, dict) else 0,
                    param_groups=len(groups), group_params=len(params),
                    learning_rates=[_num(x) for x in lrs])
    if not isinstance(state, dict) or not state:
        fc.problems.append(Problem("empty", fc.name,
                                   "optimizer state is empty: resuming restarts the moments"))
    elif params and not set(state) <= set(params):
        fc.problems.append(Problem("inconsistent", fc.name,
                                   "optimizer state has entries for parameters no group lists"))


def _num(x):
    return x if isinstance(x, (int, float)) else None


def _state_facts(fc: FileCheck, step: int) -> None:
    obj = fc.content
    if not isinstance(obj, dict) or not obj:
        fc.problems.append(Problem("empty", fc.name, f"holds an empty {type(obj).__name__}"))
        return
    saved = obj.get("step")
    sched = obj.get("scheduler_state_dict")
    fc.facts.update(step=saved if isinstance(saved, int) else None,
                    timestamp=obj.get("timestamp") if isinstance(obj.get("timestamp"), str) else None,
                    scheduler=None if sched is None else
                    {k: _num(sched.get(k)) for k in ("last_epoch", "_step_count")}
                    if isinstance(sched, dict) else type(sched).__name__,
                    has_config=isinstance(obj.get("config"), dict))
    if not isinstance(saved, int):
        fc.problems.append(Problem("inconsistent", fc.name, "no integer `step`"))
    elif saved != step:
        fc.problems.append(Problem("inconsistent", fc.name,
                                   f"saved step {saved} does not match the folder's step {step}"))


def config_of(ck: Checkpoint) -> dict:
    """The stage config saved in state.pt (inert values shown as text)."""
    fc = ck.files.get("state.pt")
    obj = fc.content if fc else None
    cfg = obj.get("config") if isinstance(obj, dict) else None
    return safe_pickle.plain(cfg) if isinstance(cfg, dict) else {}


def check_checkpoint(stage: str, step: int, path: Path, thresholds: dict) -> Checkpoint:
    ck = Checkpoint(stage, step, path, single_file=path.is_file())
    if ck.single_file:
        fc = check_file(path, thresholds)
        ck.files[path.name] = fc
        if not fc.problems:
            _model_facts(fc)
        ck.problems += fc.problems
    else:
        _check_dir(ck, thresholds)
    keys = ck.fact(ck.model_file, "keys")
    ck.key_signature = frozenset(keys) if keys else None
    return ck


def _check_dir(ck: Checkpoint, thresholds: dict) -> None:
    """The three files of a `<stage>_step_<N>/` checkpoint."""
    path, step = ck.path, ck.step
    present = {p.name for p in path.iterdir() if p.is_file()}
    ck.extra_files = sorted(present - set(EXPECTED_FILES))
    missing = [n for n in EXPECTED_FILES if n not in present]
    if missing:
        ck.problems.append(Problem("missing_files", None, "missing " + ", ".join(missing)))
    for name in EXPECTED_FILES:
        if name in present:
            fc = check_file(path / name, thresholds)
            ck.files[name] = fc
            if not fc.problems:
                {"model_state_dict.pt": _model_facts, "optim_state_dict.pt": _optim_facts,
                 "state.pt": lambda f: _state_facts(f, step)}[name](fc)
            if name != "state.pt" and fc.foreign_globals:
                fc.problems.append(Problem("unsafe_pickle", name,
                                           "a weights file names non-torch globals: "
                                           + ", ".join(fc.foreign_globals)))
            ck.problems += fc.problems


# --- deep scan (torch) --------------------------------------------------------------

def deep_scan(ck: Checkpoint, thresholds: dict) -> None:
    """Full CRCs, torch.load(weights_only=True, mmap=True), finiteness."""
    if not torch_available():
        ck.deep = "unavailable"
        return
    before = len(ck.problems)
    for name in [n for n in ck.files if n != "state.pt"]:
        problem = _verify_all_crcs(ck.file_path(name), name)
        if problem:
            ck.problems.append(problem)
            continue
        ck.files[name].crc_checked = "all"
        _load_and_scan(ck, name)
    ck.deep = "passed" if len(ck.problems) == before else "failed"


def _verify_all_crcs(path: Path, name: str) -> Problem | None:
    """Read every entry to its end: zipfile checks each CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                _read_entry(zf, info)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        return Problem("corrupt", name, f"{exc}")
    return None


def _load_and_scan(ck: Checkpoint, name: str) -> None:
    import torch
    try:
        obj = torch.load(ck.file_path(name), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        ck.problems.append(Problem("unsafe_pickle", name, f"weights_only load refused: "
                                   f"{str(exc).splitlines()[0][:200]}"))
        return
    except Exception as exc:
        ck.problems.append(Problem("corrupt", name, f"torch.load failed: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        return
    bad = []
    for key, t in _leaves(obj, torch.Tensor):
        if t.is_floating_point() or t.is_complex():
            n = int(t.numel() - torch.isfinite(t).sum())
            if n:
                bad.append((key, n))
    ck.files[name].facts["non_finite_tensors"] = len(bad)
    if bad:
        shown = ", ".join(f"{k} ({n})" for k, n in bad[:5])
        ck.problems.append(Problem("non_finite", name,
                                   f"{len(bad)} tensors hold NaN/Inf: {shown}"))


# --- one stage ----------------------------------------------------------------------

@dataclass
class StageResult:
    stage: str
    checkpoints_dir: Path
    run_root: Path | None
    checkpoints: list[Checkpoint]
    fallback: Checkpoint | None = None
    findings: list[Finding] = field(default_factory=list)
    throughput: dict | None = None

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def newest_valid(self) -> Checkpoint | None:
        return next((c for c in reversed(self.checkpoints) if c.status == "valid"), None)


def check_stage(sc: StageCheckpoints, thresholds: dict, deep: str = "auto",
                progress=None) -> StageResult:
    """Structural checks for all, consistency across the stage, then deep scans."""
    cks = []
    for i, (step, path) in enumerate(sc.found):
        cks.append(check_checkpoint(sc.stage, step, path, thresholds))
        if progress and (i + 1) % 25 == 0:
            progress(f"{sc.stage}: {i + 1}/{len(sc.found)} checkpoints checked")
    _check_key_sets(cks)
    res = StageResult(sc.stage, sc.checkpoints_dir, sc.run_root, cks)
    _run_deep_scans(res, thresholds, deep)
    res.fallback = _fallback(res)
    res.throughput = throughput(cks)
    return res


def _check_key_sets(cks: list[Checkpoint]) -> None:
    """A model whose key set differs from the stage's usual one is inconsistent
    (a different architecture or a partial save)."""
    sigs = Counter(c.key_signature for c in cks if c.key_signature and c.usable)
    if len(sigs) < 2:
        return
    usual = sigs.most_common(1)[0][0]
    for c in cks:
        if c.key_signature and c.usable and c.key_signature != usual:
            missing, extra = len(usual - c.key_signature), len(c.key_signature - usual)
            c.problems.append(Problem("inconsistent", "model_state_dict.pt",
                                      f"key set differs from the stage's other checkpoints: "
                                      f"{missing} keys missing, {extra} extra"))


def _run_deep_scans(res: StageResult, thresholds: dict, mode: str) -> None:
    if mode == "none":
        return
    if mode == "all":
        for c in res.checkpoints:
            if c.usable:
                deep_scan(c, thresholds)
        return
    for c in res.checkpoints:  # structure already looks wrong: look closer
        if c.status == "inconsistent":
            deep_scan(c, thresholds)
    for c in reversed(res.checkpoints):  # newest first until one passes
        if c.status == "valid":
            deep_scan(c, thresholds)
            if c.deep in ("passed", "unavailable"):
                break


def _fallback(res: StageResult) -> Checkpoint | None:
    """The newest checkpoint that passed every check that ran on it."""
    for c in reversed(res.checkpoints):
        if c.status == "valid" and c.deep in ("passed", "unavailable", "no"):
            if c.deep == "no" and torch_available() and any(
                    d.deep == "failed" for d in res.checkpoints if d.step > c.step):
                continue  # newer ones failed deep: only trust deep-verified ones
            return c
    return None


def _parse_ts(text) -> float | None:
    try:
        return datetime.strptime(str(text), _TS_FORMAT).timestamp()
    except ValueError:
        return None


def throughput(cks: list[Checkpoint]) -> dict | None:
    """Steps per second between the first and last checkpoint with a time:
    state.pt's `timestamp`, else the model file's mtime."""
    points = []
    for c in cks:
        t = _parse_ts(c.fact("state.pt", "timestamp")) if c.fact("state.pt", "timestamp") else None
        source = "state.pt timestamp"
        if t is None:
            try:
                t, source = c.file_path(c.model_file).stat().st_mtime, "file mtime"
            except OSError:
                continue
        points.append((c.step, t, source))
    if len(points) < 2:
        return None
    (s0, t0, src), (s1, t1, _) = points[0], points[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return {"steps_per_second": (s1 - s0) / (t1 - t0), "from_step": s0, "to_step": s1,
            "seconds": t1 - t0, "source": src}


# --- findings --------------------------------------------------------------------------

def being_written(ck: Checkpoint, now: float, seconds: float) -> bool:
    """A truncated or incomplete newest checkpoint touched moments ago is most
    likely still being saved by a live run, not broken."""
    if ck.status not in ("truncated", "missing_files"):
        return False
    try:
        return now - ck.newest_mtime() < seconds
    except (OSError, ValueError):
        return False


def stage_findings(res: StageResult, thresholds: dict, now: float | None = None) -> list[Finding]:
    t = thresholds["checkpoints"]
    out: list[Finding] = []
    latest, fb = res.latest, res.fallback
    evidence = str(res.checkpoints_dir)
    now = time.time() if now is None else now
    if latest is not None and being_written(latest, now, t["in_progress_seconds"]):
        out.append(Finding("ckpt_latest_in_progress", "info", res.stage, "latest_status", latest.status,
                           "valid", [latest.step], str(latest.path),
                           f"latest checkpoint {latest.path.name} is {latest.status} but was written "
                           f"{now - latest.newest_mtime():.0f} s ago: probably still being saved; judged on "
                           f"the ones before it"))
        res = StageResult(res.stage, res.checkpoints_dir, res.run_root, res.checkpoints[:-1], fb)
        latest = res.latest
    if latest is None:
        if res.checkpoints_dir.is_dir() or res.run_root:
            out.append(Finding("ckpt_none_found", t["none_found_severity"], res.stage, "checkpoints",
                               0, None, [], evidence,
                               "no checkpoints found: nothing to resume from"))
        return out
    fb_text = (f"fall back to {fb.path.name} (step {fb.step})" if fb else
               "no valid checkpoint to fall back to")
    unsafe = [c for c in res.checkpoints if c.status == "unsafe_pickle"]
    if unsafe:
        out.append(Finding("ckpt_unsafe_pickle", "critical", res.stage, "pickle_globals",
                           unsafe[0].problems[0].detail, "torch/collections only",
                           [c.step for c in unsafe], str(unsafe[0].path),
                           f"{len(unsafe)} checkpoint(s) carry pickles that could run code; "
                           "they were not loaded. Do not torch.load them without weights_only"))
    invalid = [c for c in res.checkpoints if c.status != "valid"]
    ratio = len(invalid) / len(res.checkpoints)
    if not any(c.status == "valid" for c in res.checkpoints):
        out.append(Finding("ckpt_none_valid", "critical", res.stage, "valid_checkpoints", 0,
                           ">= 1", [c.step for c in invalid], evidence,
                           f"none of {len(res.checkpoints)} checkpoints is valid "
                           f"({_status_counts(invalid)})"))
    elif ratio >= t["invalid_ratio_critical"]:
        out.append(Finding("ckpt_invalid_ratio", "critical", res.stage, "invalid_ratio",
                           round(ratio, 3), t["invalid_ratio_critical"], [c.step for c in invalid],
                           evidence, f"{len(invalid)} of {len(res.checkpoints)} checkpoints are "
                           f"not valid ({_status_counts(invalid)}); {fb_text}"))
    elif ratio > t["invalid_ratio_watch"]:
        out.append(Finding("ckpt_some_invalid", "watch", res.stage, "invalid_ratio",
                           round(ratio, 3), t["invalid_ratio_watch"], [c.step for c in invalid],
                           evidence, f"{len(invalid)} of {len(res.checkpoints)} checkpoints are "
                           f"not valid ({_status_counts(invalid)})"))
    if latest.status != "valid":
        sev = "critical" if latest.status in UNUSABLE else "watch"
        out.append(Finding("ckpt_latest_unusable" if sev == "critical" else "ckpt_latest_invalid",
                           sev, res.stage, "latest_status", latest.status, "valid", [latest.step],
                           str(latest.path), f"latest checkpoint {latest.path.name} is "
                           f"{latest.status}: {latest.problems[0].detail}; {fb_text}"))
    return out


def _status_counts(cks: list[Checkpoint]) -> str:
    c = Counter(ck.status for ck in cks)
    return ", ".join(f"{n} {s}" for s, n in c.most_common())


# --- cross-stage ------------------------------------------------------------------------

DEPENDENCY_KEYS = {"video_tokenizer_path": "video_tokenizer", "latent_actions_path": "latent_actions"}


def resolve_recorded_path(recorded: str, bundle_root: Path, run_root: Path | None) -> tuple[Path | None, str]:
    """A path saved on the training host, found in this (maybe moved) bundle:
    as recorded, then by its `results/...` suffix under the bundle root, then by
    its `<run>/<stage>/checkpoints/<name>` tail under this run's results dir."""
    p = Path(recorded)
    if p.exists():
        return p, "as recorded"
    parts = p.parts
    if "results" in parts:
        i = len(parts) - 1 - parts[::-1].index("results")
        cand = Path(bundle_root, *parts[i:])
        if cand.exists():
            return cand, "results/ suffix under the bundle root"
    if run_root is not None and len(parts) >= 4:
        cand = Path(run_root.parent, *parts[-4:])
        if cand.exists():
            return cand, "run-root suffix"
        cand = Path(run_root, *parts[-3:])
        if cand.exists():
            return cand, "stage/checkpoints suffix in this run root"
    return None, "not found under the bundle"


def dependency_findings(results: dict[str, StageResult], bundle_root: Path,
                        thresholds: dict) -> tuple[list[dict], list[Finding]]:
    """Dynamics trains on frozen tokenizer and action checkpoints: they must exist
    and be valid, or the dynamics stage learned from garbage."""
    dyn = results.get("dynamics")
    src = next((c for c in reversed(dyn.checkpoints) if config_of(c)), None) if dyn else None
    if src is None:
        return [], []
    cfg = config_of(src)
    facts, out = [], []
    for key, stage in DEPENDENCY_KEYS.items():
        recorded = cfg.get(key)
        if not isinstance(recorded, str) or not recorded:
            continue
        path, how = resolve_recorded_path(recorded, bundle_root, dyn.run_root)
        fact = {"key": key, "recorded": recorded, "resolved": str(path) if path else None,
                "how": how, "status": None}
        if path is None:
            out.append(Finding("ckpt_dependency_missing", thresholds["checkpoints"]["dependency_missing_severity"],
                               "dynamics", key, recorded, "exists", [], str(src.path / "state.pt"),
                               f"dynamics was trained from {recorded}, which is not in this bundle"))
        else:
            ck = _find_checked(results.get(stage), path) or _check_one(stage, path, thresholds)
            fact["status"] = ck.status
            if ck.status != "valid":
                out.append(Finding("ckpt_dependency_invalid", "critical", "dynamics", key, ck.status,
                                   "valid", [ck.step], str(path),
                                   f"dynamics was trained from {path.name}, which is {ck.status}: "
                                   f"{ck.problems[0].detail}"))
        facts.append(fact)
    return facts, out


def _find_checked(res: StageResult | None, path: Path) -> Checkpoint | None:
    if res is None:
        return None
    real = path.resolve()
    return next((c for c in res.checkpoints if c.path.resolve() == real), None)


def _check_one(stage: str, path: Path, thresholds: dict) -> Checkpoint:
    parsed = parse_checkpoint_name(path.name)
    return check_checkpoint(stage, parsed[1] if parsed else -1, path, thresholds)


# --- whole input -----------------------------------------------------------------------

def analyse(paths: list[Path], thresholds: dict, deep: str = "auto", progress=None,
            now: float | None = None) -> dict:
    """Check every stage's checkpoints under `paths`; one JSON-ready document
    (compact) plus `details` (every checkpoint) for the caller to write."""
    started = time.perf_counter()
    found: list[StageCheckpoints] = []
    for p in paths:
        found += discover(p)
    results: dict[str, StageResult] = {}
    for sc in found:
        if sc.stage in results and not sc.found:
            continue
        results[sc.stage] = check_stage(sc, thresholds, deep, progress)
    root = Path(".") if not paths else paths[0] if (Path(paths[0]) / "results").is_dir() \
        else bundle.bundle_root_of(paths[0])
    dep_facts, dep_findings = dependency_findings(results, root, thresholds)
    doc = {"torch": _torch_version(), "deep_mode": deep if torch_available() else
           "unavailable: torch not installed (structural checks only)", "stages": {},
           "dependencies": dep_facts}
    details = {}
    for stage, res in results.items():
        res.findings = stage_findings(res, thresholds, now) + [f for f in dep_findings if f.stage == stage]
        doc["stages"][stage] = stage_document(res)
        details[stage] = [c.details() for c in res.checkpoints]
    doc["seconds"] = round(time.perf_counter() - started, 3)
    return {"doc": doc, "details": details, "results": results}


def _torch_version() -> str | None:
    if not torch_available():
        return None
    import torch
    return torch.__version__


def stage_document(res: StageResult) -> dict:
    from .rules import findings_dicts, stage_verdict
    by_status: dict[str, list[int]] = {}
    for c in res.checkpoints:
        by_status.setdefault(c.status, []).append(c.step)
    ref = res.fallback or res.newest_valid
    latest = res.latest
    return {
        "verdict": stage_verdict(res.findings, enough_data=bool(res.checkpoints)),
        "checkpoints_dir": str(res.checkpoints_dir),
        "total": len(res.checkpoints),
        "valid": len(by_status.get("valid", [])),
        "steps_by_status": {s: _steps_text(v) for s, v in by_status.items()},
        "latest": latest.summary() if latest else None,
        "latest_resumable": bool(latest and latest.status == "valid" and latest.deep != "failed"
                                 and latest is res.fallback),
        "newest_valid": res.newest_valid.step if res.newest_valid else None,
        "recommended_fallback": None if res.fallback is None else {
            "step": res.fallback.step, "path": str(res.fallback.path),
            "verified": "deep scan" if res.fallback.deep == "passed" else "structure only"},
        "deep_scanned": [c.step for c in res.checkpoints if c.deep in ("passed", "failed")],
        "problems": [c.summary() for c in res.checkpoints if c.status != "valid"][:20],
        "model": None if ref is None else {k: ref.fact(ref.model_file, k) for k in
                                           ("tensors", "parameters")},
        "optimizer": None if ref is None else {k: ref.fact("optim_state_dict.pt", k) for k in
                                               ("state_entries", "param_groups", "learning_rates")},
        "state": None if ref is None else {k: ref.fact("state.pt", k) for k in
                                           ("step", "timestamp", "scheduler")},
        "extra_files": sorted({f for c in res.checkpoints for f in c.extra_files}),
        "throughput": res.throughput,
        "findings": findings_dicts(res.findings),
    }


def _steps_text(steps: list[int], limit: int = 30) -> list:
    """Bounded: the first and last steps with a count in between."""
    if len(steps) <= limit:
        return steps
    return steps[:limit // 2] + [f"... {len(steps) - limit} more ..."] + steps[-limit // 2:]
