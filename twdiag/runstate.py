"""Is each stage's run finished, crashed, live or stalled? Decided from the
log's own records, never from file times.

Bundles are usually copies (backups, rsync, `cp` without -p), so a file's
mtime says when it was copied, not when the run last wrote. The evidence is
in the records: the newest time any timed record carries (history
`_timestamp`, system `stats`, console `output`), the `exit` record (with its
exit code), and whether the file ends mid-record (a live writer's buffer, or
a killed one). File mtimes may only confirm: when they are much newer than
the newest record, the bundle is a copy (`copied: true`) and mtimes are
ignored everywhere (run state, the save-in-progress exemption, throughput).
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd

from . import safefs
from .rules import Finding


def iso(ts) -> str | None:
    if not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_times(log) -> dict:
    """The newest time of each kind of timed record in one decoded log."""
    h = log.history
    last_history = None
    if "_timestamp" in h.columns and len(h):
        ts = pd.to_numeric(h["_timestamp"], errors="coerce")
        last_history = float(ts.max()) if ts.notna().any() else None
    m = log.meta
    start = m.get("start_time")
    end = (start + m["runtime"]) if start and isinstance(m.get("runtime"), (int, float)) \
        and "exit_code" in m else None
    times = {"history": last_history, "stats": m.get("last_stats_time"),
             "output": m.get("last_output_time"), "exit": end, "start": start}
    newest = max((t for t in times.values() if isinstance(t, (int, float)) and t > 0), default=None)
    return {**times, "newest": newest}


def _mtime(path) -> float | None:
    try:
        return safefs.check_regular(path).st_mtime
    except safefs.Unreadable:
        return None


def copied_evidence(histories: dict, gap: float) -> dict:
    """Is this bundle a copy? Compares each log's mtime with its newest record."""
    seen = []
    for stage, hist in histories.items():
        for log in hist.logs:
            newest = record_times(log)["newest"]
            mtime = _mtime(log.path)
            if newest and mtime:
                seen.append({"stage": stage, "path": str(log.path), "mtime_minus_last_record_s":
                             round(mtime - newest, 1)})
    copies = [s for s in seen if s["mtime_minus_last_record_s"] > gap]
    return {"copied": bool(copies), "gap_seconds": gap, "files": (copies or seen)[:5],
            "reading": (f"{len(copies)} of {len(seen)} log(s) were last modified long after their "
                        f"newest record (> {gap:.0f} s): the bundle is a copy, so file times are ignored")
            if copies else "file times agree with the records"}


def stage_state(stage: str, hist, now: float, t: dict, copied: bool) -> tuple[dict, list[Finding]]:
    """The current state of a stage's newest run (its latest log)."""
    lv = t["liveness"]
    log = hist.latest
    times = record_times(log)
    m = log.meta
    newest = times["newest"]
    quiet = now - newest if newest else None
    out = {"state": "unknown", "basis": "records", "exit_code": m.get("exit_code"),
           "last_record_time": iso(newest), "last_history_time": iso(times["history"]),
           "seconds_since_last_record": round(quiet, 1) if quiet is not None else None,
           "truncated_tail": bool(log.scan.truncated_tail), "attempts": len(hist.logs),
           "evidence_path": str(log.path)}
    findings: list[Finding] = []
    step_max = int(pd.to_numeric(hist.frame["_step"], errors="coerce").max()) if len(hist.frame) else 0

    def add(rule, sev, metric, value, threshold, msg):
        findings.append(Finding(rule, sev, stage, metric, value, threshold, [step_max], str(log.path), msg))

    if "exit_code" in m:
        code = m.get("exit_code")
        out["state"] = "finished" if not code else "crashed"
        if code:
            from .lineage import error_lines
            quote = "; ".join(error_lines(log)) or "no error line in its console"
            add("run_exit_nonzero", "watch", "exit_code", code, 0,
                f"the run exited with code {code} at step {step_max}. Last error lines: {quote}")
        return out, findings
    if quiet is None:
        out["reason"] = "no timed records in the log"
        return out, findings
    if quiet > lv["stale_seconds"]:
        out["state"] = "stalled_or_crashed"
        tail = ("; the file ends mid-record, as a killed writer leaves it" if log.scan.truncated_tail
                else "")
        add("run_stalled", "watch", "seconds_since_last_record", round(quiet / 60, 1), lv["stale_seconds"] / 60,
            f"no exit record and no record for {_span(quiet)} (newest record {iso(newest)}, last step "
            f"{step_max}){tail}: the run crashed, was killed or hangs")
        return out, findings
    out["state"] = "live"
    if times["history"] and newest - times["history"] > lv["history_lag_seconds"]:
        lag = newest - times["history"]
        add("history_stalled", "watch", "_timestamp", round(lag / 60, 1), lv["history_lag_seconds"] / 60,
            f"the run still writes records ({iso(newest)}) but no training step for {_span(lag)}: "
            "look for a stuck data loader or a deadlock")
    if not copied:
        mtime = _mtime(log.path)
        out["confirmed_by_file_time"] = bool(mtime and now - mtime <= lv["stale_seconds"])
    return out, findings


def _span(seconds: float) -> str:
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def judge(histories: dict, now: float, t: dict) -> tuple[dict, dict, dict[str, list[Finding]]]:
    """(bundle-level copy evidence, {stage: state}, {stage: findings})."""
    copy = copied_evidence(histories, t["liveness"]["copy_gap_seconds"])
    states, findings = {}, {}
    for stage, hist in histories.items():
        states[stage], findings[stage] = stage_state(stage, hist, now, t, copy["copied"])
    return copy, states, findings


def newest_stage(states: dict, order) -> dict:
    """The state of the newest stage with a log (training runs in order)."""
    for stage in reversed(order):
        st = states.get(stage)
        if st and st.get("state") not in (None, "unknown"):
            return {"stage": stage, **st}
    return {"stage": None, "state": "unknown", "reason": "no W&B logs found"}

