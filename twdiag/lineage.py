"""A stage's history as attempts: every wandb run of the stage, in order,
with how it relates to the one before, how far it got, and how it ended.

TinyWorlds' `checkpoint=` resume loads the weights only (its
`load_*_from_checkpoint` returns the model; the optimizer and the cosine
schedule are built fresh) and restarts the step counter at 0, so a resumed
attempt's steps are its own: global step = local step + the source
checkpoint's step. A later attempt that starts at or below an earlier one's
steps without `checkpoint=` is a fresh start, and replaces it.

The merged history (logs.merge_history) is on that global axis, so findings,
plots and the fallback read global steps; this module says what each attempt
was, so nothing is dropped silently: a superseded attempt is listed with why,
with its rows, its end and its last error lines.

Findings from here: a run that exited 0 short of `n_updates`, a stage whose
final steps were never saved, attempts that crashed (their console's last
error lines quoted), and a crash before any training (critical when no
earlier attempt trained the stage).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .logs import resume_step
from .rules import Finding

_FOLDER_TS = re.compile(r"(?<!\d)(\d{8})_(\d{6})(?!\d)")
_ERROR_LINE = re.compile(r"(Error|Exception|Traceback|error:|CUDA out of memory|Killed|size mismatch|"
                         r"Missing key|Unexpected key|No such file)", re.IGNORECASE)
_MISMATCH = re.compile(r"size mismatch|Missing key|Unexpected key|shape", re.IGNORECASE)
_MISSING_PATH = re.compile(r"No such file|FileNotFoundError|not found", re.IGNORECASE)


@dataclass
class Attempt:
    index: int
    path: str
    run_id: str | None
    state: str                      # finished | crashed | stalled_or_crashed | live | unknown
    exit_code: int | None
    rows: int
    first_step: int | None          # local steps, as logged
    last_step: int | None
    relation: str                   # first | resume | fresh_start | continuation
    global_first_step: int | None = None  # on the stage's one axis: local + a resume's source step
    global_last_step: int | None = None
    resumed_from: dict | None = None   # {"checkpoint", "step"}
    restored: str | None = None        # for a resume: what TinyWorlds restored
    n_updates: int | None = None
    progress: float | None = None      # (last_step + 1) / n_updates
    superseded_rows: int = 0
    why_superseded: str | None = None
    error_lines: list = field(default_factory=list)
    weights_match: str | None = None   # a resume: its first checkpoint against the source's (storage CRCs)

    def to_dict(self) -> dict:
        return asdict(self)


def _int(x) -> int | None:
    try:
        v = int(x)
    except (TypeError, ValueError):
        return None
    return v if v >= 0 else None


def error_lines(log, limit: int = 5) -> list[str]:
    """The last console lines that name an error (bounded), for a crash's finding."""
    hits = [line.strip()[:300] for line in log.console_tail if _ERROR_LINE.search(line)]
    return hits[-limit:]


def _steps(log) -> tuple[int | None, int | None]:
    if not len(log.history) or "_step" not in log.history.columns:
        return None, None
    s = pd.to_numeric(log.history["_step"], errors="coerce").dropna()
    return (int(s.iloc[0]), int(s.max())) if len(s) else (None, None)


def attempts(hist, stage_state: dict | None) -> list[Attempt]:
    """Every attempt of a stage (hist: logs.StageHistory), in order."""
    out: list[Attempt] = []
    logs = list(hist.logs)
    offsets = hist.offsets or [0] * len(logs)
    for i, log in enumerate(logs):
        first, last = _steps(log)
        cfg = log.config or {}
        ck = cfg.get("checkpoint")
        shift = offsets[i] if i < len(offsets) else 0
        n_updates = _int(cfg.get("n_updates"))
        m = log.meta
        if "exit_code" in m:
            state = "finished" if not m.get("exit_code") else "crashed"
        elif i == len(logs) - 1:
            state = (stage_state or {}).get("state", "unknown")
        else:
            state = "crashed"  # no exit record, and a later attempt followed
        relation, resumed, restored = "first", None, None
        if isinstance(ck, str) and ck.strip():
            relation = "resume"
            resumed = {"checkpoint": ck, "step": resume_step(cfg)}
            restored = ("weights only: TinyWorlds' checkpoint= loads the model state, then builds the optimizer "
                        "and the cosine schedule afresh (warm-up again) and counts steps from 0")
        elif i > 0:
            prev_last = out[-1].global_last_step
            relation = "continuation" if (first is not None and prev_last is not None and first > prev_last) \
                else "fresh_start"
        a = Attempt(i + 1, str(log.path), m.get("run_id"), state, m.get("exit_code"), len(log.history),
                    first, last, relation, first + shift if first is not None else None,
                    last + shift if last is not None else None, resumed, restored, n_updates,
                    round((last + 1) / n_updates, 4) if last is not None and n_updates else None)
        if state in ("crashed", "stalled_or_crashed"):
            a.error_lines = error_lines(log)
        out.append(a)
    _mark_superseded(out, hist.superseded_by_log or [0] * len(out))
    return out


def _mark_superseded(out: list[Attempt], counts: list[int]) -> None:
    """Rows of an attempt that a later one replaced on the global axis (the
    merged history keeps the later one), with why."""
    for i, a in enumerate(out[:-1]):
        n = counts[i] if i < len(counts) else 0
        if not n:
            continue
        a.superseded_rows = n
        later = next((x for x in out[i + 1:] if x.global_first_step is not None), out[i + 1])
        if later.relation == "resume":
            src = (later.resumed_from or {}).get("step")
            a.why_superseded = (f"attempt {later.index} resumed from its checkpoint at step {src} (its counter "
                                f"reset to 0, so its steps are global {src} + its own): this attempt's steps "
                                f"from {src} on were run again" if src is not None else
                                f"attempt {later.index} resumed from a checkpoint (checkpoint=)")
        else:
            a.why_superseded = f"attempt {later.index} started again from step {later.first_step} without a checkpoint"


def _storage_crcs(ck) -> list | None:
    """The CRC-32 of every tensor storage in a checkpoint's model file, as its
    certified archive records them (sorted: storage keys may be numbered apart)."""
    fc = ck.files.get(ck.model_file) if ck is not None else None
    if fc is None or not fc.layout:
        return None
    return sorted((e.crc, e.file_size) for name, e in fc.layout.items() if "/data/" in name)


def confirm_resume(stage: str, a: Attempt, res, root: Path, t: dict) -> str | None:
    """Whether the resumed run's first checkpoint holds the source
    checkpoint's weights: every storage's CRC-32 equal (what the archives
    record), or why it could not be told."""
    from . import checkpoints, ptfile
    src = (a.resumed_from or {}).get("checkpoint")
    first = next((c for c in (res.checkpoints if res else []) if c.local_step == 0), None)
    if not src or first is None:
        return None
    path, how = checkpoints.resolve_recorded_path(src, root, res.run_root, False)
    if path is None:
        return f"not confirmed: the source checkpoint is not in the bundle ({how})"
    source = checkpoints.find_checked(res, path) or checkpoints.check_one(
        stage, path, ptfile.Limits.from_thresholds(t))
    mine, theirs = _storage_crcs(first), _storage_crcs(source)
    if not mine or not theirs:
        return "not confirmed: a model file could not be read"
    if mine == theirs:
        return (f"confirmed: the resumed run's step-0 weights ({first.path.name}) are the source's "
                f"({path.name}): all {len(mine)} storages have equal CRC-32s")
    same = len(set(mine) & set(theirs))
    return (f"not the same weights: {same} of {len(mine)} storages of {first.path.name} match {path.name}'s "
            "CRC-32s (it may have resumed from another checkpoint than its config says)")


def _warmup_again(a: Attempt, frame, stats: dict | None, lt: dict) -> str | None:
    """A resume whose lr log rises again from low: the schedule was rebuilt."""
    key = (((stats or {}).get("metrics") or {}).get("learning_rate") or {}).get("key")
    if not key or key not in frame.columns or a.global_first_step is None:
        return None
    rows = frame[(frame["_step"] >= a.global_first_step) & (frame["_step"] <= a.global_last_step)]
    lr = pd.to_numeric(rows[key], errors="coerce").dropna()
    if len(lr) < 2:
        return None
    first, peak = float(lr.iloc[0]), float(lr.max())
    if peak <= 0 or first > lt["warmup_again_share"] * peak:
        return None
    at = int(rows.loc[lr.idxmax(), "_step"])
    return (f"the lr log shows the warm-up again: {first:.3g} at step {a.global_first_step}, rising to "
            f"{peak:.3g} at step {at}")


def judge(stage: str, hist, stage_state: dict | None, res, stats: dict | None, t: dict,
          root: Path | None = None, b_stage=None) -> tuple[dict, list[Finding]]:
    """The stage's lineage document and its findings. `res`: the stage's
    checkpoints.StageResult (or None); `stats`: its stats document; `root`:
    the bundle root (to find a resume's source checkpoint); `b_stage`: the
    stage's bundle.StageArtifacts (older run roots it replaced)."""
    lt = t["lineage"]
    atts = attempts(hist, stage_state)
    for a in atts:
        if a.relation == "resume":
            warm = _warmup_again(a, hist.frame, stats, lt)
            if warm:
                a.restored = f"{a.restored}; {warm}"
            if root is not None and a is atts[-1]:  # the newest attempt's checkpoints are the ones in hand
                a.weights_match = confirm_resume(stage, a, res, root, t)
    findings: list[Finding] = []
    latest = atts[-1]
    doc = {"attempts": [a.to_dict() for a in atts], "count": len(atts),
           "steps_axis": ("global: a resumed attempt's own steps + its source checkpoint's step (TinyWorlds "
                          "counts from 0 again on checkpoint=); findings, plots and the fallback use it")
           if any(a.relation == "resume" for a in atts) else "one axis: the attempts' steps as logged"}
    art = b_stage
    if art is not None and art.earlier:
        doc["earlier_run_roots"] = [e.summary() for e in art.earlier]
    trained_before = False
    for a in atts:
        if a.state in ("crashed", "stalled_or_crashed") and a is not latest:
            quote = "; ".join(a.error_lines) or "no error line in its console"
            findings.append(Finding("attempt_crashed", "info", stage, "exit_code", a.exit_code, 0,
                                    [a.global_last_step] if a.global_last_step is not None else [], a.path,
                                    f"attempt {a.index} ended without finishing ({a.state}, exit code "
                                    f"{a.exit_code if a.exit_code is not None else 'none recorded'}) after "
                                    f"{a.rows} rows; a later attempt followed. Last error lines: {quote}"))
        if a.rows == 0 and a.state in ("crashed", "stalled_or_crashed") and not trained_before:
            findings.append(_startup_crash(stage, a, lt))
        trained_before |= a.rows > 0
    findings += _early_exit(stage, latest, stats, lt)
    saved, lost = _final_checkpoint(latest, res)
    doc.update(final_checkpoint_saved=saved, steps_not_saved=lost)
    if saved is False and lost:
        newest = max(c.step for c in res.judged) if res and res.judged else None
        findings.append(Finding("final_checkpoint_missing", lt["final_checkpoint_severity"], stage,
                                "steps_not_saved", lost, 0, [latest.global_last_step], latest.path,
                                f"the last {lost} steps ({(newest or 0) + 1}–{latest.global_last_step}) are in no "
                                f"checkpoint: the newest is step {newest}. TinyWorlds saves only when "
                                "step % log_interval == 0, so resuming loses them"))
    return doc, findings


def _startup_crash(stage: str, a: Attempt, lt: dict) -> Finding:
    quote = "; ".join(a.error_lines) or "no error line in its console"
    hint = ""
    text = " ".join(a.error_lines)
    if _MISMATCH.search(text):
        hint = (" The error names mismatched tensors: compare this run's model settings (embed_dim, hidden_dim, "
                "num_heads, num_blocks, patch_size, latent_dim, num_bins, n_actions) with the config saved in the "
                "state.pt of the checkpoint it loads (video_tokenizer_path, latent_actions_path or checkpoint).")
    elif _MISSING_PATH.search(text):
        hint = (" The error names a missing file: check video_tokenizer_path, latent_actions_path and checkpoint "
                "in its config against the bundle.")
    return Finding("crashed_at_startup", lt["startup_crash_severity"], stage, "history_rows", 0, ">= 1",
                   [], a.path, f"attempt {a.index} crashed before training anything (exit code "
                   f"{a.exit_code if a.exit_code is not None else 'none recorded'}, no history row): {quote}.{hint}")


def _early_exit(stage: str, a: Attempt, stats: dict | None, lt: dict) -> list[Finding]:
    if a.state != "finished" or a.progress is None or a.progress >= lt["early_exit_progress"]:
        return []
    lr = ((stats or {}).get("metrics") or {}).get("learning_rate") or {}
    peak, now = lr.get("max"), lr.get("current")
    schedule = ""
    if peak and now is not None:
        share = now / peak
        schedule = (f"; its learning rate had decayed to {share:.0%} of its peak {peak:.3g}"
                    + (" (the schedule was nearly done)" if share < lt["decayed_lr_share"] else
                       ": the cosine schedule was cut off, not finished"))
    return [Finding("run_stopped_early", "watch", stage, "progress", a.progress, lt["early_exit_progress"],
                    [a.last_step] if a.last_step is not None else [], a.path,
                    f"attempt {a.index} exited 0 at step {a.last_step} of n_updates {a.n_updates} "
                    f"({a.progress:.0%} of its configured training){schedule}")]


def _final_checkpoint(a: Attempt, res) -> tuple[bool | None, int | None]:
    if res is None or not res.judged or a.global_last_step is None:
        return None, None
    newest = max(c.step for c in res.judged)  # global steps (pipeline._place_resumed)
    if newest >= a.global_last_step:
        return True, 0
    return False, a.global_last_step - newest


def place_resumed(b, results: dict) -> dict[str, int]:
    """Checkpoints and grids of a resumed run on the stage's global axis.

    TinyWorlds names them by the resumed run's own step (it counts from 0
    again), and the config saved with each checkpoint keeps `checkpoint=`,
    whose step is the offset. One stage's artifacts come from one run root,
    so a checkpoint whose config cannot be read, and the grids, take the
    offset most of its readable checkpoints carry. Returns {stage: offset}
    for the stages that moved."""
    from collections import Counter
    from .checkpoints import config_of
    moved = {}
    for stage, res in results.items():
        known = {id(c): resume_step(config_of(c)) or 0 for c in res.checkpoints if config_of(c)}
        if not any(known.values()):
            continue
        usual = Counter(known.values()).most_common(1)[0][0]
        for c in res.checkpoints:
            c.place(known.get(id(c), usual))
        res.checkpoints.sort(key=lambda c: c.step)
        art = b.stages.get(stage)
        for img in art.images if art else []:
            if img.local_step is None:
                img.local_step = img.step
            img.step = img.local_step + usual
        moved[stage] = usual
    return moved


def folder_note(root: Path, newest_record: float | None, t: dict) -> str | None:
    """A bundle folder named by a timestamp (the seed's backup layout) that
    disagrees with its records by more than `lineage.folder_time_days`."""
    m = _FOLDER_TS.search(Path(root).resolve().name)
    if not m or not newest_record:
        return None
    try:
        named = datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    days = abs(newest_record - named.timestamp()) / 86400
    if days <= t["lineage"]["folder_time_days"]:
        return None
    seen = datetime.fromtimestamp(newest_record, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (f"the bundle folder's name says {named:%Y-%m-%d %H:%M:%S} UTC, but its newest record is from {seen} "
            f"({days:.1f} days apart): the folder may hold a later (or earlier) run than its name says")
