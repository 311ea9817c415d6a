"""Compare a run with healthy baseline runs: drift, config diff, actions,
throughput, checkpoints and side-by-side pictures.

Runs are aligned by step over the steps they have in common. The baseline
envelope is built per step window on log loss: the median of the baselines'
window medians, with a half-width from their spread (two or more baselines)
and from each baseline's own step-to-step noise (residuals around a rolling
median), never narrower than a minimum relative band. Drift is the first
window from which the current run stays above the envelope.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import bundle, logs, safefs, stats, visuals
from .rules import Finding, findings_dicts, stage_verdict


@dataclass
class Side:
    """One run of one stage: its merged history and the bundle it came from."""

    label: str
    history: logs.StageHistory
    bundle: bundle.Bundle | None  # for checkpoints and images

    @property
    def frame(self) -> pd.DataFrame:
        return self.history.frame

    @property
    def paths(self) -> list[str]:
        return [str(log.path) for log in self.history.logs]


@dataclass
class StagePair:
    stage: str
    current: Side
    baselines: list[Side]
    notes: list[str] = field(default_factory=list)


# --- collecting runs ----------------------------------------------------------------

def _attempts(runs: logs.StageRuns) -> list[list]:
    """Split a stage's logs into attempts: a log starting at (near) step 0
    begins a new attempt; one starting later resumes the previous one."""
    out: list[list] = []
    for log in runs.logs:
        first = log.history["_step"].min() if len(log.history) else 0
        if not out or (first is not None and first <= 1):
            out.append([log])
        else:
            out[-1].append(log)
    return out


def _merged(stage: str, stage_logs: list) -> logs.StageHistory:
    return logs.merge_history(logs.StageRuns(stage, list(stage_logs)))


def _load(path: Path, skipped: list) -> tuple[bundle.Bundle, dict[str, logs.StageRuns]]:
    b = bundle.discover([path])
    runs = logs.decode_stages(b, summary=False) if b.wandb_files else {}  # not read here
    skipped += b.skipped
    return b, runs


def collect(current: Path, baselines: list[Path], skipped: list,
            current_runs: dict[str, logs.StageRuns] | None = None) -> list[StagePair]:
    """Pair each stage of the current input with its baselines. Pass
    `current_runs` when the current logs are already decoded (diagnose)."""
    if current_runs is None:
        cur_bundle, cur_runs = _load(current, skipped)
    else:
        cur_bundle, cur_runs = bundle.discover([current]), current_runs
    pairs = []
    if baselines:
        base_runs = [_load(b, skipped) for b in baselines]
        for stage, runs in cur_runs.items():
            attempts = _attempts(runs)
            cur = Side("current", _merged(stage, attempts[-1]), cur_bundle)
            bases = [Side(f"baseline {i + 1}", _merged(stage, br[stage].logs), bb)
                     for i, (bb, br) in enumerate(base_runs) if stage in br]
            pair = StagePair(stage, cur, bases)
            if len(attempts) > 1:
                pair.notes.append(f"{len(attempts)} attempts of {stage} in the current input; "
                                  "the newest is compared")
            if not bases:
                pair.notes.append(f"no baseline has {stage}")
            pairs.append(pair)
        return pairs
    for stage, runs in cur_runs.items():
        attempts = _attempts(runs)
        if len(attempts) < 2:
            pairs.append(StagePair(stage, Side("current", _merged(stage, attempts[-1]), cur_bundle), [],
                                   [f"only one run of {stage} here and no --baseline given"]))
            continue
        bases = [Side(f"earlier run {i + 1}", _merged(stage, a), cur_bundle)
                 for i, a in enumerate(attempts[:-1])]
        pairs.append(StagePair(stage, Side("current", _merged(stage, attempts[-1]), cur_bundle), bases,
                               [f"newest {stage} run compared with the {len(bases)} before it"]))
    return pairs


# --- loss drift ------------------------------------------------------------------------

def _loss_key(frames: list[pd.DataFrame]) -> str | None:
    return next((k for k in stats.LOSS_KEYS if all(k in f.columns for f in frames)), None)


def _series(frame: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """stats' (steps, values) where `key` was logged, finite values only."""
    steps, vals = stats.series(frame, key)
    steps = pd.to_numeric(pd.Series(steps), errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(steps) & np.isfinite(vals)
    return steps[ok], vals[ok]


def _window_stat(steps: np.ndarray, vals: np.ndarray, edges: np.ndarray, how: str = "median"):
    """Per-window statistic and count (NaN where a window is empty)."""
    idx = np.digitize(steps, edges[1:-1])
    inside = (steps >= edges[0]) & (steps <= edges[-1])
    s = pd.Series(vals[inside]).groupby(idx[inside])
    stat = getattr(s, how)().reindex(range(len(edges) - 1))
    count = s.size().reindex(range(len(edges) - 1)).fillna(0)
    return stat.to_numpy(dtype=float), count.to_numpy(dtype=float)


def _noise(vals_log: np.ndarray) -> float:
    """Step-to-step noise of log loss: MAD of residuals around a rolling median."""
    if len(vals_log) < 20:
        return float("nan")
    med = pd.Series(vals_log).rolling(51, center=True, min_periods=5).median().to_numpy()
    return float(1.4826 * np.nanmedian(np.abs(vals_log - med)))


def loss_drift(pair: StagePair, t: dict) -> dict | None:
    frames = [pair.current.frame] + [b.frame for b in pair.baselines]
    key = _loss_key(frames)
    if key is None or not pair.baselines:
        return None
    series = []
    for f in frames:
        s, v = _series(f, key)
        ok = v > 0
        series.append((s[ok], np.log(v[ok])))
    if any(len(s) < t["min_rows_per_window"] for s, _ in series):
        return None
    lo = max(s.min() for s, _ in series)
    hi = min(s.max() for s, _ in series)
    common = int(((series[0][0] >= lo) & (series[0][0] <= hi)).sum())
    n = int(np.clip(common // t["min_rows_per_window"], 3, t["max_windows"]))
    edges = np.linspace(lo, hi, n + 1)
    cur, cur_n = _window_stat(*series[0], edges)
    per_base = [_window_stat(s, v, edges) for s, v in series[1:]]  # (medians, counts) each
    base = np.array([m for m, _ in per_base])
    base_n = np.array([n for _, n in per_base])
    centre = np.nanmedian(base, axis=0)
    spread = 1.4826 * np.nanmedian(np.abs(base - centre), axis=0) if len(base) > 1 else np.zeros(n)
    sigma = np.nanmedian([_noise(v) for _, v in series[1:]])
    # standard error of a window median, for the current and the baseline centre
    se = 1.2533 * sigma * np.sqrt(1 / np.maximum(cur_n, 1) + 1 / np.maximum(base_n.min(axis=0), 1))
    half = np.maximum(t["envelope_k"] * np.sqrt(spread ** 2 + se ** 2), np.log1p(t["min_band"]))
    dev = cur - centre
    above = np.nan_to_num(dev > half)
    onset_i = _onset(above, t)
    late = slice(int(n * (1 - t["late_fraction"])), n)
    ratio = np.exp(dev)
    return {
        "loss_key": key, "common_steps": [int(lo), int(hi)], "windows": n,
        "edges": edges, "current": cur, "centre": centre, "half": half, "base": base,
        "onset_step": None if onset_i is None else int(edges[onset_i]),
        "onset_ratio": None if onset_i is None else _r(ratio[onset_i]),
        "late_ratio": _r(np.nanmedian(ratio[late])),
        "windows_above": int(above.sum()), "windows_below": int(np.nan_to_num(dev < -half).sum()),
        "noise_sigma_log": _r(sigma),
        "ratio_by_window": [{"step_from": int(edges[i]), "step_to": int(edges[i + 1]),
                             "ratio": _r(ratio[i])} for i in _sample(n, t["windows_shown"])],
    }


def _onset(above: np.ndarray, t: dict) -> int | None:
    """First window that is out and from which the run stays out (share of
    the remaining windows >= stay_share)."""
    if above.sum() < t["min_out_windows"]:
        return None
    rest_share = np.cumsum(above[::-1])[::-1] / np.arange(len(above), 0, -1)
    for i in np.flatnonzero(above):
        if rest_share[i] >= t["stay_share"] and len(above) - i >= t["min_out_windows"]:
            return int(i)
    return None


def _sample(n: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))})


def _r(x, digits: int = 4):
    return None if x is None or not np.isfinite(x) else float(round(float(x), digits))


# --- actions, throughput, config, checkpoints --------------------------------------------

def action_drift(pair: StagePair, t: dict) -> dict | None:
    out = {}
    for key in ("unique_actions", "action_entropy"):
        if key not in pair.current.frame.columns or not any(key in b.frame.columns for b in pair.baselines):
            continue
        cs, cv = _series(pair.current.frame, key)
        bases = [_series(b.frame, key) for b in pair.baselines if key in b.frame.columns]
        if len(cv) < 5 or any(len(v) < 5 for _, v in bases):
            continue
        lo = max([cs.min()] + [s.min() for s, _ in bases])
        hi = min([cs.max()] + [s.max() for s, _ in bases])
        edges = np.linspace(lo, hi, t["action_windows"] + 1)
        cur = _window_stat(cs, cv, edges, "mean")[0]
        base = np.nanmedian([_window_stat(s, v, edges, "mean")[0] for s, v in bases], axis=0)
        late = slice(int(len(cur) * (1 - t["late_fraction"])), len(cur))
        below = np.nan_to_num(cur < t["action_drop_ratio"] * base)
        onset = _onset(below, {**t, "min_out_windows": 2})
        out[key] = {"current_late_mean": _r(np.nanmean(cur[late])),
                    "baseline_late_mean": _r(np.nanmean(base[late])),
                    "late_ratio": _r(np.nanmean(cur[late]) / max(np.nanmean(base[late]), 1e-9)),
                    "onset_step": None if onset is None else int(edges[onset])}
    return out or None


def throughput(side: Side, lo: float, hi: float) -> float | None:
    """Steps per second over [lo, hi], from `_timestamp` (wall clock per row),
    else `_runtime`."""
    f = side.frame
    for key in ("_timestamp", "_runtime"):
        if key in f.columns:
            s, tt = _series(f, key)
            ok = (s >= lo) & (s <= hi)
            s, tt = s[ok], tt[ok]
            if len(s) >= 2 and tt[-1] > tt[0]:
                return float((s[-1] - s[0]) / (tt[-1] - tt[0]))
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not ("value" in v and len(v) <= 2):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(cur: dict, base: dict, t: dict) -> list[dict]:
    """Keys that differ, the ones known to move training first."""
    a, b = _flat(cur), _flat(base)
    ignore = set(t["ignore_config"])
    keys = [k for k in sorted(set(a) | set(b))
            if k.split(".")[0] not in ignore and not k.startswith("_") and a.get(k) != b.get(k)]
    rank = {k: i for i, k in enumerate(t["key_config"])}
    keys.sort(key=lambda k: (rank.get(k.split(".")[0], len(rank)), k))
    return [{"key": k, "current": a.get(k), "baseline": b.get(k),
             "known_to_move_training": k.split(".")[0] in rank} for k in keys]


def checkpoint_sizes(side: Side, stage: str) -> dict | None:
    art = side.bundle.stages.get(stage) if side.bundle else None
    if art is None or not art.checkpoints:
        return None
    sizes = []
    for ref in art.checkpoints:
        f = ref.path / "model_state_dict.pt" if safefs.is_dir(ref.path) else ref.path
        size = safefs.size_of(f)
        if size is not None:
            sizes.append(size)
    return {"count": len(art.checkpoints), "model_bytes_median": int(np.median(sizes)) if sizes else None}


def comparability(cur: dict, base: dict, t: dict) -> list[str]:
    """Why a baseline cannot be compared with the current run: the settings
    that change what the loss, throughput and checkpoint sizes mean."""
    out = []
    for key in t["comparable_keys"]:
        a, b = cur.get(key), base.get(key)
        if a is not None and b is not None and a != b:
            out.append(f"{key} {b} -> {a}")
    codes = [(c.get("num_bins"), c.get("latent_dim")) for c in (cur, base)]
    if all(x is not None for pair in codes for x in pair):
        try:
            n = [int(bins) ** int(dim) for bins, dim in codes]
            if n[0] != n[1]:
                out.append(f"codes {n[1]} -> {n[0]}")
        except (TypeError, ValueError, OverflowError):
            pass
    return out


# --- one stage ------------------------------------------------------------------------------

def compare_stage(pair: StagePair, t: dict) -> tuple[dict, list[Finding], dict | None]:
    """Everything compared for one stage: (JSON body, findings, drift arrays
    for the overlay plot)."""
    out: dict = {"current": pair.current.paths, "baselines": [b.paths for b in pair.baselines],
                 "notes": list(pair.notes)}
    if not pair.baselines:
        return out, [], None
    ctx = _Ctx(pair, t, out, [], pair.current.paths[-1])
    diff = config_diff(pair.current.history.config, pair.baselines[0].history.config, t)
    out["config_diff"] = diff[:t["config_keys_shown"]]
    why = comparability(pair.current.history.config, pair.baselines[0].history.config, t)
    out["comparable"] = not why
    if why:
        out["incomparable"] = why
        out["notes"].append("the baseline was trained with another configuration (" + "; ".join(why)
                            + "): only the config diff is given; no drift, action, throughput or "
                              "checkpoint-size findings")
        ctx.add("baseline_not_comparable", "info", "config", why[0], "same model dims, data, batch, "
                "n_actions and codes", [], "baseline not comparable: " + "; ".join(why))
        return out, ctx.findings, None
    drift = _drift_part(ctx, diff)
    _actions_part(ctx)
    _throughput_part(ctx, drift["common_steps"] if drift else (0, float("inf")))
    _checkpoints_part(ctx)
    if diff:
        ctx.add("config_changed", "info", diff[0]["key"], diff[0]["current"], diff[0]["baseline"], [],
                f"{len(diff)} config keys differ from the baseline; first "
                f"{diff[0]['key']}: {diff[0]['baseline']} -> {diff[0]['current']}")
    return out, ctx.findings, drift


@dataclass
class _Ctx:
    """What the parts of one stage's comparison share."""

    pair: StagePair
    t: dict
    out: dict
    findings: list
    evidence: str

    def add(self, rule_id, severity, metric, value, threshold, steps, message, evidence=None):
        self.findings.append(Finding(rule_id, severity, self.pair.stage, metric, value, threshold,
                                     steps, evidence or self.evidence, message))


def _drift_part(ctx: _Ctx, diff: list[dict]) -> dict | None:
    pair, t = ctx.pair, ctx.t
    drift = loss_drift(pair, t)
    if not drift:
        return None
    lo, hi = drift["common_steps"]
    cur_lo, cur_hi = _span(pair.current.frame)
    b_hi = max(_span(b.frame)[1] for b in pair.baselines)
    if cur_hi < b_hi or cur_lo > lo:
        ctx.out["notes"].append(f"compared over the common steps {lo}–{hi} only (current run ends at "
                                f"{cur_hi}, baseline at {b_hi}; a run still in progress is shorter)")
    ctx.out["drift"] = {k: v for k, v in drift.items() if k not in ("edges", "current", "centre", "half", "base")}
    if drift["onset_step"] is not None:
        top = next((d["key"] for d in diff if d["known_to_move_training"]), None)
        sev = "critical" if (drift["late_ratio"] or 0) >= t["drift_critical_ratio"] else "watch"
        ctx.add("drift_from_baseline", sev, drift["loss_key"], drift["late_ratio"], t["drift_critical_ratio"],
                [drift["onset_step"]],
                f"{drift['loss_key']} leaves the baseline envelope at step {drift['onset_step']} "
                f"and stays out: {drift['onset_ratio']}x the baseline there, {drift['late_ratio']}x "
                f"late" + (f"; first changed setting: {top}" if top else ""))
    return drift


def _actions_part(ctx: _Ctx) -> None:
    acts = action_drift(ctx.pair, ctx.t)
    if not acts:
        return
    ctx.out["actions"] = acts
    key = "unique_actions" if "unique_actions" in acts else "action_entropy"
    a = acts[key]
    if a["late_ratio"] is None or a["late_ratio"] >= ctx.t["action_drop_ratio"]:
        return
    onset = a["onset_step"]
    ctx.add("action_diversity_drop", ctx.t["severity"]["action_diversity_drop"], key, a["late_ratio"],
            ctx.t["action_drop_ratio"], [onset] if onset is not None else [],
            f"late {key} is {a['late_ratio']}x the baseline ({a['current_late_mean']} vs "
            f"{a['baseline_late_mean']})" + (f", from step {onset}" if onset is not None else ""))


def _throughput_part(ctx: _Ctx, common: tuple) -> None:
    lo, hi = common
    cur = throughput(ctx.pair.current, lo, hi)
    base = [x for x in (throughput(b, lo, hi) for b in ctx.pair.baselines) if x]
    if not cur or not base:
        return
    ref = float(np.median(base))
    ratio = cur / ref
    ctx.out["throughput"] = {"current_steps_per_s": _r(cur), "baseline_steps_per_s": _r(ref),
                             "ratio": _r(ratio)}
    if ratio < ctx.t["throughput_ratio"]:
        ctx.add("throughput_regression", ctx.t["severity"]["throughput_regression"], "steps_per_s",
                _r(ratio), ctx.t["throughput_ratio"], [],
                f"{_r(cur, 3)} steps/s vs {_r(ref, 3)} for the baseline ({_r(ratio, 3)}x)")


def _checkpoints_part(ctx: _Ctx) -> None:
    pair = ctx.pair
    cc, cb = checkpoint_sizes(pair.current, pair.stage), checkpoint_sizes(pair.baselines[0], pair.stage)
    if not (cc and cb):
        return
    ctx.out["checkpoints"] = {"current": cc, "baseline": cb}
    if not (cc["model_bytes_median"] and cb["model_bytes_median"]):
        return
    r = cc["model_bytes_median"] / cb["model_bytes_median"]
    ctx.out["checkpoints"]["size_ratio"] = _r(r, 6)
    if r < ctx.t["ckpt_size_ratio"]:
        ctx.add("checkpoint_size_drop", "watch", "model_state_dict.pt bytes", _r(r, 6),
                ctx.t["ckpt_size_ratio"], [],
                f"current model checkpoints are {_r(r, 6)}x the baseline's size "
                f"({cc['model_bytes_median']} vs {cb['model_bytes_median']} bytes)",
                evidence=str(pair.current.bundle.stages[pair.stage].checkpoints_dir))


def _span(frame: pd.DataFrame) -> tuple[int, int]:
    s = pd.to_numeric(frame["_step"], errors="coerce")
    return int(s.min()), int(s.max())


# --- pictures -----------------------------------------------------------------------------

def overlay_figure(stage: str, drift: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = drift["edges"]
    mid = (e[:-1] + e[1:]) / 2
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    for i, b in enumerate(drift["base"]):
        ax.plot(mid, np.exp(b), color="gray", lw=0.8, alpha=0.6, label="baseline" if i == 0 else None)
    ax.fill_between(mid, np.exp(drift["centre"] - drift["half"]), np.exp(drift["centre"] + drift["half"]),
                    color="tab:green", alpha=0.2, label="baseline envelope")
    ax.plot(mid, np.exp(drift["current"]), color="tab:red", lw=1.6, label="current")
    if drift["onset_step"] is not None:
        ax.axvline(drift["onset_step"], color="black", ls="--", lw=1,
                   label=f"onset step {drift['onset_step']}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{drift['loss_key']} (window median)")
    ax.set_title(f"{stage}: current vs baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def side_by_side_sheet(pairs: list[StagePair], thresholds: dict, count: int):
    """Rows `current <stage>` and `baseline <stage>` with the same steps."""
    t = thresholds["visuals"]
    rows = []
    for pair in pairs:
        if not pair.baselines or pair.current.bundle is None or pair.baselines[0].bundle is None:
            continue
        if not ((pair.current.bundle.stages.get(pair.stage) and pair.baselines[0].bundle.stages.get(pair.stage))):
            continue
        cur = pair.current.bundle.stages[pair.stage].images
        base = pair.baselines[0].bundle.stages[pair.stage].images
        if not cur or not base:
            continue
        base_by_step = {i.step: i for i in base}
        common = [i for i in cur if i.step in base_by_step]
        picks = [common[k] for k in visuals.sheet_steps(len(common), count)] if common else []
        if not picks:
            continue
        rows.append((f"current {pair.stage}", [visuals.analyse_image(i, t, keep_thumb=True) for i in picks], {}))
        rows.append((f"baseline {pair.stage}",
                     [visuals.analyse_image(base_by_step[i.step], t, keep_thumb=True) for i in picks], {}))
    return visuals.contact_sheet(rows, t)


# --- whole comparison ------------------------------------------------------------------------

def compare(current: Path, baselines: list[Path], thresholds: dict, count: int = 4,
            current_runs: dict[str, logs.StageRuns] | None = None) -> dict:
    """{"doc": JSON-ready, "findings": {stage: [Finding]}, "figures": {name: fig}, "sheet": image}."""
    t = thresholds["compare"]
    skipped: list = []
    pairs = collect(current, baselines, skipped, current_runs)
    doc = {"current": str(current), "baselines": [str(b) for b in baselines], "stages": {},
           "skipped": skipped}
    findings, figures = {}, {}
    order = {s: i for i, s in enumerate(bundle.STAGES)}
    pairs.sort(key=lambda p: order.get(p.stage, len(order)))
    for pair in pairs:
        body, fs, drift = compare_stage(pair, t)
        body["verdict"] = stage_verdict(fs, enough_data=bool(pair.baselines))
        body["findings"] = findings_dicts(fs)
        doc["stages"][pair.stage] = body
        findings[pair.stage] = fs
        if drift:
            figures[f"overlay_{pair.stage}.png"] = overlay_figure(pair.stage, drift)
    return {"doc": doc, "findings": findings, "figures": figures,
            "sheet": side_by_side_sheet(pairs, thresholds, count)}
