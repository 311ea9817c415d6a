"""Numeric diagnostics per stage: summaries of the loss curve, actions,
learning rate, throughput and liveness, and the findings they imply.

Every number a finding quotes is in the stage's metrics dict too, so a report
can cite it. All thresholds come from the YAML (see rules.load_thresholds).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .rules import Finding, stage_verdict

LOSS_KEYS = ("train/loss", "loss", "train_loss")
LR_KEYS = ("learning_rate/group_0", "train/learning_rate", "learning_rate", "lr")
CODEBOOK_KEYS = {"video_tokenizer": "train/codebook_usage",
                 "latent_actions": "latent_actions/codebook_usage"}


def _first_key(frame: pd.DataFrame, keys) -> str | None:
    return next((k for k in keys if k in frame.columns), None)


def _series(frame: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) where `key` was logged (missing rows dropped)."""
    col = pd.to_numeric(frame[key], errors="coerce").to_numpy(dtype=float)
    steps = frame["_step"].to_numpy()
    keep = ~np.isnan(col)
    return steps[keep], col[keep]


def _r(x, nd: int = 6):
    """Round for JSON; None for missing."""
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return x
    if math.isnan(xf) or math.isinf(xf):
        return None
    return float(f"{xf:.{nd}g}")


class StageAnalysis:
    """Analyse one stage's merged history. Call .run() -> (metrics, findings)."""

    def __init__(self, stage: str, frame: pd.DataFrame, non_finite: dict, config: dict,
                 thresholds: dict, evidence: str | None, meta: dict | None = None,
                 file_mtime: float | None = None, now: float | None = None) -> None:
        self.stage, self.frame, self.non_finite = stage, frame, non_finite
        self.config, self.t, self.evidence = config or {}, thresholds, evidence
        self.meta, self.file_mtime = meta or {}, file_mtime
        self.now = now if now is not None else time.time()
        self.findings: list[Finding] = []
        self.metrics: dict = {}

    def add(self, rule_id, severity, metric, value, threshold, steps=(), message="") -> None:
        self.findings.append(Finding(rule_id, severity, self.stage, metric, value, threshold,
                                     list(steps), self.evidence, message))

    # --- orchestration --------------------------------------------------------
    def run(self) -> tuple[dict, list[Finding]]:
        f = self.frame
        m = self.metrics
        m["rows"] = int(len(f))
        m.update(self._progress())
        loss_key = _first_key(f, LOSS_KEYS)
        m["loss_key"] = loss_key
        enough = False
        if loss_key:
            steps, loss = _series(f, loss_key)
            m["non_finite"] = self._non_finite(loss_key)
            finite = np.isfinite(loss)
            steps_f, loss_f = steps[finite], loss[finite]
            enough = len(loss_f) >= self.t["data"]["min_rows"]
            if len(loss_f):
                m["loss"] = self._loss_summary(steps_f, loss_f)
                m["spikes"] = self._spikes(steps_f, loss_f) if enough else None
                if enough:
                    self._loss_rules(steps_f, loss_f)
                self._stage_scale(steps_f, loss_f, enough)
        else:
            self.add("no_loss_metric", "watch", None, None, list(LOSS_KEYS),
                     message="no train/loss column in the history; cannot judge the curve")
        if not enough:
            self.add("insufficient_data", "info", loss_key, m["rows"],
                     self.t["data"]["min_rows"],
                     message=f"only {m['rows']} rows (< {self.t['data']['min_rows']}): too early to judge")
        m["learning_rate"] = self._learning_rate()
        m["codebook"] = self._codebook()
        m["actions"] = self._actions()
        m["correlations"] = self._correlations(loss_key)
        m["throughput"] = self._throughput()
        m["liveness"] = self._liveness()
        m["verdict"] = stage_verdict(self.findings, enough)
        return m, self.findings

    # --- pieces ---------------------------------------------------------------
    def _progress(self) -> dict:
        steps = self.frame["_step"].to_numpy() if len(self.frame) else np.array([], int)
        if not len(steps):
            return {"step_min": None, "step_max": None}
        diffs = np.diff(steps)
        n_updates = self.config.get("n_updates")
        out = {"step_min": int(steps.min()), "step_max": int(steps.max()),
               "step_gaps": int((diffs > 1).sum()), "duplicate_steps": int((diffs == 0).sum()),
               "step_resets": int((diffs < 0).sum()),
               "largest_gap": int(diffs.max()) if len(diffs) else 0,
               "n_updates": n_updates}
        if isinstance(n_updates, (int, float)) and n_updates > 0:
            out["progress_fraction"] = _r((steps.max() + 1) / n_updates, 4)
        return out

    def _non_finite(self, key: str) -> dict:
        nf = self.non_finite.get(key)
        if not nf or not nf["rows"]:
            return {"count": 0, "first_step": None}
        steps = self.frame["_step"].to_numpy()[nf["rows"]]
        first = int(steps.min())
        self.add("non_finite_loss", "critical", key, len(nf["rows"]), 0, steps[:20],
                 f"{key} is non-finite ({nf['values'][0]}) from step {first}, "
                 f"{len(nf['rows'])} values in all: training has diverged numerically")
        return {"count": len(nf["rows"]), "first_step": first, "first_value": nf["values"][0]}

    def _loss_summary(self, steps: np.ndarray, loss: np.ndarray) -> dict:
        n = len(loss)
        d = self.t["data"]
        edge = max(1, int(n * d["edge_fraction"]))
        thirds = np.array_split(loss, 3)
        windows = []
        for s, v in zip(np.array_split(steps, d["n_windows"]), np.array_split(loss, d["n_windows"])):
            if len(v):
                windows.append({"step_from": int(s[0]), "step_to": int(s[-1]), "mean": _r(v.mean())})
        imin = int(loss.argmin())
        out = {
            "first": _r(loss[0]), "first_step": int(steps[0]),
            "final": _r(loss[-1]), "final_step": int(steps[-1]),
            "min": _r(loss.min()), "min_step": int(steps[imin]),
            "median": _r(np.median(loss)), "max": _r(loss.max()),
            "max_step": int(steps[int(loss.argmax())]),
            "early_mean": _r(thirds[0].mean()) if len(thirds[0]) else None,
            "mid_mean": _r(thirds[1].mean()) if len(thirds[1]) else None,
            "late_mean": _r(thirds[2].mean()) if len(thirds[2]) else None,
            "first10_mean": _r(loss[:edge].mean()), "last10_mean": _r(loss[-edge:].mean()),
            "delta_last10_first10": _r(loss[-edge:].mean() - loss[:edge].mean()),
            "windows": windows,
            "late_trend": self._trend(steps, loss),
        }
        return out

    def _trend(self, steps: np.ndarray, loss: np.ndarray) -> dict | None:
        """Slope of log loss per 1k steps over the late window, fitted on bin
        medians (robust to spikes), with its standard error."""
        d = self.t["data"]
        n = len(loss)
        start = int(n * (1 - d["late_fraction"]))
        s, v = steps[start:], loss[start:]
        pos = v > 0
        s, v = s[pos], v[pos]
        if len(v) < 8:
            return None
        bins = min(d["trend_bins"], len(v) // 2)
        xs = np.array([np.median(b) for b in np.array_split(s, bins)], dtype=float)
        ys = np.array([np.median(b) for b in np.array_split(np.log(v), bins)])
        x = (xs - xs.mean()) / 1000.0
        sxx = float((x ** 2).sum())
        if sxx == 0:
            return None
        slope = float((x * (ys - ys.mean())).sum() / sxx)
        resid = ys - ys.mean() - slope * x
        se = math.sqrt(float((resid ** 2).sum()) / max(1, bins - 2) / sxx)
        sigma = d["trend_sigma"]
        direction = "rising" if slope > sigma * se else "falling" if slope < -sigma * se else "flat"
        return {"slope_log_per_1k_steps": _r(slope), "stderr": _r(se), "direction": direction,
                "step_from": int(s[0]), "step_to": int(s[-1]), "bins": bins}

    def _spikes(self, steps: np.ndarray, loss: np.ndarray) -> dict:
        sp = self.t["spikes"]
        logl = pd.Series(np.log(np.clip(loss, 1e-12, None)))
        med = logl.rolling(sp["window"], center=True, min_periods=5).median()
        # Noise scale: MAD of the residuals per block of 20 windows (a rolling
        # MAD would cost a second rolling median for nearly the same number).
        resid = (logl - med).to_numpy()
        block = 20 * sp["window"]
        mad = np.repeat(_block_medians(np.abs(np.nan_to_num(resid)), block), block)[:len(resid)]
        z = resid / (1.4826 * np.clip(mad, 1e-3, None))
        # A spike must also be big in absolute terms: on a very smooth curve the
        # MAD is tiny and a 2% bump would otherwise score z > 8.
        big = np.nan_to_num(resid) > np.log(sp["min_ratio"])
        # The first half window has only later (lower) rows in its centred
        # median: during the initial descent every row would look like a spike.
        big[:sp["window"] // 2] = False
        idx = np.flatnonzero((np.nan_to_num(z) > sp["z"]) & big)
        # Merge consecutive rows into one spike event.
        events = []
        for i in idx:
            if events and i - events[-1][-1] <= 2:
                events[-1].append(i)
            else:
                events.append([i])
        out, unrecovered = [], []
        lin_med = np.exp(med.to_numpy())
        for ev in events:
            i0, i1 = ev[0], ev[-1]
            before = lin_med[i0] if not np.isnan(lin_med[i0]) else loss[max(0, i0 - 1)]
            after = loss[i1 + 1:i1 + 1 + sp["recover_rows"]]
            recovered = bool(len(after) and np.median(after) <= before * sp["recover_tolerance"])
            out.append({"step": int(steps[i0]), "value": _r(loss[i0:i1 + 1].max()),
                        "baseline": _r(before), "recovered": recovered})
            if not recovered:
                unrecovered.append(int(steps[i0]))
        per_10k = len(events) / max(1, len(loss)) * 10000
        if unrecovered:
            self.add("loss_spike_unrecovered", "watch", "train/loss", len(unrecovered), sp["z"],
                     unrecovered, f"{len(unrecovered)} loss spike(s) did not come back within "
                     f"{sp['recover_rows']} rows (first at step {unrecovered[0]})")
        elif events:
            self.add("loss_spike_recovered", "info", "train/loss", len(events), sp["z"],
                     [e["step"] for e in out], f"{len(events)} loss spike(s), all recovered")
        if per_10k > sp["many_per_10k_rows"] and len(events) >= sp["many_min_count"]:
            self.add("loss_spikes_frequent", "watch", "train/loss", _r(per_10k, 3),
                     sp["many_per_10k_rows"], [e["step"] for e in out],
                     f"{_r(per_10k, 3)} spikes per 10k rows: unstable optimisation")
        return {"count": len(events), "unrecovered": len(unrecovered), "per_10k_rows": _r(per_10k, 3),
                "events": out[:20]}

    def _loss_rules(self, steps: np.ndarray, loss: np.ndarray) -> None:
        m = self.metrics["loss"]
        lt = self.t["loss"]
        windows = [w["mean"] for w in m["windows"] if w["mean"] is not None]
        late = windows[-1]
        trend = m["late_trend"] or {}
        # Best level reached: the lowest rolling median (robust to single lows).
        best = float(np.min(_block_medians(loss, max(5, len(loss) // 50))))
        m["best_level"] = _r(best)
        ratio = late / best if best > 0 else None
        m["late_over_best"] = _r(ratio, 4)
        rising = trend.get("direction") == "rising" or (len(windows) >= 3 and all(
            b >= a for a, b in zip(windows[-3:], windows[-2:])))
        wsteps = [w["step_from"] for w in m["windows"]]
        if ratio and ratio >= lt["rise_critical_ratio"] and rising:
            self.add("loss_divergence", "critical", "train/loss", _r(ratio, 4), lt["rise_critical_ratio"],
                     wsteps, f"loss is rising: window means {', '.join(str(w) for w in windows)}; "
                     f"late window is {_r(ratio, 3)}x the best level reached ({_r(best)}); "
                     f"from {m['first']} at step {m['first_step']} (min {m['min']} at step "
                     f"{m['min_step']}) to {m['final']} at step {m['final_step']}")
        elif ratio and ratio >= lt["rise_watch_ratio"]:
            self.add("loss_rising", "watch", "train/loss", _r(ratio, 4), lt["rise_watch_ratio"],
                     wsteps, f"late window mean {late} is {_r(ratio, 3)}x the best level reached ({_r(best)})")
        first10, last10 = m["first10_mean"], m["last10_mean"]
        if first10 and last10 is not None and last10 / first10 > lt["no_progress_ratio"] \
                and not (ratio and ratio >= lt["rise_watch_ratio"]):
            self.add("loss_no_progress", "watch", "train/loss", _r(last10 / first10, 4),
                     lt["no_progress_ratio"], [m["first_step"], m["final_step"]],
                     f"last-10% mean {last10} vs first-10% mean {first10}: no real progress")

    def _stage_scale(self, steps: np.ndarray, loss: np.ndarray, enough: bool) -> None:
        m = self.metrics
        late = m["loss"]["late_mean"]
        st = self.t["stages"].get(self.stage, {})
        if self.stage == "dynamics":
            codes = self._codes()
            chance = math.log(codes)
            frac = late / chance if late is not None else None
            m["scale"] = {"codes": codes, "chance_nats": _r(chance), "late_fraction_of_chance": _r(frac, 4),
                          "final_fraction_of_chance": _r(m["loss"]["final"] / chance, 4)}
            if enough and frac is not None:
                sev = "critical" if frac >= st["chance_critical"] else \
                    "watch" if frac >= st["chance_watch"] else None
                if sev:
                    thr = st["chance_critical"] if sev == "critical" else st["chance_watch"]
                    self.add("dynamics_near_chance", sev, "train/loss", _r(frac, 4), thr,
                             [m["loss"]["final_step"]],
                             f"late mean loss {late} is {_r(frac * 100, 3)}% of chance "
                             f"ln({codes}) = {_r(chance, 4)}: the model predicts little better than uniform")
        elif self.stage == "latent_actions":
            m["scale"] = {"variance_penalty_regime": bool(late is not None and late >= st["variance_penalty_watch"])}
            if enough and late is not None:
                sev = "critical" if late >= st["variance_penalty_critical"] else \
                    "watch" if late >= st["variance_penalty_watch"] else None
                if sev:
                    thr = st[f"variance_penalty_{sev}"]
                    self.add("lam_variance_penalty", sev, "train/loss", late, thr,
                             [m["loss"]["final_step"]],
                             f"late mean loss {late} is at the variance-penalty level (>= {thr}): "
                             "the encoder variance has collapsed")

    def _codes(self) -> int:
        c = self.config
        try:
            return int(c["num_bins"]) ** int(c["latent_dim"])
        except (KeyError, TypeError, ValueError):
            return int(self.t["stages"]["dynamics"]["default_codes"])

    def _learning_rate(self) -> dict | None:
        key = _first_key(self.frame, LR_KEYS)
        if not key:
            return None
        steps, lr = _series(self.frame, key)
        if not len(lr):
            return None
        cur, peak = float(lr[-1]), float(lr.max())
        frac = cur / peak if peak > 0 else None
        lt = self.t["lr"]
        phase = "warmup" if steps[-1] <= steps[int(lr.argmax())] else \
            "floor" if frac is not None and frac <= lt["floor_fraction"] * 1.5 else "decay"
        base = self.config.get("learning_rate")
        return {"key": key, "current": _r(cur), "max": _r(peak), "max_step": int(steps[int(lr.argmax())]),
                "current_over_max": _r(frac, 4), "phase": phase, "config_learning_rate": base}

    def _codebook(self) -> dict | None:
        key = CODEBOOK_KEYS.get(self.stage)
        if not key or key not in self.frame.columns:
            return None
        steps, v = _series(self.frame, key)
        if not len(v):
            return None
        thirds = _phases(v)
        out = {"key": key, "points": len(v), "first": _r(v[0]), "final": _r(v[-1]), "max": _r(v.max()),
               "early_mean": _r(thirds[0].mean()), "late_mean": _r(thirds[-1].mean()),
               "note": "batch-level usage: biased low by batch size"}
        drop = self.t["stages"].get(self.stage, {}).get("codebook_drop_watch")
        if self.stage == "video_tokenizer" and drop and len(v) >= self.t["data"]["min_action_points"] \
                and thirds[-1].mean() < drop * v.max():
            self.add("codebook_usage_drop", "watch", key, _r(thirds[-1].mean()), _r(drop * v.max()),
                     [int(steps[int(v.argmax())]), int(steps[-1])],
                     f"codebook usage fell from {_r(v.max())} to a late mean of {_r(thirds[-1].mean())}")
        return out

    def _actions(self) -> dict | None:
        f = self.frame
        if "unique_actions" not in f.columns and "action_entropy" not in f.columns:
            return None
        n_actions = self.config.get("n_actions")
        out: dict = {"n_actions": n_actions}
        ustep, uniq = _series(f, "unique_actions") if "unique_actions" in f.columns else (np.array([]), np.array([]))
        estep, ent = _series(f, "action_entropy") if "action_entropy" in f.columns else (np.array([]), np.array([]))
        points = max(len(uniq), len(ent))
        out["points"] = points
        if len(uniq):
            late = uniq[int(len(uniq) * (1 - self.t["data"]["late_fraction"])):]
            out["unique_actions"] = {
                **_phase_summary(uniq),
                "single_action_share": _r((uniq == 1).mean(), 4),
                "late_single_action_share": _r((late == 1).mean(), 4) if len(late) else None}
        if len(ent):
            norm = math.log(n_actions) if isinstance(n_actions, (int, float)) and n_actions > 1 else None
            out["entropy"] = {
                **_phase_summary(ent), "max_possible": _r(norm),
                "late_normalized": _r(_phases(ent)[-1].mean() / norm, 4) if norm else None}
        if "latent_actions/encoder_variance" in f.columns:
            _, var = _series(f, "latent_actions/encoder_variance")
            if len(var):
                out["encoder_variance"] = {"first": _r(var[0]), "final": _r(var[-1]), "min": _r(var.min())}
        if points < self.t["data"]["min_action_points"]:
            out["judged"] = False
            self.add("action_stats_sparse", "info", "unique_actions", points,
                     self.t["data"]["min_action_points"],
                     message=f"only {points} action-stat points: too few to judge diversity")
            return out
        out["judged"] = True
        self._action_rules(out, ustep, estep)
        return out

    def _action_rules(self, out: dict, ustep, estep) -> None:
        a = self.t["actions"]
        u, e = out.get("unique_actions"), out.get("entropy")
        share = (u or {}).get("late_single_action_share")
        enorm = (e or {}).get("late_normalized")
        last = [int(ustep[-1])] if len(ustep) else [int(estep[-1])] if len(estep) else []
        if (share is not None and share >= a["single_share_critical"]) or \
                (enorm is not None and enorm < a["entropy_critical"]):
            self.add("action_collapse", "critical", "unique_actions", share, a["single_share_critical"], last,
                     f"latent actions collapsed: {_pct(share)} of late steps use one action, "
                     f"late entropy {(e or {}).get('late_mean')} ({_pct(enorm)} of ln(n_actions))")
            return
        reasons = []
        if share is not None and share >= a["single_share_watch"]:
            reasons.append(f"{_pct(share)} of late steps use a single action")
        if enorm is not None and enorm < a["entropy_watch"]:
            reasons.append(f"late entropy {e['late_mean']} is {_pct(enorm)} of ln({out['n_actions']}) = {e['max_possible']}")
        if u and u["late_mean"] is not None:
            best = max(u["early_mean"] or 0, u["mid_mean"] or 0)
            if best and u["late_mean"] / best < a["unique_drop_watch"]:
                reasons.append(f"unique_actions fell from a mean of {best} to {u['late_mean']}")
        if reasons and self.stage == "dynamics":
            # Dynamics logs the frozen action model's stats: its diversity is the
            # action model's property, reported there, not a dynamics problem.
            out["reading"] = "narrower than ideal (frozen action model): " + "; ".join(reasons)
        elif reasons:
            self.add("action_diversity_narrowing", "watch", "action_entropy", enorm,
                     a["entropy_watch"], last,
                     "action diversity is narrowing (not collapsed): " + "; ".join(reasons))

    def _correlations(self, loss_key: str | None) -> dict:
        if not loss_key:
            return {}
        out = {}
        f = self.frame
        loss = pd.to_numeric(f[loss_key], errors="coerce")
        for name, key in (("lr", _first_key(f, LR_KEYS)), ("action_entropy", "action_entropy"),
                          ("unique_actions", "unique_actions")):
            if key and key in f.columns:
                other = pd.to_numeric(f[key], errors="coerce")
                both = loss.notna() & other.notna() & np.isfinite(loss) & np.isfinite(other)
                if both.sum() >= 10 and other[both].std() > 0 and loss[both].std() > 0:
                    out[f"loss_vs_{name}"] = _r(np.corrcoef(loss[both], other[both])[0, 1], 4)
        strong = self.t["lr"]["corr_strong"]
        lr_c = out.get("loss_vs_lr")
        act = [abs(v) for k, v in out.items() if k.startswith("loss_vs_") and k != "loss_vs_lr" and v is not None]
        if lr_c is not None and lr_c >= strong and (not act or max(act) < strong):
            out["reading"] = (f"loss tracks the learning rate (corr {lr_c}), not the action model "
                              f"(|corr| <= {_r(max(act), 3) if act else 'n/a'})")
        return out

    def _throughput(self) -> dict | None:
        f = self.frame
        if "_runtime" not in f.columns or len(f) < 2:
            return None
        steps, rt = _series(f, "_runtime")
        if len(rt) < 2 or rt[-1] <= rt[0]:
            return None
        overall = (steps[-1] - steps[0]) / (rt[-1] - rt[0])
        k = max(2, len(rt) // 10)
        ds, dt = steps[-1] - steps[-k], rt[-1] - rt[-k]
        recent = ds / dt if dt > 0 else None
        out = {"steps_per_s_overall": _r(overall, 4), "steps_per_s_recent": _r(recent, 4),
               "runtime_s": _r(rt[-1], 6)}
        n_updates = self.config.get("n_updates")
        if isinstance(n_updates, (int, float)) and n_updates > steps[-1] + 1:
            left = n_updates - 1 - steps[-1]
            rates = [r for r in (recent, overall) if r]
            out["eta_hours"] = [_r(left / max(rates) / 3600, 4), _r(left / min(rates) / 3600, 4)]
        if recent and overall and recent < self.t["liveness"]["slowdown_ratio"] * overall:
            self.add("throughput_slowdown", "info", "_runtime", _r(recent, 4),
                     _r(self.t["liveness"]["slowdown_ratio"] * overall, 4), [int(steps[-k])],
                     f"recent {_r(recent, 3)} steps/s vs {_r(overall, 3)} overall")
        return out

    def _liveness(self) -> dict:
        f = self.frame
        status = self.meta.get("status")
        last_log = float(pd.to_numeric(f["_timestamp"], errors="coerce").max()) \
            if "_timestamp" in f.columns and len(f) else None
        out = {"status": status, "exit_code": self.meta.get("exit_code"),
               "last_history_time": _r(last_log, 12), "file_mtime": _r(self.file_mtime, 12),
               "now": _r(self.now, 12)}
        if self.file_mtime:
            out["seconds_since_file_write"] = _r(self.now - self.file_mtime, 6)
        if last_log and self.file_mtime:
            out["file_write_after_last_row_s"] = _r(self.file_mtime - last_log, 6)
        lv = self.t["liveness"]
        if status == "finished":
            if self.meta.get("exit_code"):
                self.add("run_exit_nonzero", "watch", None, self.meta.get("exit_code"), 0,
                         message=f"the run exited with code {self.meta.get('exit_code')}")
            return out
        quiet = out.get("seconds_since_file_write")
        if quiet is not None and quiet > lv["stale_seconds"]:
            out["state"] = "stalled_or_crashed"
            self.add("run_stalled", "watch", "file_mtime", _r(quiet / 60, 4),
                     lv["stale_seconds"] / 60,
                     [self.metrics.get("step_max") or 0],
                     f"no exit record and nothing written for {_r(quiet / 60, 3)} min "
                     f"(last step {self.metrics.get('step_max')}): the run crashed or hung")
        else:
            out["state"] = "live"
            lag = out.get("file_write_after_last_row_s")
            if lag is not None and lag > lv["history_lag_seconds"]:
                self.add("history_stalled", "watch", "_timestamp", _r(lag / 60, 4),
                         lv["history_lag_seconds"] / 60, [self.metrics.get("step_max") or 0],
                         f"the log file is still written but no history row for {_r(lag / 60, 3)} min")
        return out


def _phases(values: np.ndarray) -> list[np.ndarray]:
    """Early, mid and late thirds (fewer when there are under 3 values)."""
    return [p for p in np.array_split(values, 3) if len(p)]


def _phase_summary(values: np.ndarray) -> dict:
    parts = _phases(values)
    return {"min": _r(values.min()), "max": _r(values.max()), "final": _r(values[-1]),
            "early_mean": _r(parts[0].mean()), "mid_mean": _r(parts[len(parts) // 2].mean()),
            "late_mean": _r(parts[-1].mean())}


def _block_medians(values: np.ndarray, size: int) -> np.ndarray:
    """Medians of consecutive blocks of `size` values (the last may be short)."""
    n_full = len(values) // size * size
    out = list(np.median(values[:n_full].reshape(-1, size), axis=1)) if n_full else []
    if n_full < len(values):
        out.append(np.median(values[n_full:]))
    return np.asarray(out)


def _pct(x) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def analyse_stage(merged, thresholds: dict, now: float | None = None) -> tuple[dict, list[Finding]]:
    """Run the stage analysis on an export.StageHistory."""
    log = merged.latest
    mtime = Path(log.path).stat().st_mtime if Path(log.path).exists() else None
    meta = dict(log.meta)
    a = StageAnalysis(merged.stage, merged.frame, merged.non_finite, merged.config, thresholds,
                      log.path, meta, mtime, now)
    return a.run()


def analyse_paths(paths: list, explicit: dict, thresholds: dict, now: float | None = None):
    """Every stage found under `paths`: (document, histories). The document
    is what `stage_stats` prints; histories feed plots and details."""
    from . import export
    from .rules import findings_dicts, overall_of
    skipped: list = []
    histories = export.load_histories(paths, explicit, skipped)
    doc = {"stages": {}, "skipped": skipped}
    for stage, merged in histories.items():
        metrics, findings = analyse_stage(merged, thresholds, now)
        doc["stages"][stage] = {"verdict": metrics.pop("verdict"), "evidence_path": merged.latest.path,
                                "metrics": metrics, "findings": findings_dicts(findings)}
    doc["overall"] = overall_of(doc["stages"], thresholds)
    return doc, histories


def details_table(frame: pd.DataFrame, loss_key: str, n_windows: int = 100) -> pd.DataFrame:
    """Per-window table for --details: step range, loss stats, lr, actions."""
    cols = [c for c in (loss_key, *LR_KEYS, "unique_actions", "action_entropy", "_runtime")
            if c and c in frame.columns]
    num = frame[["_step", *cols]].apply(pd.to_numeric, errors="coerce")
    groups = np.array_split(np.arange(len(num)), min(n_windows, max(1, len(num))))
    rows = []
    for g in groups:
        if not len(g):
            continue
        part = num.iloc[g]
        row = {"step_from": int(part["_step"].iloc[0]), "step_to": int(part["_step"].iloc[-1]),
               "rows": len(part)}
        for c in cols:
            row[f"{c}_mean"] = part[c].mean()
        if loss_key in part:
            row[f"{loss_key}_min"] = part[loss_key].min()
            row[f"{loss_key}_max"] = part[loss_key].max()
        rows.append(row)
    return pd.DataFrame(rows)
