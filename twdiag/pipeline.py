"""The whole analysis, in the order it runs:

    discover the bundle once -> decode its logs -> analyses (stats |
    checkpoints | visuals) -> run state -> fallback per stage -> cross-stage
    -> findings (then verdicts, advice and the report: `report`).

Each step runs inside a guard: a failure in one file or one analysis becomes
an entry in `errors` with its reason, and the rest of the bundle is still
judged. Every script runs the parts it needs through `run`.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle as bundle_mod, checkpoints, crossstage, fallback, logs, outputs, runstate, stats

PARTS = ("stats", "checkpoints", "visuals")


@dataclass
class Analysis:
    bundle: bundle_mod.Bundle
    thresholds: dict
    now: float
    deep: str = "auto"
    histories: dict = field(default_factory=dict)          # stage -> logs.StageHistory
    stats: dict = field(default_factory=lambda: {"stages": {}})
    checkpoints: dict = field(default_factory=dict)        # stage -> checkpoints.StageResult
    visuals: dict | None = None                            # visuals.analyse result
    copy: dict = field(default_factory=dict)               # runstate.copied_evidence
    states: dict = field(default_factory=dict)             # stage -> run state
    state_findings: dict = field(default_factory=dict)     # stage -> [Finding]
    fallbacks: dict = field(default_factory=dict)          # stage -> fallback document
    dependencies: list = field(default_factory=list)
    dependency_findings: list = field(default_factory=list)
    data_findings: list = field(default_factory=list)      # crossstage.degenerate_data: bundle-wide
    lineage: dict = field(default_factory=dict)            # stage -> lineage document
    lineage_findings: dict = field(default_factory=dict)   # stage -> [Finding]
    probe: dict | None = None                              # probe.analyse's document (--tinyworlds)
    probe_findings: dict = field(default_factory=dict)     # stage -> [Finding]
    probe_pictures: dict = field(default_factory=dict)     # name -> uint8 [B,T,H,W,3], for the probe sheet
    cross: dict = field(default_factory=lambda: {"findings": [], "facts": []})
    errors: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def visual_stages(self) -> dict:
        """The visuals document's per-stage entries ({} when not analysed)."""
        return (self.visuals or {}).get("doc", {}).get("stages", {}) or {}

    def stage_findings(self, stage: str) -> list[dict]:
        """Every finding filed under a stage, from every part."""
        out = list(((self.stats["stages"].get(stage) or {}).get("findings") or []))
        out += [f.to_dict() for f in self.state_findings.get(stage, [])]
        out += [f.to_dict() for f in self.lineage_findings.get(stage, [])]
        out += [f.to_dict() for f in self.probe_findings.get(stage, [])]
        out += [f.to_dict() for f in self.data_findings if f.stage == stage]
        res = self.checkpoints.get(stage)
        if res is not None:
            out += [f.to_dict() for f in res.findings]
        vis = self.visual_stages.get(stage)
        if vis:
            out += vis["findings"]
        out += [f.to_dict() for f in self.dependency_findings if f.stage == stage]
        out += [f.to_dict() for f in self.cross["findings"] if f.stage == stage]
        return out

    @property
    def stage_names(self) -> list[str]:
        names = set(self.histories) | set(self.checkpoints) | set(self.bundle.stages)
        return sorted(names | set(self.visual_stages), key=bundle_mod.stage_order)


class _Guard:
    """Time a step; turn an exception into an `errors` entry, not a stop."""

    def __init__(self, a: Analysis, name: str):
        self.a, self.name = a, name

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.a.timings[f"{self.name}_s"] = round(time.perf_counter() - self.t, 3)
        if exc_type is None or not issubclass(exc_type, Exception):
            return False
        frame = traceback.extract_tb(tb)[-1] if tb else None
        self.a.errors.append({"step": self.name, "error": f"{exc_type.__name__}: {exc}"[:500],
                              "where": f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else None})
        outputs.log(f"error in {self.name}: {exc_type.__name__}: {exc}")
        return True


def run(b: bundle_mod.Bundle, thresholds: dict, parts: tuple[str, ...] = PARTS, deep: str = "auto",
        now: float | None = None, count: int | None = None, read_outside: bool = False,
        progress=outputs.log, workers: int | None = None, decoder=None, cache: dict | None = None,
        probe=None, images=None) -> Analysis:
    """`decoder(path) -> RunLog` replaces decoding (--follow keeps its logs
    live); `cache` keeps checked checkpoints and analysed images between
    calls (keyed by path and file signature); `probe` (probe.ProbeOptions)
    measures the models with TinyWorlds' own classes, in a child process;
    `images` (a visuals.SharedImages) is the images'
    analysis started earlier, in the background."""
    a = Analysis(b, thresholds, time.time() if now is None else float(now), deep)
    started = time.perf_counter()
    child = probe.child if probe is not None else None
    if probe is not None and child is None and "checkpoints" in parts:
        from . import probe as probe_mod
        child = probe_mod.spawn(probe, thresholds)  # imports torch while the bundle is read
    with _Guard(a, "decode"):
        if b.wandb_files or b.tables:
            progress("decoding W&B logs")
            a.histories = logs.load(b, workers=workers, progress=progress, decoder=decoder)
    if "stats" in parts or "checkpoints" in parts:
        with _Guard(a, "stats"):
            a.stats = stats.analyse(a.histories, thresholds)
    with _Guard(a, "runstate"):
        a.copy, a.states, a.state_findings = runstate.judge(a.histories, a.now, thresholds)
    if "checkpoints" in parts:
        with _Guard(a, "checkpoints"):
            progress("checkpoints: structure and allowlist, then deep scans where they decide")
            a.checkpoints = checkpoints.check_all(b, thresholds, progress,
                                                  cache=None if cache is None else cache.setdefault("ckpts", {}),
                                                  deep=deep)
        with _Guard(a, "global_steps"):
            from . import lineage
            for stage, offset in lineage.place_resumed(b, a.checkpoints).items():
                b.notes.append(f"{stage}: its checkpoints and grids are from a run resumed from step {offset} "
                               f"(checkpoint=): their steps are reported on the global axis (name + {offset})")
        with _Guard(a, "dependencies"):
            a.dependencies, a.dependency_findings = checkpoints.dependency_findings(
                a.checkpoints, b.root, thresholds, read_outside)
    if "visuals" in parts:
        with _Guard(a, "visuals"):
            from . import visuals
            progress("visuals: image grids and contact sheet")
            a.visuals = visuals.analyse(b, thresholds, count, progress=progress,
                                        cache=None if cache is None else cache.setdefault("images", {}),
                                        analysed=None if images is None else images.result())
    with _Guard(a, "reconcile_visuals"):  # before the fallbacks: it moves visual onsets
        a.cross["facts"] = crossstage.reconcile_visuals(a)
    if "checkpoints" in parts:
        _fallbacks(a)
        with _Guard(a, "probe"):
            _probe(a, probe, progress, child)
    with _Guard(a, "lineage"):
        _lineage(a)
    with _Guard(a, "crossstage"):
        found = crossstage.analyse(a)
        a.cross = {"findings": found["findings"], "facts": a.cross["facts"] + found["facts"]}
    a.timings["total_s"] = round(time.perf_counter() - started, 3)
    return a


def _lineage(a: Analysis) -> None:
    """Attempts per stage, and a bundle folder named for another time than its records."""
    from . import lineage
    newest = None
    for stage, hist in a.histories.items():
        a.lineage[stage], a.lineage_findings[stage] = lineage.judge(
            stage, hist, a.states.get(stage), a.checkpoints.get(stage), a.stats["stages"].get(stage), a.thresholds,
            a.bundle.root, a.bundle.stages.get(stage))
        for log in hist.logs:
            t = runstate.record_times(log)["newest"]
            newest = t if newest is None or (t and t > newest) else newest
    for stage, art in a.bundle.stages.items():
        for old in (e.summary() for e in art.earlier):
            a.bundle.notes.append(
                f"{stage}: {old['run_root']} holds {old['checkpoints']} checkpoints (steps "
                f"{', '.join(map(str, old['checkpoint_steps'][:8]))}) and {old['images']} grids of an earlier "
                f"attempt; the report judges the newest run root's ({art.run_root}). To judge those: "
                f"--results {old['run_root']}")
    note = lineage.folder_note(a.bundle.root, newest, a.thresholds)
    if note:
        a.bundle.notes.append(note)


def _probe(a: Analysis, opts, progress, child) -> None:
    """The models measured (opt-in); a probed fallback that does not load
    gives way to the newest older candidate that does."""
    from . import probe
    if opts is None:
        found = probe.find_checkout(a.bundle.root, Path.cwd())
        if found is not None:
            a.bundle.notes.append(f"a TinyWorlds checkout is at {found}: add --tinyworlds {found} to measure the "
                                  "models with its own classes (resumability, fidelity, controllability)")
        return
    got = probe.analyse(a, opts, progress, child)
    a.probe, a.probe_findings, a.probe_pictures = got.doc, got.findings, got.pictures
    for stage, doc in (a.probe or {}).get("stages", {}).items():
        fb = a.fallbacks.get(stage)
        if fb is not None and doc.get("checkpoints"):
            fallback.apply_probe(fb, doc, probe.verified_fallback(doc))
    probe.overrule_grid_fidelity(a.visual_stages, a.probe, a.thresholds)


def _fallbacks(a: Analysis) -> None:
    vis_stages = a.visual_stages
    for stage, res in a.checkpoints.items():
        with _Guard(a, f"fallback_{stage}"):
            live = (a.states.get(stage) or {}).get("state") == "live"
            onsets = dict((vis_stages.get(stage) or {}).get("onsets", {}))
            if a.data_findings:  # every stage trained on the degenerate data: none is a fallback
                onsets["data_degenerate"] = 0
            a.fallbacks[stage] = fallback.decide(res, a.histories.get(stage), a.stats["stages"].get(stage),
                                                 onsets, a.thresholds, a.deep, live)
            art = a.bundle.stages.get(stage)
            if art is not None and art.earlier and not a.data_findings:
                fallback.earlier_attempt(a.fallbacks[stage], stage, art.earlier, a.thresholds)
        with _Guard(a, f"checkpoint_findings_{stage}"):
            res.findings = checkpoints.stage_findings(res, a.fallbacks.get(stage, {}), a.thresholds)
