"""The raw records of one `.wandb` log, one JSON object each: the independent
check of a number, without reimplementing the format.

Each record goes through our framing (`wandb_log`) and wandb's own protobuf
classes, once. A line holds the record's offset in the file (of its first
chunk), its type, and its content: for history, the step and every item as
`{key: value}` (values decoded from their JSON; nested keys joined with "/");
for config and summary, the items set and removed; for the rest, wandb's
message as a dict (long strings cut, and said so). Damage is a value: the
last line is the scan report (corrupt chunks, truncation, skipped records).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from . import history, wandb_log

TYPES = ("history", "config", "summary", "exit", "stats", "output", "output_raw", "run", "header",
         "environment", "telemetry", "files", "metric", "final", "footer")
MAX_TEXT = 2000  # characters of one string value shown


def _value(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _cut(obj):
    if isinstance(obj, str) and len(obj) > MAX_TEXT:
        return obj[:MAX_TEXT] + f"… [{len(obj) - MAX_TEXT:,} characters cut]"
    if isinstance(obj, dict):
        return {k: _cut(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cut(v) for v in obj[:1000]] + ([f"[{len(obj) - 1000} more]"] if len(obj) > 1000 else [])
    return obj


def describe(rec, kind: str) -> dict:
    """One record as a JSON-ready dict (without its offset)."""
    if kind == "history":
        items = {_key(i): _value(history._item_value_json(i)) for i in rec.history.item}
        step = items.get("_step", rec.history.step.num)
        return {"type": kind, "step": step, "items": _cut(items)}
    if kind in ("config", "summary"):
        msg = getattr(rec, kind)
        return {"type": kind, "set": _cut({_key(i): _value(i.value_json) for i in msg.update}),
                "removed": [_key(i) for i in msg.remove][:1000]}
    body = getattr(rec, kind) if kind else rec
    return {"type": kind or "unknown", "content": _cut(_as_dict(body))}


def _as_dict(msg) -> dict:
    """wandb's message as a dict, zero-valued fields included (an exit code of 0 is a value)."""
    from google.protobuf.json_format import MessageToDict
    for flag in ("always_print_fields_with_no_presence", "including_default_value_fields"):
        try:
            return MessageToDict(msg, preserving_proto_field_name=True, **{flag: True})
        except TypeError:
            continue
    return MessageToDict(msg, preserving_proto_field_name=True)


def _in_steps(doc: dict, steps: tuple[int | None, int | None] | None) -> bool:
    if steps is None:
        return True
    step = doc.get("step")
    if not isinstance(step, (int, float)):
        return False
    lo, hi = steps
    return (lo is None or step >= lo) and (hi is None or step < hi)


def iter_records(path: str | Path, types: set[str] | None = None,
                 steps: tuple[int | None, int | None] | None = None) -> Iterator[dict]:
    """Every record of the file (after the filters), then the scan report as
    the last item ({"type": "scan_report", ...})."""
    report, payloads = wandb_log.scan(path, offsets=True)
    record = history._proto().Record
    which = record.WhichOneof
    for offset, payload in payloads:
        try:
            rec = record.FromString(payload)
        except Exception as exc:  # protobuf raises by backend
            yield {"type": "undecodable", "offset": offset, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        kind = which(rec, "record_type")
        if types and kind not in types:
            continue
        if steps is not None and kind != "history":
            continue
        doc = describe(rec, kind)
        if not _in_steps(doc, steps):
            continue
        yield {"offset": offset, **doc}
    yield {"type": "scan_report", **report.to_dict()} if hasattr(report, "to_dict") else \
        {"type": "scan_report", **{k: v for k, v in vars(report).items() if not k.startswith("_")}}
