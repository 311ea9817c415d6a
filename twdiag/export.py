"""Export local `.wandb` logs to tidy files, one set per stage.

Stage mapping, in order: an explicit `--run stage=path`, the TinyWorlds run
name `{stage}_{timestamp}`, then config and logged keys. Several files of one
stage (resumed runs) are merged in start-time order; rows a later file
re-logged (it resumed from an earlier checkpoint) supersede the earlier ones,
and a `_source` column keeps each row's run id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import bundle, history, outputs

FORMATS = ("csv", "json", "parquet")
KEYS_SHOWN = 60  # key names listed per run on stdout; the files hold all


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

    @property
    def config(self) -> dict:
        merged: dict = {}
        for log in self.logs:
            merged.update(log.config)
        return merged

    @property
    def latest(self) -> history.RunLog:
        return self.logs[-1]


def parse_run_args(values: list[str]) -> dict[Path, str]:
    """`--run stage=path` pairs -> {resolved path: stage}."""
    out = {}
    for v in values or []:
        stage, sep, path = v.partition("=")
        canon = bundle.canonical_stage(stage)
        if not sep or not path:
            raise ValueError(f"--run expects stage=path, got {v!r}")
        out[Path(path).resolve()] = canon or stage
    return out


def classify(log: history.RunLog, explicit: str | None) -> tuple[str | None, str]:
    if explicit:
        return explicit, "--run"
    stage = bundle.stage_from_run_name(log.meta.get("name"))
    if stage:
        return stage, "run name"
    stage = bundle.stage_from_config(log.config, log.history_keys)
    if stage:
        return stage, "config/keys"
    return None, "unknown"


def load_stages(paths: list[Path], explicit: dict[Path, str] | None = None,
                console_dir: Path | None = None, skipped: list | None = None,
                workers: int | None = None) -> dict[str, StageRuns]:
    """Decode every `.wandb` file found and group the logs by stage."""
    explicit = dict(explicit or {})
    skipped = skipped if skipped is not None else []
    files: list[Path] = []
    seen: set[Path] = set()
    for p in list(paths) + list(explicit):
        found = [w.path for w in bundle.find_wandb_files(p)]
        if not found:
            skipped.append({"path": str(p), "reason": "no .wandb file found here"})
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    stages: dict[str, StageRuns] = {}
    for f in files:
        console = None
        if console_dir is not None:
            console = console_dir / f".console-{f.stem}.tmp"
            console.unlink(missing_ok=True)
        outputs.log(f"decoding {f}")
        log = history.decode(f, console_path=console, workers=workers)
        log.meta["console_tmp"] = str(console) if console else None
        if not log.scan.header_ok:
            skipped.append({"path": str(f), "reason": log.error})
            continue
        stage, how = classify(log, explicit.get(f.resolve()))
        stage = stage or "unknown"
        runs = stages.setdefault(stage, StageRuns(stage))
        runs.logs.append(log)
        runs.mapped_by.append(how)
    for runs in stages.values():
        order = sorted(range(len(runs.logs)), key=lambda i: _start_key(runs.logs[i]))
        runs.logs = [runs.logs[i] for i in order]
        runs.mapped_by = [runs.mapped_by[i] for i in order]
    return stages


def _start_key(log: history.RunLog) -> tuple:
    return (log.meta.get("start_time") or 0.0, log.path)


def merge_history(runs: StageRuns) -> StageHistory:
    """Concatenate a stage's files in time order; later files win on overlap."""
    frames, non_finite, superseded = [], {}, 0
    offset = 0  # rows are labelled globally until the end, so non_finite can follow them
    for log in runs.logs:
        frame = log.history
        if frames and len(frame):
            first = frame["_step"].iloc[0]
            keep = [f[f["_step"] < first] for f in frames]
            superseded += sum(len(a) - len(b) for a, b in zip(frames, keep))
            frames = keep
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
    return StageHistory(runs.stage, frame, non_finite, runs.logs, superseded)


def _csv_ready(frame: pd.DataFrame, non_finite: dict) -> pd.DataFrame:
    """Dict values as JSON text; logged NaN/inf spelled out so that an empty
    cell only ever means "not logged at this step"."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in out[col]]
    for col, nf in non_finite.items():
        if col in out.columns:
            text = np.array([repr(float(v)) if v == v else None for v in out[col]],
                            dtype=object)
            text[nf["rows"]] = nf["values"]
            out[col] = text
    return out


def write_csv(frame: pd.DataFrame, target: Path, non_finite: dict | None = None) -> Path:
    ready = _csv_ready(frame, non_finite or {})
    with outputs.atomic_path(target) as tmp:
        try:  # pyarrow's writer is ~10x faster than pandas' on large tables
            import pyarrow as pa
            import pyarrow.csv as pacsv
            table = pa.Table.from_pandas(ready, preserve_index=False)
            pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="needed"))
        except ImportError:
            ready.to_csv(tmp, index=False)
    return target


def write_json_history(frame: pd.DataFrame, target: Path, non_finite: dict) -> Path:
    """Column-oriented JSON: {"columns": {name: [values]}, "non_finite": ...}."""
    cols = {}
    for col in frame.columns:
        s = frame[col]
        if s.dtype.kind == "f":
            cols[col] = [None if v != v or v in (np.inf, -np.inf) else v for v in s.tolist()]
        else:
            cols[col] = [None if v is None or (isinstance(v, float) and v != v) else v
                         for v in s.tolist()]
    doc = {"rows": len(frame), "columns": cols, "non_finite": non_finite}
    with outputs.atomic_path(target) as tmp:
        tmp.write_text(json.dumps(outputs.to_jsonable(doc), allow_nan=False))
    return target


def write_parquet(frame: pd.DataFrame, target: Path, non_finite: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrays, names = [], []
    for col in frame.columns:
        s = frame[col]
        if s.dtype.kind == "f":
            mask = np.isnan(s.to_numpy())
            values = s.to_numpy().copy()
            nf = non_finite.get(col)
            if nf:  # logged NaN stays NaN; only unlogged cells are null
                mask[nf["rows"]] = False
            arrays.append(pa.array(values, mask=mask))
        elif s.dtype == object:
            arrays.append(pa.array([json.dumps(v) if isinstance(v, (dict, list)) else v
                                    for v in s], type=pa.string()))
        else:
            arrays.append(pa.array(s.to_numpy()))
        names.append(col)
    with outputs.atomic_path(target) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp)
    return target


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read an exported history file back, with its logged non-finite values."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        frame = table.to_pandas()
        non_finite = {}
        for name in table.column_names:
            col = table.column(name)
            if pa_is_float(col):
                arr = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)
                valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                bad = np.flatnonzero(valid & ~np.isfinite(arr))
                if len(bad):
                    non_finite[name] = {"rows": bad.tolist(),
                                        "values": [history._nf_text(arr[i]) for i in bad]}
        return frame, non_finite
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        frame = pd.DataFrame(doc["columns"])
        non_finite = doc.get("non_finite", {})
        for col, nf in non_finite.items():
            values = frame[col].astype(float).to_numpy().copy()
            values[nf["rows"]] = [float(v) for v in nf["values"]]
            frame[col] = values
        return frame, non_finite
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""], low_memory=False)
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


_NF_SPELLINGS = {"NaN": "NaN", "nan": "NaN", "Infinity": "Infinity", "inf": "Infinity",
                 "-Infinity": "-Infinity", "-inf": "-Infinity"}


def pa_is_float(col) -> bool:
    import pyarrow as pa
    return pa.types.is_floating(col.type)


def run_summary(log: history.RunLog) -> dict:
    h = log.history
    return {
        "path": log.path, "run_id": log.meta.get("run_id"), "name": log.meta.get("name"),
        "project": log.meta.get("project"), "status": log.status,
        "exit_code": log.meta.get("exit_code"), "rows": len(h), **step_range(h),
        "writer": log.meta.get("cli_version") or log.meta.get("producer_version"),
        "record_types": log.record_types,
        "damage": {k: v for k, v in log.scan.to_dict().items()
                   if k in ("corrupt_chunks", "zeroed_blocks_skipped", "orphan_chunks_skipped",
                            "partial_records_dropped", "decode_errors", "truncated_tail",
                            "truncation", "layout", "damaged")},
    }


def run_document(log: history.RunLog, stage: str) -> dict:
    """Everything but the history table: metadata, config, summary, damage."""
    meta = {k: v for k, v in log.meta.items() if k != "console_tmp"}
    return {"stage": stage, "meta": meta, "config": log.config, "summary": log.summary,
            "scan": log.scan.to_dict(), "history_keys": sorted(log.history_keys),
            "non_finite": {k: {"count": len(v["rows"])} for k, v in log.non_finite.items()},
            "console_tail": log.console_tail[-50:]}


def export(paths: list[Path], out_dir: Path, explicit: dict[Path, str] | None = None,
           suffix: str = "latest", formats: tuple[str, ...] = ("csv", "json"),
           workers: int | None = None) -> dict:
    """Decode, merge per stage and write files. Returns the stdout document."""
    skipped: list = []
    stages = load_stages(paths, explicit, console_dir=out_dir, skipped=skipped, workers=workers)
    doc = {"out_dir": str(out_dir), "suffix": suffix, "formats": list(formats),
           "stages": {}, "skipped": skipped}
    for stage, runs in stages.items():
        merged = merge_history(runs)
        tag = "+".join(runs.run_ids)
        files = _write_stage(merged, out_dir, f"{stage}_history_{tag}_{suffix}", formats)
        run_entries = []
        for log, how in zip(runs.logs, runs.mapped_by):
            entry = run_summary(log)
            entry["stage_from"] = how
            entry["keys"] = sorted(log.history_keys)[:KEYS_SHOWN]
            entry["keys_total"] = len(log.history_keys)
            entry["outputs"] = _write_run_files(log, out_dir, stage, run_id(log), suffix)
            run_entries.append(entry)
        h = merged.frame
        doc["stages"][stage] = {
            "runs": run_entries, "rows": len(h), **step_range(h),
            "superseded_rows": merged.superseded_rows,
            "non_finite": {k: len(v["rows"]) for k, v in merged.non_finite.items()},
            "outputs": files,
        }
    return doc


def _write_stage(merged: StageHistory, out_dir: Path, stem: str, formats) -> dict:
    files = {}
    if "csv" in formats:
        files["csv"] = str(write_csv(merged.frame, out_dir / f"{stem}.csv", merged.non_finite))
    if "json" in formats:
        files["json"] = str(write_json_history(merged.frame, out_dir / f"{stem}.json",
                                               merged.non_finite))
    if "parquet" in formats:
        files["parquet"] = str(write_parquet(merged.frame, out_dir / f"{stem}.parquet",
                                             merged.non_finite))
    return files


def _write_run_files(log: history.RunLog, out_dir: Path, stage: str, rid: str,
                     suffix: str) -> dict:
    files = {"run": str(outputs.write_json(out_dir / f"{stage}_run_{rid}_{suffix}.json",
                                           run_document(log, stage)))}
    if len(log.system):
        target = out_dir / f"{stage}_system_{rid}_{suffix}.csv"
        with outputs.atomic_path(target) as tmp:
            log.system.to_csv(tmp, index=False)
        files["system"] = str(target)
    tmp_console = log.meta.get("console_tmp")
    if tmp_console and Path(tmp_console).exists():
        target = out_dir / f"{stage}_console_{rid}_{suffix}.tsv"
        Path(tmp_console).replace(target)  # same dir: an atomic rename
        files["console"] = str(target)
    return files


TABLE_SUFFIXES = (".csv", ".json", ".parquet")


def _table_log(path: Path, skipped: list) -> tuple[str, history.RunLog] | None:
    """An exported `{stage}_history_{runid}_{suffix}.*` file as a RunLog."""
    stage, sep, rest = path.name.partition("_history_")
    stage = bundle.canonical_stage(stage)
    if not sep or not stage:
        skipped.append({"path": str(path), "reason": "not an exported {stage}_history_* file"})
        return None
    try:
        frame, non_finite = read_table(path)
    except Exception as exc:  # pandas/pyarrow raise many types on bad files
        skipped.append({"path": str(path), "reason": f"unreadable table: {exc}"})
        return None
    if "_step" not in frame.columns:
        skipped.append({"path": str(path), "reason": "no _step column"})
        return None
    runid_suffix = rest.rsplit(".", 1)[0]
    meta, config = {}, {}
    for doc_path in path.parent.glob(f"{stage}_run_*.json"):
        if doc_path.stem.split("_run_", 1)[1] in runid_suffix:
            doc = json.loads(doc_path.read_text())
            meta, config = doc.get("meta", {}), doc.get("config", {})
    report = history.wandb_log.ScanReport(path=str(path), header_ok=True)
    log = history.RunLog(path=str(path), scan=report, meta=meta, config=config, summary={},
                         history=frame, non_finite=non_finite, system=pd.DataFrame(),
                         console_tail=[], record_types={}, history_keys=list(frame.columns))
    return stage, log


def load_histories(paths: list[Path], explicit: dict[Path, str] | None = None,
                   skipped: list | None = None, workers: int | None = None) -> dict[str, StageHistory]:
    """Stage histories from .wandb files, bundle dirs or exported tables."""
    skipped = skipped if skipped is not None else []
    wandb_paths, stages = [], {}
    for p in paths:
        if p.is_file() and p.suffix in TABLE_SUFFIXES:
            found = _table_log(p, skipped)
            if found:
                runs = stages.setdefault(found[0], StageRuns(found[0]))
                runs.logs.append(found[1])
                runs.mapped_by.append("file name")
        else:
            wandb_paths.append(p)
    if wandb_paths or explicit:
        for stage, runs in load_stages(wandb_paths, explicit, skipped=skipped, workers=workers).items():
            mine = stages.setdefault(stage, StageRuns(stage))
            mine.logs += runs.logs
            mine.mapped_by += runs.mapped_by
    return {stage: merge_history(runs) for stage, runs in stages.items()}
