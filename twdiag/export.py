"""Export a bundle's W&B logs to tidy files, one set per stage: history as
CSV / JSON / Parquet, and per run its metadata, config, replayed summary,
system metrics and console output. Decoding and stage mapping are `logs`'.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

try:  # optional, as pyarrow is: the JSON history ~10x faster (numpy columns whole)
    import orjson
except ImportError:
    orjson = None

from . import bundle as bundle_mod, history, logs, outputs

FORMATS = ("csv", "json", "parquet")
KEYS_SHOWN = 60  # key names listed per run on stdout; the files hold all


def _csv_ready(frame: pd.DataFrame, non_finite: dict) -> pd.DataFrame:
    """Dict values as JSON text; logged NaN/inf spelled out so that an empty
    cell only ever means "not logged at this step". Columns are replaced,
    not copied, and only logged cells are touched one by one."""
    cols = {}
    for col in frame.columns:
        s = frame[col]
        if col in non_finite:
            cols[col] = _spelled(s.to_numpy(dtype=float), non_finite[col])
        elif s.dtype == object:
            cells = _text_cells(s)
            mixed = any(isinstance(v, str) for v in cells) and any(
                v is not None and not isinstance(v, str) for v in cells)
            cols[col] = _as_text(cells) if mixed else cells
        else:
            cols[col] = s.to_numpy()
    return pd.DataFrame(cols, copy=False)


def _spelled(values: np.ndarray, nf: dict) -> np.ndarray:
    """A float column as text: repr for finite values (a C-level map), empty
    where not logged, and the logged non-finite spelled as in the JSON."""
    text = np.array(list(map(float.__repr__, values.tolist())), dtype=object)
    text[np.isnan(values)] = None
    text[nf["rows"]] = nf["values"]
    return text


def _text_cells(s: pd.Series) -> np.ndarray:
    """An object column for CSV and Parquet: dict and list values as JSON
    text (`_json_value`), touched only where logged; missing cells stay."""
    cells = s.to_numpy(dtype=object).copy()
    logged = np.flatnonzero(pd.notna(s).to_numpy())
    cells[logged] = [_json_value(v).decode("utf-8") if isinstance(v, (dict, list)) else v
                     for v in cells[logged]]
    return cells


def _as_text(cells: np.ndarray) -> np.ndarray:
    """Every logged cell as text (a number in a text column as its JSON), so
    a column mixing numbers and strings is one Parquet string column."""
    odd = [i for i, v in enumerate(cells) if v is not None and not isinstance(v, str)]
    for i in odd:
        cells[i] = _json_value(cells[i]).decode("utf-8")
    return cells


def mixed_columns(frame: pd.DataFrame) -> list[str]:
    """Object columns holding both numbers and text (a string logged into a
    float metric): exported as text, and said so in `skipped`."""
    out = []
    for col in frame.columns:
        s = frame[col]
        if s.dtype != object:
            continue
        values = s.dropna()
        kinds = {type(v) for v in values.head(100_000)}
        if str in kinds and kinds & {int, float}:
            out.append(str(col))
    return out


def write_csv(frame: pd.DataFrame, target: Path, non_finite: dict | None = None) -> Path:
    """Write to `target` (an OutputSet temp path: the set makes it atomic)."""
    ready = _csv_ready(frame, non_finite or {})
    try:  # pyarrow's writer is ~10x faster than pandas' on large tables
        import pyarrow as pa
        import pyarrow.csv as pacsv
        table = pa.Table.from_pandas(ready, preserve_index=False)
        pacsv.write_csv(table, target, pacsv.WriteOptions(quoting_style="needed"))
    except ImportError:
        ready.to_csv(target, index=False)
    return target


def _json_array(values: np.ndarray) -> bytes:
    """A numeric column as a strict JSON array, non-finite cells as null:
    orjson serialises the numpy array whole (shortest round-trip floats);
    without it, the standard library on the column as a list."""
    if orjson is not None:
        try:
            return orjson.dumps(np.ascontiguousarray(values), option=orjson.OPT_SERIALIZE_NUMPY)
        except orjson.JSONEncodeError:  # a dtype orjson does not take
            pass
    cells = values.astype(object)
    if values.dtype.kind == "f":
        cells[~np.isfinite(values)] = None
    return json.dumps(cells.tolist(), allow_nan=False).encode("utf-8")


def _json_value(obj) -> bytes:
    """Strict JSON of plain values (lists of cells, nested dicts) by the
    standard library's C encoder; a nested non-finite number is spelled
    "NaN"/"Infinity" as in every other output (outputs.to_jsonable)."""
    try:
        return json.dumps(obj, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError):  # nested NaN or odd types: the slow, careful way
        return outputs.dumps(obj, indent=None).encode("utf-8")


def _json_column(s: pd.Series) -> bytes:
    """One column as a JSON array, converted column-wise: missing and
    non-finite cells become null (the logged ones are listed apart)."""
    if s.dtype.kind in "fiub":
        return _json_array(s.to_numpy())
    cells = s.to_numpy(dtype=object).copy()
    cells[pd.isna(s).to_numpy()] = None
    return _json_value(cells.tolist())


def write_json_history(frame: pd.DataFrame, target: Path, non_finite: dict) -> Path:
    """Column-oriented JSON: {"rows", "columns": {name: [values]}, "non_finite"},
    written to the file column by column (no per-value Python work, and one
    column's text in memory at a time)."""
    with open(target, "wb") as fh:
        fh.write(b'{"rows": %d, "columns": {' % len(frame))
        for k, col in enumerate(frame.columns):
            fh.write((b", " if k else b"") + _json_value(str(col)) + b": ")
            fh.write(_json_column(frame[col]))
        fh.write(b'}, "non_finite": ' + outputs.dumps(non_finite, indent=None).encode("utf-8") + b"}")
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
            arrays.append(pa.array(_as_text(_text_cells(s)), type=pa.string()))
        else:
            arrays.append(pa.array(s.to_numpy()))
        names.append(col)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), target)
    return target


def run_summary(log: history.RunLog) -> dict:
    h = log.history
    return {
        "path": log.path, "run_id": log.meta.get("run_id"), "name": log.meta.get("name"),
        "project": log.meta.get("project"), "status": log.status,
        "exit_code": log.meta.get("exit_code"), "rows": len(h), **logs.step_range(h),
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


def _choose_source(b: bundle_mod.Bundle, source: str, api_runs: list[str], workers, console_dir):
    """(stage runs, source document): the API when asked and usable, else the
    local files, with the reason."""
    from . import wandb_api
    info = {"requested": source, "used": "local"}
    local = None
    if source in ("auto", "api"):
        try:
            named = wandb_api.parse_api_runs(api_runs)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        creds = wandb_api.credentials()
        if not named and b.wandb_files:
            local = logs.decode_stages(b, console_dir=console_dir, workers=workers)
            named = wandb_api.identify(local)
        if creds is None:
            info["reason"] = "no W&B credentials configured (WANDB_API_KEY or ~/.netrc): local files used"
        elif not named:
            info["reason"] = ("the run is not identified (no --api-run, and the local run files name no "
                              "entity/project/id, as offline runs do): local files used")
        else:
            try:
                stages = wandb_api.fetch(named)
                info.update(used="api", credentials=creds, runs=[r.path for r in named])
                return stages, info
            except wandb_api.ApiUnavailable as exc:
                info["reason"] = f"{exc}; local files used"
    if local is None:
        local = logs.decode_stages(b, console_dir=console_dir, workers=workers) if b.wandb_files else {}
    return local, info


def run(b: bundle_mod.Bundle, outset, suffix: str = "latest", formats: tuple[str, ...] = ("csv", "json"),
        workers: int | None = None, source: str = "local", api_runs: list[str] = ()) -> dict:
    """Decode (or fetch), merge per stage and write the files into `outset`
    (an outputs.OutputSet). Returns the stdout document."""
    console_dir = outset.tmp_dir() if b.wandb_files else None
    stages, info = _choose_source(b, source, list(api_runs), workers, console_dir)
    doc = {"suffix": suffix, "formats": list(formats), "source": info,
           "stages": {}, "skipped": b.skipped, "notes": b.notes}
    for stage in sorted(stages, key=bundle_mod.stage_order):
        runs = stages[stage]
        merged = logs.merge_history(runs)
        tag = "+".join(runs.run_ids)
        files = _write_stage(merged, outset, f"{stage}_history_{tag}_{suffix}", formats)
        for col in mixed_columns(merged.frame):
            doc["skipped"].append({"path": ", ".join(log.path for log in runs.logs)[:500], "kind": "history_column",
                                   "reason": f"{stage}: column {col!r} mixes numbers and text: exported as "
                                             "text (JSON of each value), not as numbers"})
        run_entries = []
        for log, how in zip(runs.logs, runs.mapped_by):
            entry = run_summary(log)
            entry["stage_from"] = how
            entry["keys"] = sorted(log.history_keys)[:KEYS_SHOWN]
            entry["keys_total"] = len(log.history_keys)
            entry["outputs"] = _write_run_files(log, outset, stage, logs.run_id(log), suffix)
            run_entries.append(entry)
        h = merged.frame
        doc["stages"][stage] = {
            "runs": run_entries, "rows": len(h), **logs.step_range(h),
            "superseded_rows": merged.superseded_rows,
            "non_finite": {k: len(v["rows"]) for k, v in merged.non_finite.items()},
            "outputs": files,
        }
    return doc


def _write_stage(merged: logs.StageHistory, outset, stem: str, formats) -> dict:
    files = {}
    writers = {"csv": write_csv, "json": write_json_history, "parquet": write_parquet}
    for fmt in FORMATS:
        if fmt in formats:
            name = f"{stem}.{fmt}"
            writers[fmt](merged.frame, outset.path(name), merged.non_finite)
            files[fmt] = str(outset.final(name))
    return files


def _write_run_files(log: history.RunLog, outset, stage: str, rid: str, suffix: str) -> dict:
    files = {"run": str(outset.write_json(f"{stage}_run_{rid}_{suffix}.json", run_document(log, stage)))}
    if len(log.system):
        name = f"{stage}_system_{rid}_{suffix}.csv"
        log.system.to_csv(outset.path(name), index=False)
        files["system"] = str(outset.final(name))
    tmp_console = log.meta.get("console_tmp")
    if tmp_console and Path(tmp_console).exists():
        name = f"{stage}_console_{rid}_{suffix}.tsv"
        Path(tmp_console).replace(outset.path(name))  # same temp dir: a rename
        files["console"] = str(outset.final(name))
    return files
