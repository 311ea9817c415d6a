"""diagnose --follow: watch a live run at the cost of its new bytes.

Each poll rediscovers the bundle (a listing: new checkpoints, images and
logs, a resumed run's new log), reads only what is new in every `.wandb`
(`history.LiveLog` keeps each decoder between polls), re-checks only
checkpoints and images whose files changed (a cache keyed by path and file
signature; the newest checkpoint is re-checked while it is still being
written), and judges the whole bundle again from that kept state.

Output: one JSON object per line on stdout (NDJSON) whenever any stage's
verdict, run state, fallback or newest finding changes, each line complete
on its own; a short heartbeat on stderr every poll; diagnosis.json/.md/.html
rewritten (as one set) when something changed. Stops when every stage with
a log has an exit record, when the newest stage is judged crashed (by its
records' times), on Ctrl-C/SIGTERM, or (exit 10) at the first poll that
reaches --fail-on.
"""
from __future__ import annotations

import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import bundle as bundle_mod, history, outputs, pipeline, report

ENDED = ("finished", "crashed")


class Follower:
    def __init__(self, root: Path, explicit: dict, results: Path | None, thresholds: dict, args, out: Path):
        self.root, self.explicit, self.results = root, explicit, results
        self.t, self.args, self.out = thresholds, args, out
        self.live: dict[str, history.LiveLog] = {}
        self.cache: dict = {}
        self.polls = 0
        self.new_records = 0

    def _decoder(self, path: Path) -> history.RunLog:
        key = str(path)
        log = self.live.get(key)
        if log is None:
            log = self.live[key] = history.LiveLog(path, summary=False)  # as logs.load
            self.new_records += log.new_records
        else:
            self.new_records += log.poll()
        lim = self.t["limits"]
        # a bounded window: a run that logs for days must not grow the follower without end
        log.bound(int(lim["follow_max_rows"]), int(lim["follow_window_rows"]))
        return log.runlog()

    def poll(self) -> tuple[pipeline.Analysis, dict]:
        self.polls += 1
        self.new_records = 0
        b = bundle_mod.discover([self.root], self.explicit, results=self.results, root=self.root,
                                max_entries=int(self.t["limits"]["max_dir_entries"]))
        a = pipeline.run(b, self.t, deep=self.args.deep, now=self.args.now, count=self.args.count,
                         read_outside=self.args.read_outside_bundle, progress=lambda m: None,
                         decoder=self._decoder, cache=self.cache)
        lim = self.t["limits"]
        for path, log in self.live.items():
            for note in log.resets:
                b.notes.append(f"{path}: {note}")
            log.resets.clear()
            if log.thinned:
                b.notes.append(f"{path}: --follow holds at most {int(lim['follow_max_rows']):,} history rows: "
                               f"{log.thinned:,} older rows were thinned out (the last "
                               f"{int(lim['follow_window_rows']):,} are whole; every sparse or non-finite row "
                               "is kept). Windows and onsets before them are read on the thinned rows; a "
                               "diagnose without --follow reads every row")
        return a, report.combine(a)


def summary(doc: dict) -> dict:
    """What a change is measured on: per stage verdict, state, fallback and
    the newest watch/critical finding."""
    out = {}
    for stage, e in doc["stages"].items():
        top = next((f for f in e["findings"] if f["severity"] != "info"), None)
        fb = e.get("fallback") or {}
        out[stage] = {"verdict": e["verdict"], "state": (e.get("status") or {}).get("state"),
                      "fallback": fb.get("step"), "restart": fb.get("restart"),
                      "newest_finding": top and {k: top[k] for k in ("rule_id", "severity", "message")}}
    return out


def _line(event: str, doc: dict, poll: int, changed: list[str], extra: dict | None = None) -> str:
    body = {"event": event, "poll": poll, "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "overall": doc.get("overall"), "run_status": {k: doc["run_status"].get(k) for k in
                                                          ("stage", "state", "last_record_time")},
            "stages": summary(doc), "changed": changed, "copied": doc.get("copied"),
            "next_action": (doc.get("next_actions") or [{}])[0].get("action"),
            "notes": doc.get("notes", [])[-5:], **(extra or {})}
    return outputs.dumps(body, indent=None)


def _changes(before: dict | None, now: dict) -> list[str]:
    if before is None:
        return ["first poll"]
    out = []
    for stage, s in now.items():
        old = before.get(stage, {})
        for key in ("verdict", "state", "fallback", "restart", "newest_finding"):
            if old.get(key) != s.get(key):
                out.append(f"{stage}.{key}")
    return out


def _should_stop(doc: dict) -> str | None:
    states = {s: (e.get("status") or {}).get("state") for s, e in doc["stages"].items()
              if (e.get("status") or {}).get("state") not in (None, "unknown")}
    if states and all(v in ENDED for v in states.values()):
        return "every stage with a log has ended (exit records)"
    current = doc["run_status"].get("state")
    if current in ("crashed", "stalled_or_crashed"):
        return f"the run is judged {current} by its records ({doc['run_status'].get('stage')})"
    return None


def _sleep(seconds: float, stop: list) -> None:
    end = time.monotonic() + seconds
    while not stop and time.monotonic() < end:
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


def run(root: Path, explicit: dict, results: Path | None, thresholds: dict, args, out: Path) -> int:
    """The follow loop; prints its own NDJSON lines (the caller prints
    nothing) and returns the exit code."""
    from .exits import EXIT_GATE, GATES
    from .report_files import write_report
    f = Follower(root, explicit, results, thresholds, args, out)
    stop: list = []

    def _interrupt(signum, frame):
        stop.append(signum)
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    before, code = None, 0
    try:
        while True:
            t0 = time.perf_counter()
            a, doc = f.poll()
            now = summary(doc)
            changed = _changes(before, now)
            if changed:
                written = write_report(a, None, out)
                doc["outputs"] = written.get("outputs", {})
                print(_line("change", doc, f.polls, changed), flush=True)
            before = now
            outputs.log(f"poll {f.polls}: {f.new_records} new records, overall {doc['overall']}, "
                        f"{doc['run_status'].get('stage')} {doc['run_status'].get('state')} "
                        f"({time.perf_counter() - t0:.2f} s){'; changed: ' + ', '.join(changed) if changed else ''}")
            if args.fail_on and doc["overall"] in GATES[args.fail_on]:
                print(_line("stop", doc, f.polls, [], {"reason": f"--fail-on {args.fail_on} reached",
                                                         "exit_code": EXIT_GATE}), flush=True)
                code = EXIT_GATE
                break
            why = _should_stop(doc)
            if why is None and args.max_polls and f.polls >= args.max_polls:
                why = f"--max-polls {args.max_polls} reached"
            if why:
                print(_line("stop", doc, f.polls, [], {"reason": why, "exit_code": 0}), flush=True)
                break
            _sleep(args.interval, stop)
            if stop:
                print(_line("stop", doc, f.polls, [], {"reason": "interrupted", "exit_code": 0}), flush=True)
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    sys.stdout.flush()
    return code
