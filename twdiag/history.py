"""Decode a `.wandb` log into tidy records: history, config, summary, system
stats, console output and run metadata, in one streaming pass.

Each payload is parsed once with wandb's `Record` class. History values are
kept as raw JSON text per column and converted column-wise in fixed-size
chunks (numpy parses a list of number strings, `NaN` and `Infinity` included,
in one call), so memory stays bounded and almost no per-value Python work is
done. Summary and config updates are replayed as raw text and decoded once at
the end, so a file with 600k summary updates costs 600k dict stores, not 600k
`json.loads`; and a summary record that a later one with the same paths
shadows is not replayed at all (`_Shadowed`).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
import types
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
import multiprocessing
import os
from typing import Iterable

import numpy as np
import pandas as pd

from . import forking, wandb_log
from .rules import default_limits

CHUNK_ROWS = 65536  # rows buffered as text before a column-wise conversion
CONSOLE_TAIL = 200  # console lines kept in memory (the full log goes to a file)


_MAX_STEP = 1 << 53  # a float holds every integer step up to here exactly
_INT_RE = re.compile(r"-?\d+(?:\x00-?\d+)*")
_OUTPUT_KINDS = ("output", "output_raw", "output_logger")

# Files above this size are decoded in block ranges on several processes.
PARALLEL_MIN_BYTES = 32 * 1024 * 1024
# At most this many decode processes: each holds its range's columns, and
# past a few the merge and the forks cost more than a range saves.
MAX_WORKERS = 4


@dataclass
class RunLog:
    """Everything one `.wandb` file says, as plain Python and pandas objects."""

    path: str
    scan: wandb_log.ScanReport
    meta: dict
    config: dict
    summary: dict | None  # None when the decode was asked not to replay it
    history: pd.DataFrame
    # Logged non-finite values, {column: {"rows": [...], "values": [...]}}; kept
    # apart because NaN in `history` also means "not logged at this step".
    non_finite: dict
    system: pd.DataFrame
    console_tail: list[str]
    record_types: dict
    history_keys: list = field(default_factory=list)  # leaf keys, "/"-joined
    value_json_errors: int = 0
    error: str | None = None
    # What the decoder dropped, with why: rows with an unusable _step, items
    # past the row/column caps, console records cut to their end.
    dropped: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.meta.get("status", "unreadable")


def _decode_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # keep the raw text rather than lose the value


class _Column:
    """One history key: row numbers and values, converted chunk by chunk."""

    __slots__ = ("rows", "raw", "done_rows", "done_vals")

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.raw: list[str] = []
        self.done_rows: list[np.ndarray] = []
        self.done_vals: list[np.ndarray] = []

    def flush(self) -> None:
        if not self.raw:
            return
        self.done_rows.append(np.asarray(self.rows, dtype=np.int64))
        self.done_vals.append(_convert(self.raw))
        self.rows, self.raw = [], []

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        rows = np.concatenate(self.done_rows) if self.done_rows else np.empty(0, np.int64)
        vals = self.done_vals
        if all(v.dtype.kind in "if" for v in vals):
            kinds = {v.dtype.kind for v in vals}
            out = np.concatenate(vals).astype(np.float64 if "f" in kinds else np.int64)
        else:
            out = np.concatenate([v.astype(object) for v in vals])
        return rows, out


def _convert(raw: list[str]) -> np.ndarray:
    """Column-wise JSON value conversion with a per-item fallback."""
    joined = "\x00".join(raw)
    if _INT_RE.fullmatch(joined):
        try:
            return np.array(raw, dtype=np.int64)
        except OverflowError:
            pass
    try:
        return np.array(raw, dtype=np.float64)
    except ValueError:
        out = np.empty(len(raw), dtype=object)
        out[:] = [_decode_json(v) for v in raw]
        return out


def _item_value_json(item) -> str:
    """value_json, or the typed oneof newer writers may use instead."""
    if item.value_json:
        return item.value_json
    try:
        kind = item.WhichOneof("value")
    except ValueError:  # protos of older wandb have no typed values
        kind = None
    if kind is None or kind == "none":
        return "null"
    if kind == "json":
        return item.json
    return json.dumps(getattr(item, kind))


class _Replay:
    """Summary/config replay on raw JSON text, as a tree keyed by path parts:
    a leaf is the value's JSON text, an inner node a dict.

    Setting a path replaces its subtree and turns any value on the way into a
    dict (last writer wins, as wandb's own replay); removing a path drops its
    subtree. Each costs the path's length, whatever the tree holds, so a
    record setting 60k keys and the next removing them is linear. A one-part
    path (nearly every summary item) is one dict assignment."""

    def __init__(self) -> None:
        self.tree: dict = {}
        self.removed: list[tuple] = []  # kept so a later range can be merged

    def update(self, items: Iterable) -> None:
        tree = self.tree
        for it in items:
            nk = it.nested_key
            if not nk:
                tree[it.key] = it.value_json
            elif len(nk) == 1:
                tree[nk[0]] = it.value_json
            else:
                self._set(tuple(nk), it.value_json)

    def _set(self, path: tuple, text: str) -> None:
        node = self.tree
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):  # absent, or a value that now becomes a dict
                child = node[part] = {}
            node = child
        node[path[-1]] = text

    def remove(self, items: Iterable) -> None:
        for it in items:
            path = tuple(it.nested_key) if it.nested_key else (it.key,)
            self.removed.append(path)
            self._drop(path)

    def _drop(self, path: tuple) -> None:
        node = self.tree
        for part in path[:-1]:
            node = node.get(part)
            if not isinstance(node, dict):
                return
        node.pop(path[-1], None)

    def then(self, later: "_Replay") -> None:
        """Apply a later block range's replay on top of this one: its removals,
        then its final values (what it removed is already gone from those)."""
        for path in later.removed:
            self._drop(path)
        self.removed += later.removed
        stack = [((), later.tree)]
        while stack:
            prefix, node = stack.pop()
            for key, child in node.items():
                if isinstance(child, dict):
                    stack.append((prefix + (key,), child))
                else:
                    self._set(prefix + (key,), child)

    def build(self) -> tuple[dict, int]:
        errors = [0]
        return self._build(self.tree, errors), errors[0]

    def _build(self, node: dict, errors: list) -> dict:
        out: dict = {}
        for key, child in node.items():
            if isinstance(child, dict):
                out[key] = self._build(child, errors)
                continue
            value = _decode_json(child) if child else None
            if isinstance(value, str) and child and not child.startswith('"'):
                errors[0] += 1
            out[key] = value
        return out


def _set_path(out: dict, path: tuple, value) -> None:
    node = out
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[path[-1]] = value


class _Decoder:
    """Consumes Record messages once and accumulates the tidy state."""

    def __init__(self, console_path: str | None = None, summary: bool = True) -> None:
        self.replay_summary = summary
        self.cols: dict = {}
        self.steps: list[int] = []
        self.saw_step_item = False
        self.n_rows = 0
        self.summary = _Replay()
        self.config = _Replay()
        self.meta: dict = {"run_records": 0}
        self.system_rows: list[dict] = []
        self.types: Counter = Counter()
        self.console_tail: deque = deque(maxlen=CONSOLE_TAIL)
        self.console_lines = Counter()
        self.console = open(console_path, "a", encoding="utf-8") if console_path else None
        self.environment: dict = {}
        # Rows dropped for an unusable _step: (row, the text), the first few, and the count.
        self.bad_steps: list = []
        self.n_bad_steps = 0
        self.dropped_items = 0    # history items past limits.max_row_items / max_history_columns
        limits = default_limits()  # cached: read once per process
        self.max_row_items = int(limits["max_row_items"])
        self.max_columns = int(limits["max_history_columns"])
        self.console_cap = int(limits["console_line_bytes"])
        self.console_cut = 0      # output records cut to limits.console_line_bytes

    def feed(self, rec, kind: str | None) -> None:
        """Any record but history and summary, which `_feed` hands straight
        to their handlers (they are nearly all of a file)."""
        self.types[kind] += 1
        if kind in _OUTPUT_KINDS:
            self._on_output(kind, getattr(rec, kind))
        elif kind is not None:
            handler = getattr(self, "_on_" + kind, None)
            if handler is not None:
                handler(getattr(rec, kind))

    def _on_history(self, h) -> None:
        row = self.n_rows
        self.n_rows += 1
        cols = self.cols
        step = None
        items = h.item
        if len(items) > self.max_row_items:
            self.dropped_items += len(items) - self.max_row_items
            items = items[:self.max_row_items]
        for item in items:
            nk = item.nested_key
            if nk:
                key = nk[0] if len(nk) == 1 else tuple(nk)
            else:
                key = item.key
            text = item.value_json or _item_value_json(item)
            if key == "_step":
                step = text
                continue
            col = cols.get(key)
            if col is None:
                if len(cols) >= self.max_columns:
                    self.dropped_items += 1
                    continue
                col = cols[key] = _Column()
            col.rows.append(row)
            col.raw.append(text)
        if step is not None:
            self.saw_step_item = True
        if step is None:
            value = h.step.num
        else:
            try:
                number = float(step)
            except (TypeError, ValueError):
                number = -1.0
            value = int(number) if 0 <= number < _MAX_STEP else -1  # NaN compares False
        if value < 0:  # this row only: dropped when the frame is built
            self.n_bad_steps += 1
            if len(self.bad_steps) < 10:
                self.bad_steps.append((row, str(step)[:40]))
            value = -1
        self.steps.append(value)
        if self.n_rows % CHUNK_ROWS == 0:
            for col in cols.values():
                col.flush()

    def thin(self, keep_last: int, stride: int) -> int:
        """Bound the rows held (diagnose --follow): keep the last `keep_last`
        rows whole and every `stride`-th row before them, plus every row that
        holds a value of a sparse column (logged on fewer than half the rows:
        action stats, images) or a non-finite value. Rows are renumbered;
        returns how many were dropped. Called again as the log grows, older
        rows thin out geometrically, so memory stays bounded."""
        n = self.n_rows
        if n <= keep_last:
            return 0
        keep = np.zeros(n, dtype=bool)
        keep[n - keep_last:] = True
        keep[::stride] = True
        got = {key: col.values() for key, col in self.cols.items()}
        for rows, vals in got.values():
            if len(rows) < n / 2:
                keep[rows] = True
            elif vals.dtype.kind == "f":
                keep[rows[~np.isfinite(vals)]] = True
        new_index = np.cumsum(keep) - 1
        for key, (rows, vals) in got.items():
            m = keep[rows]
            col = self.cols[key]
            col.done_rows, col.done_vals = [new_index[rows[m]]], [vals[m]]
        steps = np.asarray(self.steps, dtype=np.int64)
        self.steps = steps[keep].tolist()
        self.bad_steps = [(int(new_index[r]), t) for r, t in self.bad_steps if keep[r]]
        self.n_bad_steps = int((steps[keep] < 0).sum())
        self.n_rows = int(keep.sum())
        return n - self.n_rows

    def _on_summary(self, s) -> None:
        self.summary.update(s.update)
        if s.remove:
            self.summary.remove(s.remove)

    def _on_config(self, c) -> None:
        self.config.update(c.update)
        if len(c.remove):
            self.config.remove(c.remove)

    def _on_run(self, r) -> None:
        m = self.meta
        m["run_records"] += 1
        if r.HasField("telemetry"):  # older writers put telemetry in the run record
            self._on_telemetry(r.telemetry)
        if m["run_records"] == 1:
            m.update(run_id=r.run_id, entity=r.entity, project=r.project,
                     name=r.display_name, tags=list(r.tags), host=r.host,
                     resumed=r.resumed, starting_step=r.starting_step,
                     start_time=_ts(r.start_time), run_group=r.run_group,
                     job_type=r.job_type)
            self.config.update(r.config.update)
        elif r.display_name:
            m["name"] = r.display_name  # later run records carry server-side names
        for attr in ("host", "project", "entity"):
            if not m.get(attr) and getattr(r, attr):
                m[attr] = getattr(r, attr)

    def _stamp(self, key: str, ts: float | None) -> None:
        """Keep the newest time each kind of timed record carries."""
        if ts and ts > self.meta.get(key, 0.0):
            self.meta[key] = ts

    def _on_stats(self, s) -> None:
        row = {"timestamp": _ts(s.timestamp)}
        self._stamp("last_stats_time", row["timestamp"])
        for it in s.item:
            v = _decode_json(it.value_json)
            row[it.key] = v if isinstance(v, (int, float)) else np.nan
        self.system_rows.append(row)

    def _on_exit(self, e) -> None:
        self.meta.update(exit_code=e.exit_code, runtime=e.runtime)

    def _on_header(self, h) -> None:
        info = h.version_info
        # A message in current protos ({producer, min_consumer}), text in old ones.
        producer = getattr(info, "producer", info)
        self.meta["producer_version"] = producer if isinstance(producer, str) and producer else None

    def _on_telemetry(self, t) -> None:
        for attr in ("cli_version", "python_version", "core_version"):
            if getattr(t, attr):
                self.meta[attr] = getattr(t, attr)

    def _on_environment(self, env) -> None:
        # Newer files hold two environment records; merge them.
        for f, value in env.ListFields():
            if f.name in ("os", "python", "host", "program", "root", "cpu_count",
                          "cpu_count_logical", "gpu_type", "gpu_count", "executable",
                          "cuda_version", "username"):
                self.environment[f.name] = value
            elif f.name == "args":
                self.environment["args"] = list(value)

    def _on_output(self, kind: str, o) -> None:
        ts = _ts(o.timestamp) if o.HasField("timestamp") else None
        self._stamp("last_output_time", ts)
        try:  # enum values differ between record kinds: use the names
            stream = type(o).OutputType.Name(o.output_type).lower()
        except (AttributeError, ValueError):
            stream = "stdout"
        self.console_lines[kind] += 1
        text = o.line
        cap = self.console_cap
        if len(text) > cap:  # the end of it: where an error is
            self.console_cut += 1
            text = f"[{len(text) - cap:,} characters cut] " + text[-cap:]
        # Raw terminal chunks: keep what a terminal would show of each line (the
        # last non-empty segment after carriage returns).
        for line in text.replace("\r\n", "\n").split("\n"):
            shown = [seg for seg in line.split("\r") if seg.strip()]
            if shown:
                self.console_tail.append(shown[-1])
        if self.console is not None:
            self.console.write(f"{ts or ''}\t{stream}\t{json.dumps(text)}\n")

    def then(self, later: "_Decoder") -> None:
        """Append the state of the next block range of the same file."""
        offset = self.n_rows
        for key, col in later.cols.items():
            mine = self.cols.setdefault(key, _Column())
            mine.done_rows += [r + offset for r in col.done_rows]
            mine.done_vals += col.done_vals
        self.bad_steps += [(r + offset, t) for r, t in later.bad_steps][:max(0, 10 - len(self.bad_steps))]
        self.n_bad_steps += later.n_bad_steps
        self.dropped_items += later.dropped_items
        self.console_cut += later.console_cut
        self.n_rows += later.n_rows
        self.steps += later.steps
        self.saw_step_item |= later.saw_step_item
        self.summary.then(later.summary)
        self.config.then(later.config)
        self._merge_meta(later.meta)
        self.system_rows += later.system_rows
        self.types.update(later.types)
        self.console_tail.extend(later.console_tail)
        self.console_lines.update(later.console_lines)
        self.environment.update(later.environment)

    def _merge_meta(self, later: dict) -> None:
        runs = later.pop("run_records", 0)
        if self.meta.get("run_records", 0) and runs:
            # The later range's "first" run record is an update of ours.
            for key in ("run_id", "entity", "project", "tags", "host", "resumed",
                        "starting_step", "start_time", "run_group", "job_type"):
                later.pop(key, None)
            if not later.get("name"):
                later.pop("name", None)
        for key in ("cli_version", "python_version", "core_version", "producer_version"):
            if key in self.meta:
                later.pop(key, None)
        for key in ("last_stats_time", "last_output_time"):
            if key in later:
                later[key] = max(later[key], self.meta.get(key, 0.0))
        self.meta.update(later)
        self.meta["run_records"] = self.meta.get("run_records", 0) + runs

    def history_frame(self) -> tuple[pd.DataFrame, dict]:
        n = self.n_rows
        data: dict = {"_step": np.asarray(self.steps, dtype=np.int64)}
        nested: dict = {}
        non_finite: dict = {}
        for key, col in self.cols.items():
            rows, vals = col.values()
            if isinstance(key, tuple):
                nested.setdefault(key[0], []).append((key[1:], rows, vals))
                continue
            if vals.dtype.kind == "f":
                if len(rows) == n:  # logged every row (rows ascend): the values are the column
                    full = vals
                else:
                    full = np.full(n, np.nan)
                    full[rows] = vals
                bad = ~np.isfinite(vals)
                if bad.any():
                    non_finite[key] = {"rows": rows[bad].tolist(),
                                       "values": [nf_text(v) for v in vals[bad]]}
            elif vals.dtype.kind == "i" and len(rows) == n:
                full = vals
            elif vals.dtype.kind == "i":
                full = np.full(n, np.nan)
                full[rows] = vals
            else:
                full = np.full(n, None, dtype=object)
                full[rows] = vals
            data[key] = full
        for key, leaves in nested.items():
            data[key] = _rebuild_nested(n, leaves)
        if self.n_bad_steps:
            data, non_finite = _without_bad_rows(data, non_finite)
        # The arrays are this call's own: no copy (and no consolidation into one
        # block, which would copy every column once more).
        frame = pd.DataFrame(data, copy=False)
        return frame, non_finite


def _without_bad_rows(data: dict, non_finite: dict) -> tuple[dict, dict]:
    """Drop the rows whose _step was unusable (marked -1); renumber the rows
    that non-finite values were reported at."""
    keep = data["_step"] >= 0
    new_index = np.cumsum(keep) - 1
    data = {k: v[keep] for k, v in data.items()}
    for entry in non_finite.values():
        pairs = [(int(new_index[r]), v) for r, v in zip(entry["rows"], entry["values"]) if keep[r]]
        entry["rows"], entry["values"] = [r for r, _ in pairs], [v for _, v in pairs]
    return data, {k: e for k, e in non_finite.items() if e["rows"]}


def nf_text(v: float) -> str:
    return "NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _rebuild_nested(n: int, leaves: list) -> np.ndarray:
    """Core writers flatten dict values into leaf paths; put them back."""
    out = np.full(n, None, dtype=object)
    for sub, rows, vals in leaves:
        for r, v in zip(rows.tolist(), vals.tolist()):
            if out[r] is None:
                out[r] = {}
            _set_path(out[r], sub, v)
    return out


def _ts(t) -> float | None:
    secs = t.seconds + t.nanos / 1e9
    return secs or None


def _proto():
    """wandb's generated `Record` classes.

    `import wandb.proto...` first runs wandb's package `__init__` (its SDK,
    settings, pydantic: about 0.45 s, most of a small bundle's diagnose). The
    generated modules need none of it, so they are imported under a bare
    stand-in for the `wandb` package, which is removed again: a later
    `import wandb` loads the real package and finds these modules in
    `sys.modules`. Any surprise falls back to the plain import."""
    pb = sys.modules.get("wandb.proto.wandb_internal_pb2")
    if pb is not None:
        return pb
    spec = None if "wandb" in sys.modules else importlib.util.find_spec("wandb")
    if spec is not None and spec.submodule_search_locations:
        stand_in = types.ModuleType("wandb")
        stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules["wandb"] = stand_in
        try:
            from wandb.proto import wandb_internal_pb2 as pb
        except Exception:  # a wandb whose protos need its package: import it whole
            pb = None
        finally:
            if sys.modules.get("wandb") is stand_in:
                del sys.modules["wandb"]
        if pb is not None:
            return pb
    from wandb.proto import wandb_internal_pb2 as pb
    return pb


def _feed(dec: "_Decoder", report: wandb_log.ScanReport, payloads) -> int:
    """Parse each payload once and feed it; returns how many records.

    History and summary records are nearly all of a file: they go straight
    to their handlers, the rest through `_Decoder.feed`. A summary record is
    replayed only if no later one sets exactly the same paths (`_Shadowed`)."""
    record = _proto().Record
    from_string, which = record.FromString, record.WhichOneof
    on_history, feed = dec._on_history, dec.feed
    summaries = _Shadowed(dec._on_summary) if dec.replay_summary else None
    n_history = n_summary = n = 0
    for payload in payloads:
        try:
            rec = from_string(payload)
        except Exception:  # protobuf raises DecodeError or RuntimeError by backend
            report.decode_errors += 1
            continue
        n += 1
        kind = which(rec, "record_type")
        if kind == "history":
            n_history += 1
            on_history(rec.history)
        elif kind == "summary":
            n_summary += 1
            if summaries is not None:
                summaries.add(payload, rec.summary)
        else:
            feed(rec, kind)
    if summaries is not None:
        summaries.flush()
    for kind, count in (("history", n_history), ("summary", n_summary)):
        if count:
            dec.types[kind] += count
    return n


class _Shadowed:
    """Summary records held back until a later record that sets and removes
    exactly the same paths, in the same order, makes them moot; the rest are
    replayed in the order of their last occurrence, which gives the replay of
    every record. wandb writes two summary records per step, with a handful
    of key layouts between them, so nearly all are skipped unreplayed: the
    replay walks every item in Python (4.6 us a record), and the layout is
    read by protobuf in C (2.2 us; `_key_layout`). At most
    `MAX_SHADOW_LAYOUTS` records wait; past that they are replayed at once."""

    def __init__(self, replay) -> None:
        self.replay, self.waiting = replay, {}
        self.layout = _key_layout()

    def add(self, payload: bytes, s) -> None:
        if self.layout is None:
            self.replay(s)
            return
        key = self.layout(payload)
        self.waiting.pop(key, None)  # shadowed by this one
        self.waiting[key] = s        # re-inserted last: replayed in order of last occurrence
        if len(self.waiting) > MAX_SHADOW_LAYOUTS:
            self.flush()

    def flush(self) -> None:
        for s in self.waiting.values():
            self.replay(s)
        self.waiting.clear()


MAX_SHADOW_LAYOUTS = 256  # summary records held back at most (a few key layouts in practice)


def _key_layout():
    """A function from a summary record's payload to its paths alone (keys
    and nested keys of its updates and removals, in order, values dropped),
    as bytes: protobuf parses the payload into a message type that declares
    only those fields, drops the rest, and serialises what is left. None
    where this protobuf cannot build the type (records are then replayed
    one by one)."""
    keys = _layout_type()
    if keys is None:
        return None

    def layout(payload: bytes) -> bytes:
        msg = keys.FromString(payload)
        msg.DiscardUnknownFields()
        return msg.SerializeToString()
    return layout


@functools.cache
def _layout_type():
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        fd = descriptor_pb2.FieldDescriptorProto
        f = descriptor_pb2.FileDescriptorProto(name="twdiag_summary_layout.proto", package="twdiag_layout",
                                               syntax="proto3")
        item = f.message_type.add(name="Item")  # wandb's SummaryItem without value_json (16)
        item.field.add(name="key", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
        item.field.add(name="nested_key", number=2, type=fd.TYPE_STRING, label=fd.LABEL_REPEATED)
        summary = f.message_type.add(name="Summary")  # SummaryRecord: update 1, remove 2
        for name, number in (("update", 1), ("remove", 2)):
            summary.field.add(name=name, number=number, type=fd.TYPE_MESSAGE, label=fd.LABEL_REPEATED,
                              type_name=".twdiag_layout.Item")
        record = f.message_type.add(name="Record")  # Record.summary is field 3
        record.field.add(name="summary", number=3, type=fd.TYPE_MESSAGE, label=fd.LABEL_OPTIONAL,
                         type_name=".twdiag_layout.Summary")
        pool = descriptor_pool.DescriptorPool()
        pool.Add(f)
        desc = pool.FindMessageTypeByName("twdiag_layout.Record")
        make = getattr(message_factory, "GetMessageClass", None)
        return make(desc) if make else message_factory.MessageFactory(pool).GetPrototype(desc)
    except Exception:  # an old or unusual protobuf: replay every record
        return None


def _decode_range(path: str, first_block: int, stop_block: int | None,
                  console_path: str | None, summary: bool = True) -> tuple[_Decoder, wandb_log.ScanReport]:
    report, payloads = wandb_log.scan(path, first_block, stop_block)
    dec = _Decoder(console_path, summary)
    _feed(dec, report, payloads)
    for col in dec.cols.values():
        col.flush()
    if dec.console is not None:
        dec.console.close()
        dec.console = None
    return dec, report


def _workers(size: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, requested)
    if size < PARALLEL_MIN_BYTES or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return min(MAX_WORKERS, forking.cpus())


def _run_ranges(jobs: list[tuple]) -> list[tuple["_Decoder", wandb_log.ScanReport]]:
    """Decode block ranges in forked worker processes, or one after another
    here when this process runs other threads: a fork beside live threads
    can leave a worker stuck on a lock one of them held (wandb keeps four
    alive once a run was started in the process: a hang seen in the test
    session), and spawn would re-run the caller's main module in every
    worker. The ranges and their merge are the same either way."""
    if len(jobs) > 1 and forking.can_fork():
        # Import the protobuf classes before forking: the workers inherit them,
        # and this process (a --follow poll next) has them too.
        _proto()
    return forking.starmap(_decode_range, jobs, workers=len(jobs))


def decode_state(path: str | Path, console_path: str | Path | None = None,
                 workers: int | None = None, summary: bool = True) -> tuple[_Decoder, wandb_log.ScanReport]:
    """The decoder state and scan report of one file (see `decode`)."""
    path = str(path)
    try:
        probe, fh, _ = wandb_log.open_log(path)
    except wandb_log.WandbLogError as exc:
        probe, fh = wandb_log.ScanReport(path=path, header_error=str(exc)), None
    if fh is None:
        return _Decoder(summary=summary), probe
    fh.close()
    blocks = wandb_log.block_count(probe)
    n = min(_workers(probe.file_size, workers), blocks)
    cuts = [blocks * k // n for k in range(n)] + [None]
    consoles = [None] * n if console_path is None else \
        [str(console_path)] if n == 1 else [f"{console_path}.part{k}" for k in range(n)]
    jobs = [(path, cuts[k], cuts[k + 1], consoles[k], summary) for k in range(n)]
    parts = _run_ranges(jobs)
    if n > 1 and console_path is not None:
        _concat(consoles, str(console_path))
    dec = parts[0][0]
    for later, _ in parts[1:]:
        dec.then(later)
    return dec, wandb_log.merge_reports([r for _, r in parts])


def decode(path: str | Path, console_path: str | Path | None = None,
           workers: int | None = None, summary: bool = True) -> RunLog:
    """Decode one `.wandb` file. Never raises on bad content; see `.error`.

    Large files are split into block ranges decoded in parallel (blocks are
    independently resyncable); the result is identical to a serial decode.
    `console_path`, when given, receives every console line (TSV: time,
    stream, JSON-quoted text). `summary=False` skips the summary replay
    (about a quarter of the decode: wandb writes two summary records per
    step) for callers that never read it; `RunLog.summary` is then None.
    """
    dec, report = decode_state(path, console_path, workers, summary)
    return build(str(path), dec, report)


class LiveLog:
    """A `.wandb` file that is still being written, read at the cost of its
    new bytes: the decoder state is kept between polls and each poll resumes
    just after the last complete record (a half-written record at the tail
    is read again, whole, next time). A file that shrinks or is replaced is
    read again from the start, and `resets` says so."""

    def __init__(self, path: str | Path, workers: int | None = None, summary: bool = True):
        self.path, self.workers, self.summary = str(path), workers, summary
        self.resets: list[str] = []
        self.thinned = 0  # history rows dropped by bound() so far
        self._start()

    def _start(self) -> None:
        self.dec, self.report = decode_state(self.path, workers=self.workers, summary=self.summary)
        self.offset = self.report.next_offset
        self.ident = self._ident()
        self.new_records = self.report.records_total

    def _ident(self):
        try:
            st = os.stat(self.path)
            return st.st_dev, st.st_ino, st.st_size
        except OSError:
            return None

    def poll(self) -> int:
        """Read what is new; returns the number of new records."""
        ident = self._ident()
        if ident is None or not self.report.header_ok:
            if ident is not None and ident != self.ident:
                self.resets.append("the file appeared or changed: read from the start")
                self._start()
                return self.new_records
            return 0
        if ident[:2] != self.ident[:2] or ident[2] < self.offset:
            self.resets.append("replaced" if ident[:2] != self.ident[:2] else
                               f"shrank to {ident[2]} bytes: read again from the start")
            self._start()
            return self.new_records
        self.ident = ident
        if ident[2] == self.offset:
            return 0
        rep, payloads = wandb_log.scan(self.path, start_offset=self.offset)
        n = _feed(self.dec, rep, payloads)
        self.report = wandb_log.merge_reports([self.report, rep])
        for name in ("file_size", "truncated_tail", "truncation", "scan_end_offset", "resume_offset"):
            setattr(self.report, name, getattr(rep, name))  # the tail is this poll's
        self.offset = self.report.next_offset
        return n

    def bound(self, max_rows: int, keep_last: int) -> int:
        """Thin the held history (halving the rows before the last
        `keep_last`) while it holds more than `max_rows`; returns rows dropped."""
        dropped = 0
        while self.dec.n_rows > max_rows:
            gone = self.dec.thin(keep_last, 2)
            if not gone:
                break
            dropped += gone
        self.thinned += dropped
        return dropped

    def runlog(self) -> RunLog:
        return build(self.path, self.dec, self.report)


def _concat(parts: list[str], target: str) -> None:
    with open(target, "ab") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)
            os.unlink(part)


def build(path: str, dec: _Decoder, report: wandb_log.ScanReport) -> RunLog:
    """The RunLog of a decoder's current state (repeatable: it consumes nothing)."""
    history, non_finite = dec.history_frame()
    summary, s_err = dec.summary.build() if dec.replay_summary else (None, 0)
    config, c_err = dec.config.build()
    meta = dec.meta
    meta["environment"] = dec.environment
    meta["console_lines"] = dict(dec.console_lines)
    meta["status"] = _status(report, meta)
    keys = ["/".join(k) if isinstance(k, tuple) else k for k in dec.cols]
    keys += ["_step"] if dec.saw_step_item else []
    return RunLog(path=path, scan=report, meta=meta, config=config,
                  summary=summary, history=history, non_finite=non_finite,
                  system=pd.DataFrame(dec.system_rows), console_tail=list(dec.console_tail),
                  record_types=dict(dec.types), history_keys=keys,
                  value_json_errors=s_err + c_err, error=report.header_error, dropped=_dropped(dec, report))


def _dropped(dec: _Decoder, report: wandb_log.ScanReport) -> dict:
    out = {}
    if dec.n_bad_steps:
        shown = ", ".join(f"row {r}: {t!r}" for r, t in dec.bad_steps[:3])
        out["bad_step_rows"] = {"count": dec.n_bad_steps, "examples": dec.bad_steps[:10],
                                "reason": f"{dec.n_bad_steps} history row(s) with a _step that is not a finite "
                                          f"integer in [0, 2**53) dropped ({shown})"}
    if dec.dropped_items:
        out["history_items"] = {"count": dec.dropped_items,
                                "reason": f"{dec.dropped_items:,} history items past the caps "
                                          f"(limits.max_row_items, limits.max_history_columns) dropped"}
    if dec.console_cut:
        out["console_records_cut"] = {"count": dec.console_cut,
                                      "reason": f"{dec.console_cut} console record(s) longer than "
                                                "limits.console_line_bytes: only their end kept"}
    if report.oversized_records:
        out["oversized_records"] = {"count": report.oversized_records,
                                    "reason": f"{report.oversized_records} record(s) above limits.max_record_bytes "
                                              "skipped unparsed"}
    return out


def _status(report: wandb_log.ScanReport, meta: dict) -> str:
    if not report.header_ok:
        return "unreadable"
    if "exit_code" in meta:
        return "finished"
    if report.truncated_tail:
        return "incomplete"
    return "crashed-or-running"
