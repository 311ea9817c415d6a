"""One schema for the tables `scan`, `query` and `export` share: a column is
named once, here.

A diagnosis becomes six tables, each with a `bundle` column (the bundle's
path as given, which also names its partition in a scan's dataset):

- `bundles`:     bundle, folder_time, newest_record_time, overall, error
- `stages`:      verdict, state, progress, fallback step/path, worth_resuming,
                 and the key numbers of the stage
- `findings`:    one row per finding (value and threshold as JSON text)
- `checkpoints`: status, loss, lr and weight growth at every checkpoint
- `images`:      step, PSNR, flags per image grid
- `history`:     per stage, every numeric column on the stage's step axis
                 (`step`; `source` is the run id the row came from)

Built from the diagnosis document and the decoded histories only, so a
table holds exactly the numbers `diagnose` reports.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

TABLES = ("bundles", "stages", "findings", "checkpoints", "images", "history")
_FOLDER_TS = re.compile(r"(?<!\d)(\d{8}_\d{6})(?!\d)")

STAGE_NUMBERS = ("last_step", "n_updates", "loss_first", "loss_final", "loss_min", "late_fraction_of_chance",
                 "unique_actions_late", "n_actions", "entropy_late_fraction", "lr_peak", "lr_current",
                 "steps_per_s", "latest_image_psnr_db")


def _text(v) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def from_analysis(a, doc: dict, bundle: str) -> dict[str, pd.DataFrame]:
    """The six tables of a diagnosis: its document (`report.combine`'s), its
    decoded histories and its per-image details."""
    return from_diagnosis(doc, a.histories, bundle, (a.visuals or {}).get("details"))


def from_diagnosis(doc: dict, histories: dict | None, bundle: str,
                   image_details: dict | None = None) -> dict[str, pd.DataFrame]:
    """The six tables of one diagnosis document (`report.combine`'s)."""
    from pathlib import Path
    folder = _FOLDER_TS.search(Path(bundle).name)
    newest = [e["status"].get("last_record_time") for e in doc["stages"].values()
              if (e.get("status") or {}).get("last_record_time")]
    out = {"bundles": pd.DataFrame([{"bundle": bundle, "folder_time": folder.group(1) if folder else None,
                                     "newest_record_time": max(newest) if newest else None,
                                     "overall": doc.get("overall"), "error": None}])}
    stages, findings, ckpts, images = [], [], [], []
    for stage, e in doc["stages"].items():
        fb = e.get("fallback") or {}
        lin = e.get("lineage") or {}
        latest = (lin.get("attempts") or [{}])[-1] if lin else {}
        nums = e.get("numbers") or {}
        stages.append({"bundle": bundle, "stage": stage, "verdict": e["verdict"],
                       "state": (e.get("status") or {}).get("state"),
                       "progress": _num(latest.get("progress")), "attempts": lin.get("count"),
                       "fallback_step": fb.get("step"), "fallback_path": fb.get("path"),
                       "restart": fb.get("restart"), "worth_resuming": fb.get("worth_resuming"),
                       **{k: _num(nums.get(k)) for k in STAGE_NUMBERS}})
        for f in e["findings"]:
            findings.append({"bundle": bundle, "stage": stage, "rule_id": f["rule_id"], "severity": f["severity"],
                             "metric": f.get("metric"), "value": _text(f.get("value")),
                             "threshold": _text(f.get("threshold")), "message": f.get("message"),
                             "evidence_path": f.get("evidence_path")})
        for row in ((e.get("checkpoints") or {}).get("table") or []):
            ckpts.append({"bundle": bundle, "stage": stage, "step": row.get("step"), "status": row.get("status"),
                          "deep_scan": row.get("deep_scan"), "loss": _num(row.get("loss")),
                          "learning_rate": _num(row.get("learning_rate")),
                          "weight_norm": _num(row.get("weight_norm")),
                          "max_abs_weight": _num(row.get("max_abs_weight")),
                          "weights_vs_earliest": _num(row.get("weights_vs_earliest")),
                          "before_onset": row.get("before_onset"), "path": row.get("path")})
    out["stages"] = pd.DataFrame(stages)
    out["findings"] = pd.DataFrame(findings, columns=["bundle", "stage", "rule_id", "severity", "metric", "value",
                                                      "threshold", "message", "evidence_path"])
    out["checkpoints"] = pd.DataFrame(ckpts, columns=["bundle", "stage", "step", "status", "deep_scan", "loss",
                                                      "learning_rate", "weight_norm", "max_abs_weight",
                                                      "weights_vs_earliest", "before_onset", "path"])
    out["images"] = _images(image_details or {}, bundle)
    out["history"] = history_table(histories or {}, bundle)
    return out


def _images(details: dict, bundle: str) -> pd.DataFrame:
    rows = []
    for stage, images in details.items():
        for img in images:
            fid = ((img.get("metrics") or {}).get("fidelity") or {})
            rows.append({"bundle": bundle, "stage": stage, "step": img.get("step"), "path": img.get("path"),
                         "psnr_db": _num(fid.get("psnr_db")), "ssim": _num(fid.get("ssim")),
                         "flags": ",".join(img.get("flags") or []), "error": img.get("error")})
    return pd.DataFrame(rows, columns=["bundle", "stage", "step", "path", "psnr_db", "ssim", "flags", "error"])


def history_table(histories: dict, bundle: str) -> pd.DataFrame:
    """Every numeric column of every stage, wide, on its step axis."""
    frames = []
    for stage, hist in histories.items():
        f = hist.frame
        cols = {"bundle": np.full(len(f), bundle, dtype=object), "stage": np.full(len(f), stage, dtype=object),
                "step": pd.to_numeric(f["_step"], errors="coerce").to_numpy()}
        if "_source" in f.columns:
            cols["source"] = f["_source"].to_numpy()
        for c in f.columns:
            if c in ("_step", "_source") or not isinstance(c, str):
                continue
            if f[c].dtype.kind in "fiub":
                cols[c] = f[c].to_numpy(dtype=float)
        frames.append(pd.DataFrame(cols))
    if not frames:
        return pd.DataFrame({"bundle": [], "stage": [], "step": []})
    return pd.concat(frames, ignore_index=True, sort=False)


def error_tables(bundle: str, error: str) -> dict[str, pd.DataFrame]:
    """A bundle that could not be diagnosed: one `bundles` row with its error."""
    from pathlib import Path
    folder = _FOLDER_TS.search(Path(bundle).name)
    return {"bundles": pd.DataFrame([{"bundle": bundle, "folder_time": folder.group(1) if folder else None,
                                      "newest_record_time": None, "overall": None, "error": error[:1000]}])}
