"""The seed's preferred export path: a run's history through wandb's public
`Api` (`run.scan_history`, config, summary, system metrics), turned into the
same `RunLog` records the local decoder gives, so every writer and analysis
is shared. The local `.wandb` files stay the default on restricted servers:

- `auto` asks the API only when credentials are configured (WANDB_API_KEY,
  or an api.wandb.ai entry in ~/.netrc) and the run is identified
  (`--api-run ENTITY/PROJECT/RUN_ID`, or the entity/project/id recorded in
  the local run files); otherwise it uses the local files without touching
  the network;
- when the API is unreachable or refuses, the local files are used and the
  JSON says why.
Tests inject a fake `Api` through `API_FACTORY`.
"""
from __future__ import annotations

import math
import netrc
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import bundle as bundle_mod, history, logs, wandb_log

API_FACTORY = None  # None: wandb.Api; tests put a fake here
API_HOST = "api.wandb.ai"


class ApiUnavailable(Exception):
    """The API path cannot be used; str() is why."""


@dataclass
class ApiRun:
    path: str               # entity/project/run_id
    stage: str | None = None  # from --api-run STAGE=..., else from the run name


def credentials() -> str | None:
    """Where credentials come from, without any network access; None if none."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    try:
        if netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL_HOST", API_HOST)):
            return "~/.netrc"
    except (OSError, netrc.NetrcParseError):
        pass
    return None


def parse_api_runs(values: list[str]) -> list[ApiRun]:
    out = []
    for v in values or []:
        stage, sep, path = v.partition("=")
        if not sep:
            stage, path = None, v
        elif bundle_mod.canonical_stage(stage) is None:
            raise ValueError(f"--api-run {v!r}: unknown stage {stage!r}; valid stages are "
                             f"{', '.join(bundle_mod.STAGES)}")
        if path.count("/") != 2 or not all(path.split("/")):
            raise ValueError(f"--api-run expects ENTITY/PROJECT/RUN_ID, got {path!r}")
        out.append(ApiRun(path, bundle_mod.canonical_stage(stage) if stage else None))
    return out


def identify(local: dict[str, logs.StageRuns]) -> list[ApiRun]:
    """Runs named in the local run files (entity, project and id all known)."""
    out = []
    for stage, runs in local.items():
        for log in runs.logs:
            m = log.meta
            if m.get("entity") and m.get("project") and m.get("run_id"):
                out.append(ApiRun(f"{m['entity']}/{m['project']}/{m['run_id']}", stage))
    return out


def _api():
    if API_FACTORY is not None:
        return API_FACTORY()
    import wandb
    return wandb.Api(timeout=30)


def fetch(runs: list[ApiRun]) -> dict[str, logs.StageRuns]:
    """Every run through the API, grouped by stage; raises ApiUnavailable."""
    try:
        api = _api()
    except Exception as exc:  # wandb raises many kinds when it cannot log in or reach the host
        raise ApiUnavailable(f"cannot create the W&B API client: {type(exc).__name__}: {exc}"[:300])
    stages: dict[str, logs.StageRuns] = {}
    for r in runs:
        try:
            run = api.run(r.path)
            log = run_log(run, r.path)
        except Exception as exc:
            raise ApiUnavailable(f"W&B API refused or did not answer for {r.path}: "
                                 f"{type(exc).__name__}: {exc}"[:300])
        stage, how = (r.stage, "--api-run") if r.stage else logs.classify(log, None)
        entry = stages.setdefault(stage or "unknown", logs.StageRuns(stage or "unknown"))
        entry.logs.append(log)
        entry.mapped_by.append(how)
    return stages


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_log(run, path: str) -> history.RunLog:
    """One API run as the RunLog the local decoder would give."""
    rows = list(run.scan_history())
    frame = pd.DataFrame(rows)
    if "_step" not in frame.columns:
        frame["_step"] = np.arange(len(frame))
    frame = frame.sort_values("_step", kind="stable").reset_index(drop=True)
    non_finite = {}
    for col in frame.columns:
        values = frame[col]
        if values.dtype == object and values.map(lambda v: v is None or _is_number(v)).all():
            values = pd.to_numeric(values, errors="coerce")
            frame[col] = values
        if values.dtype.kind == "f":
            arr = values.to_numpy()
            bad = np.flatnonzero(np.isinf(arr))
            if len(bad):
                non_finite[col] = {"rows": bad.tolist(), "values": [history.nf_text(arr[i]) for i in bad]}
    try:
        system = run.history(stream="events", pandas=True)
    except Exception:  # system metrics are an extra
        system = pd.DataFrame()
    summary = dict(getattr(run, "summary", {}) or {})
    state = getattr(run, "state", None)
    meta = {"run_id": getattr(run, "id", path.rsplit("/", 1)[-1]), "entity": getattr(run, "entity", None),
            "project": getattr(run, "project", None), "name": getattr(run, "name", None),
            "api_state": state, "source": "wandb api", "api_path": path}
    if state in ("finished", "crashed", "failed", "killed"):
        meta["exit_code"] = 0 if state == "finished" else 1
    meta["status"] = "finished" if "exit_code" in meta else "crashed-or-running"
    report = wandb_log.ScanReport(path=f"wandb-api://{path}", header_ok=True)
    config = {k: v for k, v in dict(getattr(run, "config", {}) or {}).items() if not k.startswith("_")}
    return history.RunLog(path=f"wandb-api://{path}", scan=report, meta=meta, config=config,
                          summary={k: v for k, v in summary.items() if not isinstance(v, float) or math.isfinite(v)},
                          history=frame, non_finite=non_finite,
                          system=system if isinstance(system, pd.DataFrame) else pd.DataFrame(),
                          console_tail=[], record_types={"history": len(frame)},
                          history_keys=[c for c in frame.columns if c != "_step"])
