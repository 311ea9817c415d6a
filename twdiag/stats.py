"""Numeric diagnostics per stage: the loss curve, actions, codebook, learning
rate and throughput, the findings they imply, and the step at which each
critical problem began (its onset, which the fallback policy uses).

Every number a finding quotes is in the stage's metrics dict too, so a report
can cite it. All thresholds come from the YAML (see rules.load_thresholds).
Dynamics' loss is judged on the real scale: TinyWorlds logs the last
micro-batch's cross-entropy divided by `gradient_accumulation_steps` (with
the MoE auxiliary loss added before the division), so the real
cross-entropy is logged x accumulation steps - moe_aux_loss.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .rules import Finding, stage_verdict

LOSS_KEYS = ("train/loss", "loss", "train_loss")
LR_KEYS = ("learning_rate/group_0", "train/learning_rate", "learning_rate", "lr")
CODEBOOK_KEYS = {"video_tokenizer": "train/codebook_usage",
                 "latent_actions": "latent_actions/codebook_usage"}
MOE_AUX_KEY = "train/moe_aux_loss"
ENCODER_VARIANCE_KEY = "latent_actions/encoder_variance"


def first_key(frame: pd.DataFrame, keys) -> str | None:
    return next((k for k in keys if k in frame.columns), None)


def series(frame: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) where `key` was logged (missing rows dropped)."""
    col = pd.to_numeric(frame[key], errors="coerce").to_numpy(dtype=float)
    steps = pd.to_numeric(frame["_step"], errors="coerce").to_numpy(dtype=float)
    keep = ~np.isnan(col) & np.isfinite(steps)
    return steps[keep].astype(np.int64), col[keep]


def _r(x, nd: int = 6):
    """Round for JSON to nd significant digits; None for missing or non-finite."""
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return x
    if math.isnan(xf) or math.isinf(xf):
        return None
    return float(f"{xf:.{nd}g}")


def _int_config(config: dict, key: str, default: int) -> int:
    try:
        v = int(config.get(key, default))
        return v if v >= 1 else default
    except (TypeError, ValueError):
        return default


def rolling_median(values: np.ndarray, rows: int) -> np.ndarray:
    return pd.Series(values).rolling(rows, center=True, min_periods=1).median().to_numpy()


def sustained_onset(steps: np.ndarray, smooth: np.ndarray, level: float, stay_share: float) -> int | None:
    """First step where the smoothed curve is above `level` and stays above it
    for `stay_share` of the rows that follow (a breach that lasts)."""
    above = smooth > level
    if not above.any():
        return None
    share = np.cumsum(above[::-1])[::-1] / np.arange(len(above), 0, -1)
    hits = np.flatnonzero(above & (share >= stay_share))
    return int(steps[hits[0]]) if len(hits) else None


def len_smooth(analysis, loss: np.ndarray) -> int:
    """Rows in the rolling median onsets are read on (`loss.smooth_fraction`)."""
    t = analysis.t["loss"]
    return max(t["onset_min_rows"], int(len(loss) * t["smooth_fraction"]))


def excursion(steps: np.ndarray, smooth: np.ndarray, level: float, min_rows: int) -> dict | None:
    """The first run of at least `min_rows` consecutive smoothed rows above
    `level`: a blow-up, whether or not the curve came back down later."""
    above = np.concatenate(([0], (smooth > level).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(above))
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= min_rows:
            peak = a + int(np.argmax(smooth[a:b]))
            return {"onset_step": int(steps[a]), "end_step": int(steps[b - 1]),
                    "peak_step": int(steps[peak]), "peak": float(smooth[peak]),
                    "recovered": bool(b < len(smooth))}
    return None


class StageAnalysis:
    """Analyse one stage's merged history. Call .run() -> (metrics, findings)."""

    def __init__(self, stage: str, frame: pd.DataFrame, non_finite: dict, config: dict,
                 thresholds: dict, evidence: str | None) -> None:
        self.stage, self.frame, self.non_finite = stage, frame, non_finite
        self.config, self.t, self.evidence = config or {}, thresholds, evidence
        self.findings: list[Finding] = []
        self.metrics: dict = {"onsets": {}}

    def add(self, rule_id, severity, metric, value, threshold, steps=(), message="", onset=None) -> None:
        self.findings.append(Finding(rule_id, severity, self.stage, metric, value, threshold,
                                     list(steps), self.evidence, message))
        if onset is not None and severity == "critical":
            self.metrics["onsets"][rule_id] = int(onset)

    # --- orchestration --------------------------------------------------------
    def run(self) -> tuple[dict, list[Finding]]:
        f = self.frame
        m = self.metrics
        m["rows"] = int(len(f))
        m.update(self._progress())
        loss_key = first_key(f, LOSS_KEYS)
        m["loss_key"] = loss_key
        enough = False
        if loss_key:
            steps, loss = series(f, loss_key)
            m["non_finite"] = self._non_finite(loss_key)
            finite = np.isfinite(loss)
            steps_f, loss_f = steps[finite], loss[finite]
            enough = len(loss_f) >= self.t["data"]["min_rows"]
            if len(loss_f):
                m["loss"] = self._loss_summary(steps_f, loss_f)
                real = self._real_scale(steps_f, loss_f)
                m["spikes"] = self._spikes(steps_f, loss_f) if enough else None
                if enough:
                    self._loss_rules(steps_f, real)
                self._stage_scale(steps_f, real, enough)
        else:
            self.add("no_loss_metric", "watch", None, None, list(LOSS_KEYS),
                     message="no train/loss column in the history; cannot judge the curve")
        if not enough:
            self.add("insufficient_data", "info", loss_key, m["rows"], self.t["data"]["min_rows"],
                     message=f"only {m['rows']} rows (< {self.t['data']['min_rows']}): too early to judge")
        m["learning_rate"] = self._learning_rate()
        m["codebook"] = self._codebook()
        m["actions"] = self._actions()
        m["correlations"] = self._correlations(loss_key)
        m["throughput"] = self._throughput()
        m["verdict"] = stage_verdict(self.findings, enough)
        return m, self.findings

    # --- pieces ---------------------------------------------------------------
    def _progress(self) -> dict:
        steps = pd.to_numeric(self.frame["_step"], errors="coerce").dropna().to_numpy(dtype=np.int64) \
            if len(self.frame) else np.array([], np.int64)
        if not len(steps):
            return {"step_min": None, "step_max": None}
        diffs = np.diff(steps)
        n_updates = self.config.get("n_updates")
        out = {"step_min": int(steps.min()), "step_max": int(steps.max()),
               "step_gaps": int((diffs > 1).sum()), "duplicate_steps": int((diffs == 0).sum()),
               "step_resets": int((diffs < 0).sum()),
               "largest_gap": int(diffs.max()) if len(diffs) else 0,
               "n_updates": n_updates if isinstance(n_updates, (int, float)) else None}
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
                 f"{len(nf['rows'])} values in all: training has diverged numerically", onset=first)
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
        return {
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

    def _real_scale(self, steps: np.ndarray, loss: np.ndarray) -> np.ndarray:
        """The loss as the model saw it: x gradient_accumulation_steps, minus
        the MoE auxiliary loss where logged (dynamics); the logged loss elsewhere
        (the other stages' losses are divided too, but they are not compared
        with an absolute level)."""
        gas = _int_config(self.config, "gradient_accumulation_steps", 1)
        real = loss * gas
        aux_subtracted = False
        if self.stage == "dynamics" and MOE_AUX_KEY in self.frame.columns:
            a_steps, aux = series(self.frame, MOE_AUX_KEY)
            lookup = pd.Series(aux, index=a_steps).groupby(level=0).last()
            matched = lookup.reindex(steps).to_numpy()
            real = real - np.nan_to_num(matched)
            aux_subtracted = bool(np.isfinite(matched).any())
        self.metrics["loss_scale"] = {
            "gradient_accumulation_steps": gas, "factor": gas,
            "moe_aux_subtracted": aux_subtracted,
            "note": ("real = logged x gradient_accumulation_steps" + (" - moe_aux_loss" if aux_subtracted else "")
                     if gas > 1 or aux_subtracted else "logged = real")}
        if gas > 1 or aux_subtracted:
            self.metrics["loss"]["real_late_mean"] = _r(np.array_split(real, 3)[-1].mean())
            self.metrics["loss"]["real_final"] = _r(real[-1])
            self.metrics["loss"]["real_min"] = _r(real.min())
        return real

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
        # The level a spike stands out from: the median of the rows *before*
        # it. A centred median would count the future, lower rows of a steep
        # initial descent and call every early row a spike.
        med = logl.rolling(sp["window"], min_periods=5).median().shift(1)
        # Noise scale: MAD of the residuals per block of 20 windows (a rolling
        # MAD would cost a second rolling median for nearly the same number).
        resid = (logl - med).to_numpy()
        block = 20 * sp["window"]
        mad = np.repeat(_block_medians(np.abs(np.nan_to_num(resid)), block), block)[:len(resid)]
        z = resid / (1.4826 * np.clip(mad, 1e-3, None))
        # A spike must also be big in absolute terms: on a very smooth curve the
        # MAD is tiny and a 2% bump would otherwise score z > 8.
        big = np.nan_to_num(resid) > np.log(sp["min_ratio"])
        idx = np.flatnonzero((np.nan_to_num(z) > sp["z"]) & big)
        events: list[list[int]] = []  # consecutive rows make one spike event
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
        # One-row spikes are one bad batch (train/loss is the last micro-batch's
        # loss); only spikes that last count towards "unstable".
        wide = [ev for ev in events if len(ev) >= sp["frequent_min_rows"]]
        per_10k = len(wide) / max(1, len(loss)) * 10000
        if unrecovered:
            self.add("loss_spike_unrecovered", "watch", "train/loss", len(unrecovered), sp["z"],
                     unrecovered, f"{len(unrecovered)} loss spike(s) did not come back within "
                     f"{sp['recover_rows']} rows (first at step {unrecovered[0]})")
        elif events:
            self.add("loss_spike_recovered", "info", "train/loss", len(events), sp["z"],
                     [e["step"] for e in out], f"{len(events)} loss spike(s), all recovered")
        if per_10k > sp["many_per_10k_rows"] and len(wide) >= sp["many_min_count"]:
            self.add("loss_spikes_frequent", "watch", "train/loss", _r(per_10k, 3),
                     sp["many_per_10k_rows"], [e["step"] for e in out],
                     f"{_r(per_10k, 3)} spikes of {sp['frequent_min_rows']}+ rows per 10k rows: "
                     "unstable optimisation")
        return {"count": len(events), "lasting": len(wide), "unrecovered": len(unrecovered),
                "per_10k_rows": _r(per_10k, 3), "events": out[:20]}

    def _smooth(self, loss: np.ndarray) -> np.ndarray:
        return rolling_median(loss, len_smooth(self, loss))

    def _loss_rules(self, steps: np.ndarray, loss: np.ndarray) -> None:
        """Divergence, a blow-up (even one that came back down), a rise, no
        progress. `loss` is on the real scale (dynamics) or as logged."""
        m = self.metrics["loss"]
        lt = self.t["loss"]
        windows = [w["mean"] for w in m["windows"] if w["mean"] is not None]
        trend = m["late_trend"] or {}
        factor = self.metrics["loss_scale"]["factor"]
        # Best level reached: the lowest block median (robust to single lows).
        best = float(np.min(_block_medians(loss, max(5, len(loss) // 50))))
        late = float(np.array_split(loss, self.t["data"]["n_windows"])[-1].mean())
        m["best_level"] = _r(best / factor)
        ratio = late / best if best > 0 else None
        m["late_over_best"] = _r(ratio, 4)
        direction = trend.get("direction")
        rising = direction == "rising" or (direction != "falling" and len(windows) >= 3 and all(
            b >= a for a, b in zip(windows[-3:], windows[-2:])))
        smooth = self._smooth(loss)
        wsteps = [w["step_from"] for w in m["windows"]]
        blew_up = self._blowup(steps, loss, smooth)
        if ratio and ratio >= lt["rise_critical_ratio"] and rising:
            onset = sustained_onset(steps, smooth, best * lt["rise_critical_ratio"], lt["onset_stay_share"])
            m["divergence_onset_step"] = onset
            self.add("loss_divergence", "critical", "train/loss", _r(ratio, 4), lt["rise_critical_ratio"],
                     wsteps, f"loss is rising: window means {', '.join(str(w) for w in windows)}; "
                     f"late window is {_r(ratio, 3)}x the best level reached ({m['best_level']}); "
                     f"from {m['first']} at step {m['first_step']} (min {m['min']} at step "
                     f"{m['min_step']}) to {m['final']} at step {m['final_step']}"
                     + (f"; it left the best level for good at step {onset}" if onset is not None else ""),
                     onset=onset if onset is not None else m["min_step"])
        elif ratio and ratio >= lt["rise_watch_ratio"] and direction != "falling" and not blew_up:
            self.add("loss_rising", "watch", "train/loss", _r(ratio, 4), lt["rise_watch_ratio"],
                     wsteps, f"late window mean {_r(late / factor)} is {_r(ratio, 3)}x the best level "
                     f"reached ({m['best_level']}), and the late trend is {direction or 'unknown'}")
        first10, last10 = m["first10_mean"], m["last10_mean"]
        if first10 and last10 is not None and last10 / first10 > lt["no_progress_ratio"] \
                and not (ratio and ratio >= lt["rise_watch_ratio"]) and not blew_up:
            self.add("loss_no_progress", "watch", "train/loss", _r(last10 / first10, 4),
                     lt["no_progress_ratio"], [m["first_step"], m["final_step"]],
                     f"last-10% mean {last10} vs first-10% mean {first10}: no real progress")

    def _blowup(self, steps: np.ndarray, loss: np.ndarray, smooth: np.ndarray) -> bool:
        """A sustained excursion far above the start (tokenizer, action model)
        or far above chance on the real scale (dynamics)."""
        lt = self.t["loss"]
        if self.stage == "dynamics":
            chance = math.log(self._codes())
            level, against = chance * lt["blowup_over_chance"], f"chance ln({self._codes()}) = {_r(chance, 4)}"
        else:
            start = float(min(loss[0], np.median(loss[:3])))
            level, against = start * lt["blowup_over_start"], f"the starting loss {_r(start, 4)}"
        min_rows = max(lt["onset_min_rows"], int(len(loss) * lt["blowup_min_share"]))
        ex = excursion(steps, smooth, level, min_rows)
        if ex is None:
            return False
        # The smoothed peak decides (one bad batch is not a blow-up); the raw
        # peak within the excursion is reported beside it, labelled.
        window = (steps >= ex["onset_step"]) & (steps <= ex["end_step"])
        raw_i = np.flatnonzero(window)[int(np.nanargmax(loss[window]))]
        ex.update(raw_peak=float(loss[raw_i]), raw_peak_step=int(steps[raw_i]), smoothing_rows=len_smooth(self, loss))
        factor = self.metrics["loss_scale"]["factor"]
        ref = math.log(self._codes()) if self.stage == "dynamics" else level / lt["blowup_over_start"]
        ex.update(level=_r(level), peak_over_reference=_r(ex["peak"] / ref, 4),
                  late_over_reference=_r(float(smooth[-1]) / ref, 4))
        self.metrics["loss"]["blowup"] = {k: _r(v) if isinstance(v, float) else v for k, v in ex.items()}
        scale = "real-scale " if factor > 1 else ""
        came_back = (f"; it came back down to {_r(float(smooth[-1]))} by step {int(steps[-1])}"
                     + (" as the learning rate decayed" if self._lr_decayed() else "")
                     if ex["recovered"] else "; it has not come back down")
        self.add("loss_blowup", "critical", "train/loss", ex["peak_over_reference"],
                 lt["blowup_over_chance"] if self.stage == "dynamics" else lt["blowup_over_start"],
                 [ex["onset_step"], ex["peak_step"], ex["end_step"]],
                 f"the {scale}loss blew up: its rolling median ({ex['smoothing_rows']} rows) peaked at "
                 f"{_r(ex['peak'])} at step {ex['peak_step']} (raw peak {_r(ex['raw_peak'])} at step "
                 f"{ex['raw_peak_step']}; {ex['peak_over_reference']}x {against}), above {_r(level)} from step "
                 f"{ex['onset_step']} to {ex['end_step']}{came_back}: the weights went somewhere bad",
                 onset=ex["onset_step"])
        return True

    def _lr_decayed(self) -> bool:
        lr = self.metrics.get("learning_rate") or self._learning_rate()
        return bool(lr and lr.get("current_over_max") is not None and lr["current_over_max"] < 0.5)

    def _stage_scale(self, steps: np.ndarray, real: np.ndarray, enough: bool) -> None:
        m = self.metrics
        late = float(_phases(real)[-1].mean())
        st = self.t["stages"].get(self.stage, {})
        if self.stage == "dynamics":
            codes = self._codes()
            chance = math.log(codes)
            frac = late / chance
            tail = real[-max(1, int(len(real) * self.t["data"]["final_fraction"])):]
            m["scale"] = {"codes": codes, "chance_nats": _r(chance), "late_fraction_of_chance": _r(frac, 4),
                          "late_window": f"mean of the last third of rows (from step {int(steps[-len(_phases(real)[-1])])})",
                          "final_fraction_of_chance": _r(float(np.mean(tail)) / chance, 4),
                          "final_window": f"mean of the last {len(tail)} rows ({_r(self.t['data']['final_fraction'] * 100, 3)}% "
                                          f"of rows, steps {int(steps[-len(tail)])}-{int(steps[-1])})",
                          "real_scale": m["loss_scale"]["factor"] > 1 or m["loss_scale"]["moe_aux_subtracted"],
                          "chance_on_logged_scale": _r(chance / m["loss_scale"]["factor"])}
            if enough and frac >= st["chance_watch"] and "loss_blowup" not in m["onsets"]:
                sev = "critical" if frac >= st["chance_critical"] else "watch"
                thr = st["chance_critical"] if sev == "critical" else st["chance_watch"]
                onset = sustained_onset(steps, self._smooth(real), chance * st["chance_critical"],
                                        self.t["loss"]["onset_stay_share"]) if sev == "critical" else None
                real_txt = (f" (real scale: logged x {m['loss_scale']['factor']})"
                            if m["scale"]["real_scale"] else "")
                self.add("dynamics_near_chance", sev, "train/loss", _r(frac, 4), thr,
                         [m["loss"]["final_step"]],
                         f"late mean loss {_r(late)}{real_txt} ({m['scale']['late_window']}) is {_r(frac * 100, 3)}% "
                         f"of chance ln({codes}) = {_r(chance, 4)}; the final level is "
                         f"{_r(m['scale']['final_fraction_of_chance'] * 100, 3)}% ({m['scale']['final_window']}): "
                         "the model predicts little better than uniform",
                         onset=onset if onset is not None else m["loss"]["first_step"])
        elif self.stage == "latent_actions":
            m["scale"] = {"variance_penalty_regime": late >= st["variance_penalty_watch"]}
            if enough and late >= st["variance_penalty_watch"]:
                sev = "critical" if late >= st["variance_penalty_critical"] else "watch"
                thr = st[f"variance_penalty_{sev}"]
                onset = sustained_onset(steps, self._smooth(real), st["variance_penalty_critical"],
                                        self.t["loss"]["onset_stay_share"]) if sev == "critical" else None
                self.add("lam_variance_penalty", sev, "train/loss", _r(late), thr,
                         [m["loss"]["final_step"]],
                         f"late mean loss {_r(late)} is at the variance-penalty level (>= {thr}): "
                         "the encoder variance has collapsed", onset=onset)

    def _codes(self) -> int:
        c = self.config
        try:
            codes = int(c["num_bins"]) ** int(c["latent_dim"])
            return codes if codes >= 2 else int(self.t["stages"]["dynamics"]["default_codes"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return int(self.t["stages"]["dynamics"]["default_codes"])

    def _learning_rate(self) -> dict | None:
        key = first_key(self.frame, LR_KEYS)
        if not key:
            return None
        steps, lr = series(self.frame, key)
        ok = np.isfinite(lr)
        steps, lr = steps[ok], lr[ok]
        if not len(lr):
            return None
        cur, peak = float(lr[-1]), float(lr.max())
        frac = cur / peak if peak > 0 else None
        lt = self.t["lr"]
        phase = "warmup" if steps[-1] <= steps[int(lr.argmax())] else \
            "floor" if frac is not None and frac <= lt["floor_fraction"] * 1.5 else "decay"
        base = self.config.get("learning_rate")
        return {"key": key, "current": _r(cur), "max": _r(peak), "max_step": int(steps[int(lr.argmax())]),
                "min": _r(float(lr.min())), "current_over_max": _r(frac, 4), "phase": phase,
                "config_learning_rate": base if isinstance(base, (int, float)) else None}

    def _codebook(self) -> dict | None:
        key = CODEBOOK_KEYS.get(self.stage)
        if not key or key not in self.frame.columns:
            return None
        steps, v = series(self.frame, key)
        v_ok = np.isfinite(v)
        steps, v = steps[v_ok], v[v_ok]
        if not len(v):
            return None
        thirds = _phases(v)
        out = {"key": key, "points": len(v), "first": _r(v[0]), "final": _r(v[-1]), "max": _r(v.max()),
               "early_mean": _r(thirds[0].mean()), "late_mean": _r(thirds[-1].mean()),
               "note": "batch-level usage: biased low by batch size"}
        st = self.t["stages"].get(self.stage, {})
        if self.stage != "video_tokenizer" or len(v) < self.t["data"]["min_codebook_points"]:
            return out
        codes = self._codes()
        late_codes = thirds[-1].mean() * codes
        out["late_codes_used"] = _r(late_codes, 4)
        if late_codes <= st["codebook_collapse_codes"]:
            used = (v * codes) <= st["codebook_collapse_codes"]
            share = np.cumsum(used[::-1])[::-1] / np.arange(len(used), 0, -1)
            onset = next((int(s) for s, u, sh in zip(steps, used, share) if u and sh >= 0.9), int(steps[-1]))
            self.add("codebook_collapse", "critical", key, _r(late_codes, 4), st["codebook_collapse_codes"],
                     [onset, int(steps[-1])],
                     f"the tokenizer uses about {_r(late_codes, 3)} of {codes} codes per batch late in "
                     "training: its codebook collapsed, so every frame maps to the same few tokens",
                     onset=onset)
        elif thirds[-1].mean() < st["codebook_drop_watch"] * v.max():
            self.add("codebook_usage_drop", "watch", key, _r(thirds[-1].mean()),
                     _r(st["codebook_drop_watch"] * v.max()), [int(steps[int(v.argmax())]), int(steps[-1])],
                     f"codebook usage fell from {_r(v.max())} to a late mean of {_r(thirds[-1].mean())} "
                     f"(about {_r(late_codes, 3)} of {codes} codes per batch)")
        return out

    # --- actions ----------------------------------------------------------------
    def _actions(self) -> dict | None:
        stats = action_stats(self.frame, self.config, self.t)
        if stats is None:
            return None
        pooled = pooled_actions(self.frame, stats.get("n_actions"))
        if pooled:
            stats["pooled"] = pooled
            self._dead_bits(pooled, stats.get("n_actions"))
        if self.stage == "dynamics":
            # The frozen action model's statistics: a property of latent_actions,
            # judged there (crossstage), not a dynamics problem.
            stats["source"] = "frozen action model (judged under latent_actions)"
            return stats
        if self.stage != "latent_actions":
            return stats
        stats["source"] = "own log"
        if stats["points"] < self.t["data"]["min_action_points"]:
            stats["judged"] = False
            self.add("action_stats_sparse", "info", "unique_actions", stats["points"],
                     self.t["data"]["min_action_points"],
                     message=f"only {stats['points']} action-stat points: too few to judge diversity here")
            return stats
        stats["judged"] = True
        for f in action_findings(stats, self.t, "latent_actions", self.evidence, "the action model's own log"):
            self.findings.append(f)
            if f.rule_id == "action_collapse":
                self.metrics["onsets"]["action_collapse"] = stats["collapse_onset_step"]
        return stats

    def _dead_bits(self, pooled: dict, n_actions: int | None) -> None:
        """A latent bit that never changed over enough pooled transitions (the
        action model's own log, or its frozen statistics in dynamics' log:
        filed under latent_actions either way, by crossstage for dynamics)."""
        dead = pooled.get("dead_bits") or []
        if not dead or pooled["n_codes_used"] < 2 or \
                pooled["transitions"] < self.t["actions"]["dead_bit_min_transitions"]:
            return
        where = "the action model's own log" if self.stage == "latent_actions" else \
            "the frozen action model's statistics in dynamics' log"
        self.add("action_bit_dead", "watch" if self.stage == "latent_actions" else "info", "dead_bits", dead, [],
                 [int(self.frame["_step"].iloc[-1])],
                 f"pooled over {pooled['transitions']:,} logged transitions ({pooled['rows']} histograms in {where}), "
                 f"latent bit(s) {dead} of the action code never changed: only {pooled['reachable_codes']} of "
                 f"{n_actions} codes are possible; codes used {pooled['codes_used']}")

    def _correlations(self, loss_key: str | None) -> dict:
        if not loss_key:
            return {}
        out = {}
        f = self.frame
        loss = pd.to_numeric(f[loss_key], errors="coerce")
        for name, key in (("lr", first_key(f, LR_KEYS)), ("action_entropy", "action_entropy"),
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
            why_not = (f"|corr| <= {_r(max(act), 3)}" if act else
                       "its statistics are constant here, so they cannot explain it")
            out["reading"] = f"loss tracks the learning rate (corr {lr_c}), not the action model ({why_not})"
        return out

    def _throughput(self) -> dict | None:
        """Steps per second from the records' own clock: `_timestamp` (or
        `_runtime`) of the history rows, never file times."""
        f = self.frame
        key = next((k for k in ("_timestamp", "_runtime") if k in f.columns), None)
        if key is None or len(f) < 2:
            return None
        steps, ts = series(f, key)
        if len(ts) < 2 or ts[-1] <= ts[0]:
            return None
        span = float(ts[-1] - ts[0])
        if span < self.t["liveness"]["throughput_min_seconds"]:
            return {"steps_per_s_overall": None, "steps_per_s_recent": None, "wall_seconds": _r(span, 4),
                    "source": f"history {key}",
                    "why_not": f"the records span {_r(span, 3)} s, under liveness.throughput_min_seconds = "
                               f"{self.t['liveness']['throughput_min_seconds']} s: too short a time to give a rate"}
        overall = (steps[-1] - steps[0]) / (ts[-1] - ts[0])
        k = max(2, len(ts) // 10)
        ds, dt = steps[-1] - steps[-k], ts[-1] - ts[-k]
        recent = ds / dt if dt > 0 else None
        out = {"steps_per_s_overall": _r(overall, 4), "steps_per_s_recent": _r(recent, 4),
               "wall_seconds": _r(ts[-1] - ts[0], 6), "source": f"history {key}"}
        n_updates = self.config.get("n_updates")
        if isinstance(n_updates, (int, float)) and n_updates > steps[-1] + 1:
            left = n_updates - 1 - steps[-1]
            rates = [r for r in (recent, overall) if r]
            out["eta_hours"] = [_r(left / max(rates) / 3600, 4), _r(left / min(rates) / 3600, 4)]
        if recent and overall and recent < self.t["liveness"]["slowdown_ratio"] * overall:
            self.add("throughput_slowdown", "info", key, _r(recent, 4),
                     _r(self.t["liveness"]["slowdown_ratio"] * overall, 4), [int(steps[-k])],
                     f"recent {_r(recent, 3)} steps/s vs {_r(overall, 3)} overall")
        return out


# --- action statistics (own log, or the frozen model seen from dynamics) ------------

def pooled_actions(frame: pd.DataFrame, n_actions: int | None) -> dict | None:
    """Action usage pooled over every logged `action_distribution` histogram
    (one per logged step, each a batch's action indices): how often each code
    was chosen in all, the pooled entropy, and per latent bit the share of
    transitions with that bit set (a bit that never changes halves the codes
    the model can express). Per-batch statistics read low; these do not."""
    if "action_distribution" not in frame.columns:
        return None
    counts: dict[int, float] = {}
    rows = 0
    for cell in frame["action_distribution"].dropna():
        if not isinstance(cell, dict) or not isinstance(cell.get("bins"), list) or \
                not isinstance(cell.get("values"), list) or len(cell["bins"]) != len(cell["values"]) + 1:
            continue
        edges = np.asarray(cell["bins"], dtype=float)
        values = np.asarray(cell["values"], dtype=float)
        if not (np.all(np.isfinite(edges)) and np.all(np.isfinite(values))) or np.any(np.diff(edges) >= 1):
            continue  # bins wider than one code cannot be told apart
        hit = np.flatnonzero(values > 0)
        for code, n in zip(np.rint((edges[hit] + edges[hit + 1]) / 2).astype(int), values[hit]):
            counts[int(code)] = counts.get(int(code), 0.0) + float(n)
        rows += 1
    total = sum(counts.values())
    if not rows or total <= 0:
        return None
    p = np.array([counts[c] / total for c in sorted(counts)])
    out = {"rows": rows, "transitions": int(total), "codes_used": sorted(counts),
           "n_codes_used": len(counts), "counts": {str(c): int(counts[c]) for c in sorted(counts)},
           "pooled_entropy": _r(float(-(p * np.log(p)).sum()) + 0.0, 4), "source": "action_distribution, pooled"}
    if n_actions and n_actions & (n_actions - 1) == 0 and n_actions > 2:
        bits = n_actions.bit_length() - 1
        share = []
        for b in range(bits):
            on = sum(n for c, n in counts.items() if (c >> b) & 1)
            share.append(_r(on / total, 4))
        out["bit_share_set"] = share
        out["dead_bits"] = [b for b, x in enumerate(share) if x in (0.0, 1.0)]
        out["reachable_codes"] = n_actions >> len(out["dead_bits"])
    if n_actions:
        out["pooled_entropy_fraction"] = _r(out["pooled_entropy"] / math.log(n_actions), 4)
    return out


def action_stats(frame: pd.DataFrame, config: dict, t: dict) -> dict | None:
    if "unique_actions" not in frame.columns and "action_entropy" not in frame.columns:
        return None
    n_actions = config.get("n_actions")
    n_actions = n_actions if isinstance(n_actions, int) and n_actions > 1 else None
    out: dict = {"n_actions": n_actions}
    ustep, uniq = series(frame, "unique_actions") if "unique_actions" in frame.columns else (np.array([]), np.array([]))
    estep, ent = series(frame, "action_entropy") if "action_entropy" in frame.columns else (np.array([]), np.array([]))
    out["points"] = max(len(uniq), len(ent))
    out["steps"] = [int(ustep[0]), int(ustep[-1])] if len(ustep) else \
        [int(estep[0]), int(estep[-1])] if len(estep) else None
    if len(uniq):
        late = uniq[int(len(uniq) * (1 - t["data"]["late_fraction"])):]
        out["unique_actions"] = {
            **_phase_summary(uniq), "single_action_share": _r((uniq == 1).mean(), 4),
            "late_single_action_share": _r((late == 1).mean(), 4) if len(late) else None,
            "late_fraction_of_actions": _r(_phases(uniq)[-1].mean() / n_actions, 4) if n_actions else None}
        single = uniq == 1
        share = np.cumsum(single[::-1])[::-1] / np.arange(len(single), 0, -1)
        hits = np.flatnonzero(single & (share >= t["actions"]["single_share_critical"]))
        out["collapse_onset_step"] = int(ustep[hits[0]]) if len(hits) else None
    if len(ent):
        norm = math.log(n_actions) if n_actions else None
        phases = _phases(ent)
        best = max(p.mean() for p in phases[:-1]) if len(phases) > 1 else None
        out["entropy"] = {
            **_phase_summary(ent), "max_possible": _r(norm),
            "late_normalized": _r(phases[-1].mean() / norm, 4) if norm else None,
            "late_over_best_phase": _r(phases[-1].mean() / best, 4) if best else None}
    if ENCODER_VARIANCE_KEY in frame.columns:
        vstep, var = series(frame, ENCODER_VARIANCE_KEY)
        if len(var):
            out["encoder_variance"] = {"first": _r(var[0]), "final": _r(var[-1]), "min": _r(var.min()),
                                       "max": _r(var.max()), "first_step": int(vstep[0]),
                                       "points": len(var)}
    return out


def action_findings(a: dict, t: dict, stage: str, evidence: str | None, source: str,
                    frozen: bool = False) -> list[Finding]:
    """Collapse (critical) or narrowing (watch) from action statistics.
    `frozen`: the stats are the trained action model seen from dynamics (a
    level, constant over dynamics' training: no trend is read from them)."""
    th = t["actions"]
    u, e = a.get("unique_actions") or {}, a.get("entropy") or {}
    share = u.get("late_single_action_share")
    enorm = e.get("late_normalized")
    steps = [s for s in (a.get("steps") or [])][-1:]
    # A finding's metric, value and threshold are those of the condition that
    # fired (the first, when several did); the message lists every one.
    if share is not None and share >= th["single_share_critical"]:
        fired = ("late_single_action_share", share, th["single_share_critical"])
    elif enorm is not None and enorm < th["entropy_critical"]:
        fired = ("late_entropy_fraction", enorm, th["entropy_critical"])
    else:
        fired = None
    if fired:
        return [Finding("action_collapse", "critical", stage, *fired, steps, evidence,
                        f"latent actions collapsed ({source}): {_pct(share)} of late steps use one action, "
                        f"late entropy {e.get('late_mean')} ({_pct(enorm)} of ln(n_actions))")]
    reasons = []  # (metric, value, threshold, text)
    if share is not None and share >= th["single_share_watch"]:
        reasons.append(("late_single_action_share", share, th["single_share_watch"],
                        f"{_pct(share)} of late steps use a single action"))
    if enorm is not None and enorm < th["entropy_watch"]:
        reasons.append(("late_entropy_fraction", enorm, th["entropy_watch"],
                        f"late entropy {e['late_mean']} is {_pct(enorm)} of ln({a['n_actions']}) = {e['max_possible']}"))
    frac = u.get("late_fraction_of_actions")
    if frac is not None and frac < th["unique_fraction_watch"]:
        reasons.append(("late_fraction_of_actions", frac, th["unique_fraction_watch"],
                        f"a batch uses {u['late_mean']} of {a['n_actions']} actions on average late"))
    if not frozen:
        best = max(u.get("early_mean") or 0, u.get("mid_mean") or 0)
        if u.get("late_mean") is not None and best and u["late_mean"] / best < th["unique_drop_watch"]:
            reasons.append(("unique_actions_late_over_best", _r(u["late_mean"] / best, 4), th["unique_drop_watch"],
                            f"unique_actions fell from a mean of {best} to {u['late_mean']}"))
        drop = e.get("late_over_best_phase")
        if drop is not None and drop < th["entropy_drop_watch"]:
            reasons.append(("entropy_late_over_best", drop, th["entropy_drop_watch"],
                            f"entropy fell to {_pct(drop)} of its best phase "
                            f"({max(e['early_mean'], e['mid_mean'])} -> {e['late_mean']})"))
    if not reasons:
        return []
    metric, value, threshold, _ = reasons[0]
    return [Finding("action_diversity_narrowing", "watch", stage, metric, value, threshold, steps, evidence,
                    f"action diversity is narrowing, not collapsed ({source}): "
                    + "; ".join(r[3] for r in reasons))]


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


def analyse_stage(merged, thresholds: dict) -> tuple[dict, list[Finding]]:
    """Run the stage analysis on a logs.StageHistory."""
    a = StageAnalysis(merged.stage, merged.frame, merged.non_finite, merged.config, thresholds,
                      merged.latest.path)
    return a.run()


def analyse(histories: dict, thresholds: dict) -> dict:
    """Every stage's history analysed: the stage_stats document body."""
    from .rules import findings_dicts
    doc: dict = {"stages": {}}
    for stage, merged in histories.items():
        metrics, findings = analyse_stage(merged, thresholds)
        doc["stages"][stage] = {"verdict": metrics.pop("verdict"), "evidence_path": merged.latest.path,
                                "metrics": metrics, "findings": findings_dicts(findings)}
    return doc


def loss_near(frame: pd.DataFrame, loss_key: str | None, steps: list[int], half_window: int) -> dict:
    """Median loss within +-half_window steps of each step (as logged)."""
    if not loss_key or loss_key not in frame.columns:
        return {}
    s, v = series(frame, loss_key)
    ok = np.isfinite(v)
    s, v = s[ok], v[ok]
    out = {}
    for step in steps:
        sel = (s >= step - half_window) & (s <= step + half_window)
        if sel.any():
            out[step] = _r(float(np.median(v[sel])))
    return out


def value_at(frame: pd.DataFrame, key: str | None, steps: list[int]) -> dict:
    """The last logged value at or before each step."""
    if not key or key not in frame.columns:
        return {}
    s, v = series(frame, key)
    if not len(s):
        return {}
    idx = np.searchsorted(s, steps, side="right") - 1
    return {step: _r(float(v[i])) for step, i in zip(steps, idx) if i >= 0}


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
