"""Each stage's W&B history: decode every log the bundle found, map each to
its stage and merge a stage's resumed runs into one table.

Stage mapping, in order: an explicit `--run stage=path`, the TinyWorlds run
name `{stage}_{timestamp}`, then config and logged keys. Several files of one
stage (resumed runs) are merged in start-time order; rows a later file
re-logged (it resumed from an earlier checkpoint) supersede the earlier ones,
and a `_source` column keeps each row's run id. Exported history tables
(`{stage}_history_*.csv|json|parquet`) are read back as logs too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import bundle as bundle_mod, history, outputs, safefs


@dataclass
class StageRuns:
    stage: str
    logs: list[history.RunLog] = field(default_factory=list)
    mapped_by: list[str] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return list(dict.fromkeys(run_id(log) for log in self.logs))


def run_id(log: history.RunLog) -> str:
    """The W&B run id, or the file's `run-<id>` name when no run record survived."""
    return log.meta.get("run_id") or Path(log.path).stem.removeprefix("run-")


def step_range(frame: pd.DataFrame) -> dict:
    if not len(frame):
        return {"step_min": None, "step_max": None}
    return {"step_min": int(frame["_step"].min()), "step_max": int(frame["_step"].max())}


@dataclass
class StageHistory:
    """A stage's merged history, ready for analysis or export."""

    stage: str
    frame: pd.DataFrame
    non_finite: dict
    logs: list[history.RunLog]
    superseded_rows: int = 0
    superseded_by_log: list = field(default_factory=list)  # per log (same order): its rows a later one replaced
    offsets: list = field(default_factory=list)            # per log: added to its steps (a resume's source step)

    @property
    def config(self) -> dict:
        merged: dict = {}
        for log in self.logs:
            merged.update(log.config)
        return merged

    @property
    def latest(self) -> history.RunLog:
        return self.logs[-1]


def classify(log: history.RunLog, explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        return explicit, "--run"
    stage = bundle_mod.stage_from_run_name(log.meta.get("name"))
    if stage:
        return stage, "run name"
    stage = bundle_mod.stage_from_config(log.config, log.history_keys)
    if stage:
        return stage, "config/keys"
    return None, "unknown"


def decode_stages(b: bundle_mod.Bundle, console_dir: Path | None = None,
                  workers: int | None = None, progress=outputs.log, decoder=None,
                  summary: bool = True) -> dict[str, StageRuns]:
    """Decode every .wandb file of the bundle once and group the logs by stage.
    An explicit --run for a stage replaces the files found for it.
    `decoder(path) -> RunLog` replaces decoding (a follower's live logs);
    `summary=False` skips the summary replay (see history.decode)."""
    stages: dict[str, StageRuns] = {}
    for wf in b.wandb_files:
        f = wf.path
        console = None
        if console_dir is not None:
            console = console_dir / f".console-{f.stem}.tmp"
            console.unlink(missing_ok=True)
        try:
            if decoder is None:
                progress(f"decoding {f}")
                log = history.decode(f, console_path=console, workers=workers, summary=summary)
            else:
                log = decoder(f)
        except (MemoryError, Exception) as exc:  # one file's failure is that file's, never the bundle's
            b.skipped.append({"path": str(f), "kind": "wandb_log",
                              "reason": f"decode failed: {type(exc).__name__}: {exc}"[:300]})
            continue
        log.meta["console_tmp"] = str(console) if console else None
        for what, entry in log.dropped.items():
            b.skipped.append({"path": str(f), "kind": f"wandb_log:{what}", "reason": entry["reason"]})
        explicit = b.explicit.get(safefs.resolve(f))
        if not log.scan.header_ok or log.error:
            b.skipped.append({"path": str(f), "reason": log.error or "unreadable", "kind": "wandb_log",
                              **({"stage": explicit} if explicit else {})})
            continue
        stage, how = classify(log, None if explicit == bundle_mod.ANY_STAGE else explicit)
        how = "--run" if explicit else how
        runs = stages.setdefault(stage or "unknown", StageRuns(stage or "unknown"))
        runs.logs.append(log)
        runs.mapped_by.append(how)
    for stage, runs in stages.items():
        if "--run" in runs.mapped_by and len(set(runs.mapped_by)) > 1:
            dropped = [log.path for log, how in zip(runs.logs, runs.mapped_by) if how != "--run"]
            keep = [i for i, how in enumerate(runs.mapped_by) if how == "--run"]
            runs.logs = [runs.logs[i] for i in keep]
            runs.mapped_by = ["--run"] * len(keep)
            b.notes.append(f"{stage}: --run given, so {len(dropped)} other log(s) of this stage were "
                           f"not used ({', '.join(str(d) for d in dropped[:3])})")
        order = sorted(range(len(runs.logs)), key=lambda i: _start_key(runs.logs[i]))
        runs.logs = [runs.logs[i] for i in order]
        runs.mapped_by = [runs.mapped_by[i] for i in order]
    return stages


def _start_key(log: history.RunLog) -> tuple:
    return (log.meta.get("start_time") or 0.0, log.path)


_STEP_IN_NAME = re.compile(r"_step_(\d+)")


def resume_step(config: dict) -> int | None:
    """The step of the checkpoint a TinyWorlds run resumed from (`checkpoint=`
    in its config, `<stage>_step_<N>`), or None. TinyWorlds then counts from 0
    again, so the run's global step is its own + N."""
    ck = (config or {}).get("checkpoint")
    if not isinstance(ck, str) or not ck.strip():
        return None
    found = _STEP_IN_NAME.search(Path(ck.rstrip("/")).name)
    return int(found.group(1)) if found else None


def merge_history(runs: StageRuns) -> StageHistory:
    """Concatenate a stage's files in time order on one global step axis (a
    resumed run's steps are shifted by its source checkpoint's step); later
    files win on overlap."""
    frames, non_finite, superseded = [], {}, []
    offsets = []
    offset = 0  # rows are labelled globally until the end, so non_finite can follow them
    for log in runs.logs:
        frame = log.history
        shift = resume_step(log.config) or 0
        offsets.append(shift)
        if shift and len(frame) and "_step" in frame.columns:
            frame = frame.assign(_step=frame["_step"] + shift)
        if frames and len(frame):
            first = frame["_step"].iloc[0]
            keep = [f[f["_step"] < first] for f in frames]
            superseded = [n + len(a) - len(b) for n, a, b in zip(superseded, frames, keep)]
            frames = keep
        superseded.append(0)
        frame = frame.assign(_source=run_id(log))
        frame.index = np.arange(offset, offset + len(frame))
        for key, nf in log.non_finite.items():
            entry = non_finite.setdefault(key, {"rows": [], "values": []})
            entry["rows"] += [r + offset for r in nf["rows"]]
            entry["values"] += nf["values"]
        offset += len(frame)
        frames.append(frame)
    frame = pd.concat(frames) if frames else pd.DataFrame({"_step": []})
    labels = frame.index
    frame = frame.reset_index(drop=True)
    for entry in non_finite.values():  # superseded rows drop out (-1)
        pos = labels.get_indexer(entry["rows"])
        entry["values"] = [v for v, p in zip(entry["values"], pos) if p >= 0]
        entry["rows"] = [int(p) for p in pos if p >= 0]
    non_finite = {k: v for k, v in non_finite.items() if v["rows"]}
    return StageHistory(runs.stage, frame, non_finite, runs.logs, sum(superseded), superseded, offsets)


# --- exported tables ------------------------------------------------------------

_NF_SPELLINGS = {"NaN": "NaN", "nan": "NaN", "Infinity": "Infinity", "inf": "Infinity",
                 "-Infinity": "-Infinity", "-inf": "-Infinity"}


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read an exported history file back, with its logged non-finite values."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        with safefs.open_regular(path) as fh:
            table = pq.read_table(fh)
        frame = table.to_pandas()
        non_finite = {}
        for name in table.column_names:
            col = table.column(name)
            if _pa_is_float(col):
                arr = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
                valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                bad = np.flatnonzero(valid & ~np.isfinite(arr))
                if len(bad):
                    non_finite[name] = {"rows": bad.tolist(),
                                        "values": [history.nf_text(arr[i]) for i in bad]}
        return frame, non_finite
    if path.suffix == ".json":
        with safefs.open_regular(path) as fh:
            return _json_table(fh)
    with safefs.open_regular(path) as fh:
        frame = pd.read_csv(fh, keep_default_na=False, na_values=[""], low_memory=False)
    non_finite = {}
    for col in frame.columns:
        if frame[col].dtype.kind in "ifb":
            continue
        text = frame[col].astype(object)
        marks = text.isin(list(_NF_SPELLINGS)).to_numpy()
        if not marks.any():
            continue
        numeric = pd.to_numeric(text.where(~marks), errors="coerce")
        if numeric.notna().sum() + marks.sum() < text.notna().sum():
            continue  # a text column that happens to hold "nan"
        rows = np.flatnonzero(marks)
        spelled = [_NF_SPELLINGS[v] for v in text.iloc[rows]]
        values = numeric.to_numpy(dtype=float).copy()  # pandas 3: views are read-only
        values[rows] = [float(v) for v in spelled]
        frame[col] = values
        non_finite[col] = {"rows": rows.tolist(), "values": spelled}
    return frame, non_finite


def _json_table(fh) -> tuple[pd.DataFrame, dict]:
    """The column-oriented document {"rows", "columns": {name: [values]}, "non_finite"}."""
    doc = json.loads(fh.read())
    frame, non_finite = pd.DataFrame(doc["columns"]), doc.get("non_finite", {})
    for col, nf in non_finite.items():
        values = frame[col].astype(float).to_numpy().copy()
        values[nf["rows"]] = [float(v) for v in nf["values"]]
        frame[col] = values
    return frame, non_finite


def _pa_is_float(col) -> bool:
    import pyarrow as pa
    return pa.types.is_floating(col.type)


def _table_log(path: Path, skipped: list) -> tuple[str, history.RunLog] | None:
    """An exported `{stage}_history_{runid}_{suffix}.*` file as a RunLog."""
    stage, sep, rest = path.name.partition("_history_")
    stage = bundle_mod.canonical_stage(stage)
    if not sep or not stage:
        skipped.append({"path": str(path), "reason": "not an exported {stage}_history_* file"})
        return None
    try:
        frame, non_finite = read_table(path)
    except Exception as exc:  # pandas/pyarrow raise many types on bad files
        skipped.append({"path": str(path), "reason": f"unreadable table: {type(exc).__name__}: {exc}"[:300]})
        return None
    if "_step" not in frame.columns:
        skipped.append({"path": str(path), "reason": "no _step column"})
        return None
    runid_suffix = rest.rsplit(".", 1)[0]
    meta, config = {}, {}
    for doc_path in sorted(path.parent.glob(f"{stage}_run_*.json")):
        if doc_path.stem.split("_run_", 1)[1] in runid_suffix:
            try:
                with safefs.open_regular(doc_path) as fh:
                    doc = json.loads(fh.read())
                meta, config = doc.get("meta", {}), doc.get("config", {})
            except (safefs.Unreadable, ValueError, OSError) as exc:
                skipped.append({"path": str(doc_path), "reason": f"unreadable run document: {exc}"})
    report = history.wandb_log.ScanReport(path=str(path), header_ok=True)
    log = history.RunLog(path=str(path), scan=report, meta=meta, config=config, summary={},
                         history=frame, non_finite=non_finite, system=pd.DataFrame(),
                         console_tail=[], record_types={}, history_keys=list(frame.columns))
    return stage, log


def load(b: bundle_mod.Bundle, console_dir: Path | None = None, workers: int | None = None,
         progress=outputs.log, decoder=None) -> dict[str, StageHistory]:
    """Decode the bundle's logs and tables; fill `b.stages[s].logs`; return
    the merged history per stage. The analyses never read a run's replayed
    summary, so it is not replayed here (the exporter does)."""
    stages = decode_stages(b, console_dir, workers, progress, decoder, summary=False) if b.wandb_files else {}
    for path in b.tables:
        found = _table_log(path, b.skipped)
        if found:
            runs = stages.setdefault(found[0], StageRuns(found[0]))
            runs.logs.append(found[1])
            runs.mapped_by.append("file name")
    out = {}
    for stage in sorted(stages, key=bundle_mod.stage_order):
        out[stage] = merge_history(stages[stage])
        b.stage(stage).logs = stages[stage].logs
    return out
