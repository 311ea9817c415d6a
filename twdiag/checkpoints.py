"""Checkpoint integrity per stage: the bundle's `<stage>_step_<N>/` folders
(or single-file `<name>_checkpoint_<N>.pt`), each checked without running
its pickle (`ptfile`), then judged as a set: consistent key sets, saved
steps, upstream checkpoints dynamics depends on.

Which checkpoints get a deep scan, and which one is the fallback, is the
fallback policy's call (`fallback`), because it needs the history too.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import bundle as bundle_mod, forking, ptfile, readcache, safefs, safe_pickle
from .ptfile import STATUSES, UNUSABLE, Problem  # noqa: F401  (re-exported)
from .rules import Finding

EXPECTED_FILES = ("model_state_dict.pt", "optim_state_dict.pt", "state.pt")
MUON_FILES = ("all_optimizers.pt", "all_schedulers.pt")
_TS_FORMAT = "%Y_%m_%d_%H_%M_%S"
MAX_MODEL_KEYS = 100_000  # keys kept per state dict (a TinyWorlds model has a few hundred)


def torch_available() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # hidden or broken: as good as absent
        return False


@dataclass
class Checkpoint:
    stage: str
    step: int
    path: Path
    single_file: bool = False
    files: dict[str, ptfile.FileCheck] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    extra_files: list[str] = field(default_factory=list)
    deep: str = "no"  # no | passed | failed | unavailable
    deep_files: list[str] = field(default_factory=list)  # files whose tensors were loaded
    weights: dict = field(default_factory=dict)  # model file: weight_norm, max_abs_weight
    key_signature: frozenset | None = None
    local_step: int | None = None  # the step in the folder's name, when `step` is global (a resumed run)

    def place(self, offset: int) -> None:
        """Put the checkpoint on the stage's global axis (idempotent)."""
        if self.local_step is None:
            self.local_step = self.step
        self.step = self.local_step + offset

    @property
    def status(self) -> str:
        found = {p.status for p in self.problems}
        return next((s for s in STATUSES if s in found), "valid")

    @property
    def usable(self) -> bool:
        return self.status not in UNUSABLE

    @property
    def intact(self) -> bool:
        """Structurally valid and no deep scan failed."""
        return self.status == "valid" and self.deep != "failed"

    @property
    def model_file(self) -> str:
        """The file holding the weights: model_state_dict.pt, or the one file."""
        return self.path.name if self.single_file else "model_state_dict.pt"

    def file_path(self, name: str) -> Path:
        return self.path if self.single_file else self.path / name

    def fact(self, file: str, key: str, default=None):
        fc = self.files.get(file)
        return fc.facts.get(key, default) if fc else default

    def summary(self) -> dict:
        local = {"local_step": self.local_step} if self.local_step not in (None, self.step) else {}
        return {"step": self.step, **local, "path": str(self.path), "status": self.status,
                "deep_scan": self.deep, "deep_scanned_files": self.deep_files,
                "evidence": [{"file": p.file, "status": p.status, "detail": p.detail}
                             for p in self.problems][:10]}

    def details(self) -> dict:
        out = self.summary()
        out["files"] = {n: fc.public() for n, fc in self.files.items()}
        out["extra_files"] = self.extra_files
        out["weights"] = self.weights
        return out


# --- what each file must hold -----------------------------------------------------

def _state_dict_of(obj):
    """A flat state dict, or the one nested under a usual key (single files)."""
    if isinstance(obj, dict) and not any(isinstance(v, safe_pickle.TensorInfo) for v in obj.values()):
        for key in ("model_state_dict", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def _model_facts(content, fc: ptfile.FileCheck) -> None:
    obj = _state_dict_of(content)
    tensors = {str(k)[:300]: t for k, t in itertools.islice(obj.items(), MAX_MODEL_KEYS)
               if isinstance(t, safe_pickle.TensorInfo)} if isinstance(obj, dict) else {}
    fc.facts.update(tensors=len(tensors), elements=sum(t.numel for t in tensors.values()),
                    keys=sorted(tensors),
                    shapes={k: list(t.shape) for k, t in tensors.items()})
    if isinstance(obj, dict) and any(not isinstance(k, str) for k in obj):
        fc.problem("inconsistent", "state dict keys are not all strings")
    if not tensors:
        n = len(obj) if isinstance(obj, (dict, list, tuple)) else 0
        fc.problem("empty", f"holds no tensors ({type(obj).__name__} with {n} items, {fc.size} bytes)")


readcache.PURE_DESCRIBERS.add(_model_facts)  # its facts depend on the object alone


def _param_ids(groups: list, cap: int) -> tuple[list, str | None]:
    """The params of every group, or the reason they are malformed. Counted
    before anything is copied: 40,000 groups sharing one list of 40,000 ids
    is a 382 KB pickle but 1.6 billion ids."""
    total = sum(len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) else 0
                for g in groups)
    if total > cap:
        return [], f"param groups list {total:,} parameters in all (more than {cap:,}; not read)"
    out = []
    for g in groups:
        params = g.get("params", []) if isinstance(g, dict) else None
        if not isinstance(params, (list, tuple)) or not all(
                isinstance(p, (int, str)) and not isinstance(p, bool) for p in params):
            return [], f"a param group's params is {type(params).__name__}, not a list of ids"
        out += params
    return out, None


def _optim_facts(content, fc: ptfile.FileCheck, cap: int) -> None:
    obj = content
    if not isinstance(obj, dict) or not obj:
        fc.problem("empty", f"holds an empty {type(obj).__name__}")
        return
    state, groups = obj.get("state"), obj.get("param_groups")
    if not isinstance(groups, list) or not groups:
        fc.problem("inconsistent", "no param_groups")
        groups = []
    params, bad = _param_ids(groups, cap)
    if bad:
        fc.problem("inconsistent", bad)
    lrs = [g.get("lr") for g in groups if isinstance(g, dict)]
    fc.facts.update(state_entries=len(state) if isinstance(state, dict) else 0,
                    param_groups=len(groups), group_params=len(params),
                    learning_rates=[_num(x) for x in lrs][:16])
    if not isinstance(state, dict) or not state:
        fc.problem("empty", "optimizer state is empty: resuming restarts the moments")
    elif params and not set(safe_pickle.check_keys(list(state))[:cap]) <= set(params):
        fc.problem("inconsistent", "optimizer state has entries for parameters no group lists")


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _state_facts(content, fc: ptfile.FileCheck, step: int, max_items: int) -> None:
    obj = content
    if not isinstance(obj, dict) or not obj:
        fc.problem("empty", f"holds an empty {type(obj).__name__}")
        return
    n = ptfile.count_items(obj, max_items)
    if n > max_items:
        fc.problem("inconsistent", f"holds more than {max_items:,} items; TinyWorlds' state.pt holds a step, a "
                                   "timestamp, a config and a scheduler state (hundreds)")
    saved = obj.get("step")
    sched = obj.get("scheduler_state_dict")
    ts = obj.get("timestamp")
    fc.facts.update(step=saved if isinstance(saved, int) and not isinstance(saved, bool) else None,
                    timestamp=_timestamp_text(ts),
                    scheduler=None if sched is None else
                    {k: _num(sched.get(k)) for k in ("last_epoch", "_step_count")}
                    if isinstance(sched, dict) else type(sched).__name__,
                    has_config=isinstance(obj.get("config"), dict))
    cfg = obj.get("config")
    fc.config = safe_pickle.plain(cfg) if isinstance(cfg, dict) else None
    if fc.facts["step"] is None:
        fc.problem("inconsistent", "no integer `step`")
    elif saved != step:
        fc.problem("inconsistent", f"saved step {saved} does not match the folder's step {step}")


def config_of(ck: Checkpoint) -> dict:
    """The stage config saved in state.pt (inert values shown as text)."""
    fc = ck.files.get("state.pt")
    return (fc.config if fc else None) or {}


def check_checkpoint(stage: str, step: int, path: Path, limits: ptfile.Limits) -> Checkpoint:
    ck = Checkpoint(stage, step, path, single_file=not safefs.is_dir(path))
    if ck.single_file:
        fc = ptfile.check_file(path, limits, allow_config=True, describe=_model_facts)
        ck.files[path.name] = fc
        ck.problems += fc.problems
    else:
        _check_dir(ck, limits)
    keys = ck.fact(ck.model_file, "keys")
    ck.key_signature = frozenset(keys) if keys else None
    _check_architecture(ck)
    return ck


def _check_architecture(ck: Checkpoint) -> None:
    """The model's keys and shapes against what its own config implies."""
    from . import architecture
    shapes = ck.fact(ck.model_file, "shapes")
    config = config_of(ck)
    if not shapes or not config or not ck.usable:
        return
    wrong = architecture.check(ck.stage, shapes, config)
    if wrong:
        ck.problems.append(Problem("inconsistent", ck.model_file,
                                   f"not the {ck.stage} model its config describes: " + "; ".join(wrong[:4])))


def _describer(name: str, step: int, limits: ptfile.Limits) -> ptfile.Describe:
    """The facts each file must yield, computed while its inert object exists."""
    if name == "model_state_dict.pt":
        return _model_facts
    if name == "optim_state_dict.pt":
        return _optim_describer(limits.budget.max_items)
    return lambda obj, fc: _state_facts(obj, fc, step, limits.state_max_items)  # the step: not pure


@functools.cache
def _optim_describer(cap: int) -> ptfile.Describe:
    """One describer per cap, so readcache can remember what an optimizer pickle gave."""
    describe = functools.partial(_optim_facts, cap=cap)
    readcache.PURE_DESCRIBERS.add(describe)
    return describe


def _check_dir(ck: Checkpoint, limits: ptfile.Limits) -> None:
    """The three files of a `<stage>_step_<N>/` checkpoint."""
    listing, _ = safefs.entries(ck.path, 1000)
    present = {p.name for p in listing if safefs.is_regular(p)}
    ck.extra_files = sorted({p.name for p in listing} - set(EXPECTED_FILES))[:20]
    missing = [n for n in EXPECTED_FILES if n not in present]
    if missing:
        odd = [n for n in missing if (ck.path / n).exists() or (ck.path / n).is_symlink()]
        why = f" ({', '.join(odd)}: not a regular file)" if odd else ""
        ck.problems.append(Problem("missing_files", None, "missing " + ", ".join(missing) + why))
    for name in EXPECTED_FILES:
        if name in present:
            fc = ptfile.check_file(ck.path / name, limits, allow_config=name == "state.pt",
                                   describe=_describer(name, ck.step, limits))
            ck.files[name] = fc
            ck.problems += fc.problems


_KEY_SET = "key set differs from the stage's other checkpoints"


def check_key_sets(cks: list[Checkpoint]) -> None:
    """A model whose key set differs from the stage's usual one is inconsistent
    (a different architecture or a partial save). Idempotent: a checkpoint
    checked again (--follow keeps them) carries the problem once."""
    for c in cks:
        c.problems = [p for p in c.problems if not p.detail.startswith(_KEY_SET)]
    sigs = Counter(c.key_signature for c in cks if c.key_signature and c.usable)
    if len(sigs) < 2:
        return
    usual = sigs.most_common(1)[0][0]
    for c in cks:
        if c.key_signature and c.usable and c.key_signature != usual:
            missing, extra = len(usual - c.key_signature), len(c.key_signature - usual)
            c.problems.append(Problem("inconsistent", c.model_file,
                                      f"{_KEY_SET}: {missing} keys missing, {extra} extra"))


# --- deep scan ----------------------------------------------------------------------

def deep_scan(ck: Checkpoint, limits: ptfile.Limits, chunk_elems: int, model_only: bool = False,
              second_opinion: bool = False) -> None:
    """Every CRC, then the tensors of the weight files viewed with numpy
    straight from the certified archive (state.pt holds no weights): NaN/Inf,
    the model's weight norm and max |w|. No torch. `second_opinion` also
    loads them with torch.load(weights_only=True) (`--deep torch`), where
    torch is installed. `model_only` scans just the weights file (enough
    for a reference point)."""
    for name in _unscanned(ck, model_only):
        facts, problem = ptfile.scan(*_scan_args(ck, name, limits, chunk_elems))
        _record(ck, name, facts, problem, limits, chunk_elems, second_opinion)
    _settle(ck)


def deep_scan_all(cks: list[Checkpoint], limits: ptfile.Limits, chunk_elems: int,
                  second_opinion: bool = False) -> None:
    """deep_scan of many checkpoints (`--deep all`): see deep_scan_each."""
    for _ in deep_scan_each(cks, limits, chunk_elems, second_opinion=second_opinion):
        pass


def deep_scan_each(cks: list[Checkpoint], limits: ptfile.Limits, chunk_elems: int, model_only: bool = False,
                   second_opinion: bool = False) -> Iterator[Checkpoint]:
    """deep_scan of many checkpoints, their files spread over forked workers
    (a scan is bound by reading memory, which each core does at its own
    pace); yields each checkpoint, in order, once its files are recorded
    here as deep_scan would. What a worker returns is small (facts, a
    problem). A caller that stops early (a time budget) stops the workers."""
    plan = [(ck, _unscanned(ck, model_only)) for ck in cks]
    results = forking.imap(ptfile.scan, [_scan_args(ck, name, limits, chunk_elems)
                                         for ck, names in plan for name in names])
    try:
        for ck, names in plan:
            for name in names:
                facts, problem = next(results)
                _record(ck, name, facts, problem, limits, chunk_elems, second_opinion)
            _settle(ck)
            yield ck
    finally:
        results.close()


def _scan_args(ck: Checkpoint, name: str, limits: ptfile.Limits, chunk_elems: int) -> tuple:
    """ptfile.scan's arguments for one file; norms for the weights file only."""
    return ck.file_path(name), ck.files[name], limits, chunk_elems, name == ck.model_file


def _unscanned(ck: Checkpoint, model_only: bool) -> list[str]:
    names = [ck.model_file] if model_only else [n for n in ck.files if n != "state.pt"]
    return [n for n in names if n not in ck.deep_files]


def _record(ck: Checkpoint, name: str, facts: dict, problem: Problem | None, limits: ptfile.Limits,
            chunk_elems: int, second_opinion: bool) -> None:
    fc = ck.files[name]
    if problem is None:
        fc.crc_checked = "all"
        if second_opinion and torch_available():
            torch_facts, problem = ptfile.load_and_scan(ck.file_path(name), limits.max_nodes, chunk_elems)
            shown = ("non_finite_tensors", "weight_norm") if name == ck.model_file else ("non_finite_tensors",)
            fc.facts["torch"] = {k: torch_facts.get(k) for k in shown}
    fc.facts.update(facts)
    if name == ck.model_file and facts:
        ck.weights = {k: facts[k] for k in ("weight_norm", "max_abs_weight")}
    if problem:
        ck.problems.append(problem)
        ck.deep = "failed"
    ck.deep_files.append(name)


def _settle(ck: Checkpoint) -> None:
    if ck.deep != "failed" and ck.deep_files:
        ck.deep = "passed"


# --- one stage ------------------------------------------------------------------------

@dataclass
class StageResult:
    stage: str
    checkpoints_dir: Path | None
    run_root: Path | None
    checkpoints: list[Checkpoint]
    findings: list[Finding] = field(default_factory=list)
    throughput: dict | None = None
    in_progress: Checkpoint | None = None  # the newest, still being saved by a live run

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def judged(self) -> list[Checkpoint]:
        """Checkpoints that count (a save still in progress does not)."""
        return [c for c in self.checkpoints if c is not self.in_progress]


def signature(path: Path) -> tuple:
    """What changes when a checkpoint is rewritten (a change detector for
    --follow, never evidence of when or whether a run is alive)."""
    files = [path] if not safefs.is_dir(path) else safefs.entries(path, 100)[0]
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f.name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((f.name, None))
    return tuple(out)


def check_stage(a: bundle_mod.StageArtifacts, limits: ptfile.Limits, progress=None,
                cache: dict | None = None, scan_chunk: int | None = None) -> StageResult:
    """Structural checks for all, then consistency across the stage. With a
    `cache`, an unchanged checkpoint keeps its earlier check (and deep scan).
    With `scan_chunk` (`--deep all`), each usable checkpoint is deep-scanned
    right after its structural check, by the same worker: the checks are
    then spread over the workers too, and overlap the scans."""
    cks: list[Checkpoint | None] = []
    todo = []  # (index, reference, signature) of those checked now
    for i, ref in enumerate(a.checkpoints):
        sig = signature(ref.path) if cache is not None else None
        hit = cache.get(str(ref.path)) if cache is not None else None
        cks.append(hit[1] if hit is not None and hit[0] == sig else None)
        if cks[-1] is None:
            todo.append((i, ref, sig))
    for n, ck in enumerate(_checked(a.stage, [r for _, r, _ in todo], limits, scan_chunk), 1):
        i, ref, sig = todo[n - 1]
        if cache is not None:
            cache[str(ref.path)] = (sig, ck)
        cks[i] = ck
        if progress and n % 25 == 0:
            progress(f"{a.stage}: {n}/{len(todo)} checkpoints checked")
    check_key_sets(cks)
    return StageResult(a.stage, a.checkpoints_dir, a.run_root, cks, throughput=throughput(cks))


def _checked(stage: str, refs: list, limits: ptfile.Limits, scan_chunk: int | None) -> Iterator[Checkpoint]:
    """_check_and_scan of each, in order: the first here, timed, and the
    rest in forked workers only when at that pace they would take longer
    than `fork_checks_seconds`. A worker costs its start and sending each
    checkpoint's zip entries and tensor records back, and rereads what this
    process remembered (the stage's model pickle): it pays on large stages
    or large checkpoints, not on a few small ones (a genuine sample's stage,
    12 checkpoints deep-scanned: 26 ms here, 40 ms forked)."""
    jobs = [(stage, ref.step, ref.path, limits, scan_chunk) for ref in refs]
    if not jobs:
        return
    started = time.perf_counter()
    first = _check_and_scan(*jobs[0])
    pace = time.perf_counter() - started  # timing decides only where the work runs, never what it finds
    yield first
    rest = jobs[1:]
    if len(rest) >= 2 and pace * len(rest) > limits.fork_checks_seconds:
        per_task = 1 if scan_chunk else _CHECKS_PER_TASK  # a scan is long enough to go alone
        with ptfile.shared_spending(limits):
            yield from forking.imap(_check_and_scan, rest, chunksize=per_task, on_death=_lost)
    else:
        yield from itertools.starmap(_check_and_scan, rest)


_CHECKS_PER_TASK = 4  # checks sent to a worker at a time: one at a time left workers waiting 25% of the while


def _lost(stage: str, step: int, path: Path, limits: ptfile.Limits, scan_chunk: int | None) -> Checkpoint:
    """A checkpoint whose check ended its worker process (the kernel kills a
    process out of memory): not verified, so never a fallback. With several
    checks a task, each of the task's checkpoints is marked so."""
    ck = Checkpoint(stage, step, path, single_file=not safefs.is_dir(path))
    ck.problems.append(Problem("unsafe_pickle", path.name, "checking it ended the worker process (killed: out "
                                                           "of memory?): not verified, never resume from it"))
    return ck


def _check_and_scan(stage: str, step: int, path: Path, limits: ptfile.Limits, scan_chunk: int | None) -> Checkpoint:
    ck = check_checkpoint(stage, step, path, limits)
    if scan_chunk and ck.usable:
        deep_scan(ck, limits, scan_chunk)
    return ck


def _timestamp_text(ts) -> str | None:
    """state.pt's `timestamp` as text: TinyWorlds writes readable_timestamp()
    ("%Y_%m_%d_%H_%M_%S"); a fork's epoch seconds become ISO time; anything
    else says what it is instead of vanishing."""
    if isinstance(ts, str):
        return ts[:40]
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and 0 < ts < 1e11:
        return datetime.fromtimestamp(ts, timezone.utc).strftime(_TS_FORMAT)
    return None if ts is None else f"<{type(ts).__name__}>"


def _parse_ts(text) -> float | None:
    try:
        return datetime.strptime(str(text), _TS_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def throughput(cks: list[Checkpoint]) -> dict | None:
    """Steps per second between the first and last checkpoint whose state.pt
    holds a `timestamp` (written by the training process; never file mtimes,
    which a copy resets)."""
    points = [(c.step, _parse_ts(c.fact("state.pt", "timestamp"))) for c in cks]
    points = [(s, t) for s, t in points if t is not None]
    if len(points) < 2:
        return None
    (s0, t0), (s1, t1) = points[0], points[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return {"steps_per_second": (s1 - s0) / (t1 - t0), "from_step": s0, "to_step": s1,
            "seconds": t1 - t0, "source": "state.pt timestamp"}


def check_all(b: bundle_mod.Bundle, thresholds: dict, progress=None,
              cache: dict | None = None, deep: str = "auto") -> dict[str, StageResult]:
    """check_stage of every stage; with `deep="all"` every usable checkpoint
    is deep-scanned in the same pass (what the fallback would ask next)."""
    limits = ptfile.Limits.from_thresholds(thresholds)
    chunk = int(thresholds["checkpoints"]["deep_chunk_elements"]) if deep == "all" else None
    out = {}
    for stage in b.ordered_stages():
        a = b.stages[stage]
        if a.checkpoints or a.checkpoints_dir is not None:
            out[stage] = check_stage(a, limits, progress, cache, chunk)
    return out


# --- findings --------------------------------------------------------------------------

def stage_findings(res: StageResult, fb: dict, thresholds: dict) -> list[Finding]:
    """Integrity findings; `fb` is the fallback decision (fallback.choose)."""
    t = thresholds["checkpoints"]
    out: list[Finding] = []
    evidence = str(res.checkpoints_dir) if res.checkpoints_dir else None
    if res.in_progress is not None:
        ip = res.in_progress
        out.append(Finding("ckpt_latest_in_progress", "info", res.stage, "latest_status", ip.status,
                           "valid", [ip.step], str(ip.path),
                           f"latest checkpoint {ip.path.name} is {ip.status} while the run is live "
                           f"by its own records: probably still being saved; judged on the ones before it"))
    cks = res.judged
    if not cks:
        out.append(Finding("ckpt_none_found", t["none_found_severity"], res.stage, "checkpoints",
                           0, None, [], evidence, "no checkpoints found: nothing to resume from"))
        return out
    latest = cks[-1]
    fb_text = _fallback_text(fb)
    unsafe = [c for c in cks if c.status == "unsafe_pickle"]
    if unsafe:
        first = next(p for p in unsafe[0].problems if p.status == "unsafe_pickle")
        out.append(Finding("ckpt_unsafe_pickle", "critical", res.stage, "pickle_globals",
                           f"{first.file}: {first.detail}", "allowlist", [c.step for c in unsafe],
                           str(unsafe[0].path),
                           f"{len(unsafe)} checkpoint(s) carry pickles outside the allowlist; they were "
                           "not loaded. Never torch.load them without weights_only=True"))
    invalid = [c for c in cks if c.status != "valid"]
    ratio = len(invalid) / len(cks)
    if not any(c.status == "valid" for c in cks):
        out.append(Finding("ckpt_none_valid", "critical", res.stage, "valid_checkpoints", 0,
                           ">= 1", [c.step for c in invalid], evidence,
                           f"none of {len(cks)} checkpoints is valid ({_status_counts(invalid)})"))
    elif ratio >= t["invalid_ratio_critical"]:
        out.append(Finding("ckpt_invalid_ratio", "critical", res.stage, "invalid_ratio",
                           round(ratio, 3), t["invalid_ratio_critical"], [c.step for c in invalid],
                           evidence, f"{len(invalid)} of {len(cks)} checkpoints are not valid "
                                     f"({_status_counts(invalid)}); {fb_text}"))
    elif ratio > t["invalid_ratio_watch"]:
        out.append(Finding("ckpt_some_invalid", "watch", res.stage, "invalid_ratio",
                           round(ratio, 3), t["invalid_ratio_watch"], [c.step for c in invalid],
                           evidence, f"{len(invalid)} of {len(cks)} checkpoints are not valid "
                                     f"({_status_counts(invalid)})"))
    if latest.status != "valid":
        sev = "critical" if latest.status in UNUSABLE else "watch"
        out.append(Finding("ckpt_latest_unusable" if sev == "critical" else "ckpt_latest_invalid",
                           sev, res.stage, "latest_status", latest.status, "valid", [latest.step],
                           str(latest.path), f"latest checkpoint {latest.path.name} is "
                           f"{latest.status}: {latest.problems[0].detail}; {fb_text}"))
    blown = [c for c in cks if c.status == "valid" and (fb.get("weights_blown_up") or {}).get(c.step)]
    if blown:
        c = blown[0]
        ratio_w = fb["weights_blown_up"][c.step]
        out.append(Finding("weights_blowup", "critical", res.stage, "max_abs_weight_ratio", ratio_w,
                           t["weight_blowup_ratio"], [x.step for x in blown], str(c.path),
                           f"weights of {c.path.name} are {ratio_w}x the earliest checkpoint's "
                           "(max |w| or norm): the optimisation blew up"))
    return out


def _fallback_text(fb: dict) -> str:
    if fb.get("step") is not None:
        return f"fall back to {Path(fb['path']).name} (step {fb['step']})"
    return "no checkpoint qualifies as a fallback" + (": " + fb["reason"] if fb.get("reason") else "")


def _status_counts(cks: list[Checkpoint]) -> str:
    c = Counter(ck.status for ck in cks)
    return ", ".join(f"{n} {s}" for s, n in c.most_common())


# --- cross-stage ------------------------------------------------------------------------

DEPENDENCY_KEYS = {"video_tokenizer_path": "video_tokenizer", "latent_actions_path": "latent_actions"}


def resolve_recorded_path(recorded: str, bundle_root: Path, run_root: Path | None,
                          read_outside: bool = False) -> tuple[Path | None, str]:
    """A path saved on the training host, found in this (maybe moved) bundle
    by its `results/...` suffix under the bundle root, then by its
    `<run>/<stage>/checkpoints/<name>` tail under this run's results dir.
    A recorded path outside the bundle is only looked at with `read_outside`."""
    p = Path(recorded)
    root = safefs.resolve(bundle_root)
    parts = p.parts
    # Found paths are spelled from bundle_root as the user gave it, like every
    # other evidence path (not as this machine's absolute path).
    if p.is_absolute() and _within(p, root) and safefs.is_dir(p):
        return Path(bundle_root, safefs.resolve(p).relative_to(root)), "as recorded"
    if "results" in parts:
        i = len(parts) - 1 - parts[::-1].index("results")
        cand = Path(bundle_root, *parts[i:])
        if ".." not in parts[i:] and safefs.is_dir(cand) and _within(cand, root):
            return cand, "results/ suffix under the bundle root"
    if run_root is not None and len(parts) >= 4 and ".." not in parts[-4:]:
        for cand, how in ((Path(run_root.parent, *parts[-4:]), "run-root suffix"),
                          (Path(run_root, *parts[-3:]), "stage/checkpoints suffix in this run root")):
            if safefs.is_dir(cand) and _within(cand, root):  # a symlink out of the bundle is not in it
                return cand, how
    if read_outside and p.is_absolute() and safefs.is_dir(p):
        return p, "as recorded (outside the bundle; --read-outside-bundle)"
    return None, "not found under the bundle" + ("" if read_outside or _within(p, root) else
                                                 " (the recorded path lies outside it and was not read)")


def _within(p: Path, root: Path) -> bool:
    resolved = safefs.resolve(p)  # once: it walks the filesystem
    return resolved == root or root in resolved.parents


def dependency_findings(results: dict[str, StageResult], bundle_root: Path, thresholds: dict,
                        read_outside: bool = False) -> tuple[list[dict], list[Finding]]:
    """Dynamics trains on frozen tokenizer and action checkpoints: they must be
    in the bundle and valid. Dynamics loaded them intact when it trained, so a
    damaged one now is `watch` (restore or retrain the upstream file), not a
    verdict on dynamics' own training."""
    dyn = results.get("dynamics")
    src = next((c for c in reversed(dyn.checkpoints) if config_of(c)), None) if dyn else None
    if src is None:
        return [], []
    cfg = config_of(src)
    t = thresholds["checkpoints"]
    limits = ptfile.Limits.from_thresholds(thresholds)
    facts, out = [], []
    for key, stage in DEPENDENCY_KEYS.items():
        recorded = cfg.get(key)
        if not isinstance(recorded, str) or not recorded:
            continue
        path, how = resolve_recorded_path(recorded, bundle_root, dyn.run_root, read_outside)
        fact = {"key": key, "recorded": recorded, "resolved": str(path) if path else None,
                "how": how, "status": None}
        if path is None:
            out.append(Finding("ckpt_dependency_missing", t["dependency_missing_severity"],
                               "dynamics", key, recorded, "exists", [], str(src.path / "state.pt"),
                               f"dynamics was trained from {recorded}, which is not in this bundle ({how})"))
        else:
            ck = find_checked(results.get(stage), path) or check_one(stage, path, limits)
            fact["status"] = ck.status
            if ck.status != "valid":
                out.append(Finding("ckpt_dependency_invalid", t["dependency_invalid_severity"], "dynamics",
                                   key, ck.status, "valid", [ck.step], str(path),
                                   f"dynamics was trained from {path.name}, which is {ck.status} now: "
                                   f"{ck.problems[0].detail}. Dynamics loaded it intact when it trained; "
                                   "restore that file from a backup or retrain the upstream stage before "
                                   "reusing it"))
        facts.append(fact)
    return facts, out


def find_checked(res: StageResult | None, path: Path) -> Checkpoint | None:
    """The stage's already checked checkpoint at `path` (symlinks resolved), if any."""
    if res is None:
        return None
    real = safefs.resolve(path)
    return next((c for c in res.checkpoints if safefs.resolve(c.path) == real), None)


def check_one(stage: str, path: Path, limits: ptfile.Limits) -> Checkpoint:
    """Check one checkpoint found by path (its step from its name)."""
    parsed = bundle_mod.parse_checkpoint_name(path.name)
    return check_checkpoint(stage, parsed[1] if parsed else -1, path, limits)


def torch_version() -> str | None:
    """The installed torch's version, read from its metadata (importing torch
    costs 1.6 s, and only --deep torch and the probe need it)."""
    if not torch_available():
        return None
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "unknown"


def steps_text(steps: list[int], limit: int = 30) -> list:
    """Bounded: the first and last steps with a count in between."""
    if len(steps) <= limit:
        return steps
    return steps[:limit // 2] + [f"... {len(steps) - limit} more ..."] + steps[-limit // 2:]

