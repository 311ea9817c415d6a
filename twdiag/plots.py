"""Loss-curve PNGs per stage: the raw curve (binned min/max envelope on long
runs), a rolling median, the summary windows, spikes and non-finite steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

MAX_POINTS = 4000  # envelope bins: matplotlib stays fast on 300k-step runs


def _envelope(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(steps) <= MAX_POINTS:
        return steps, values, values
    bins = np.array_split(np.arange(len(steps)), MAX_POINTS)
    s = np.array([steps[b[0]] for b in bins])
    lo = np.array([values[b].min() for b in bins])
    hi = np.array([values[b].max() for b in bins])
    return s, lo, hi


def loss_figure(stage: str, frame: pd.DataFrame, metrics: dict):
    """A matplotlib figure for one stage; the caller saves it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = metrics.get("loss_key")
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    if not key or key not in frame.columns:
        ax.text(0.5, 0.5, f"{stage}: no loss metric", ha="center", va="center")
        return fig
    steps = pd.to_numeric(frame["_step"], errors="coerce").to_numpy(dtype=float)
    loss = pd.to_numeric(frame[key], errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(loss) & np.isfinite(steps) & (loss > 0)
    s, lo, hi = _envelope(steps[finite], loss[finite])
    ax.fill_between(s, lo, hi, color="tab:blue", alpha=0.25, linewidth=0, label=f"{key} (min-max)")
    ax.plot(s, (lo + hi) / 2 if len(s) < len(steps[finite]) else lo, color="tab:blue", lw=0.6)
    if finite.sum() > 50:
        med = pd.Series(loss[finite]).rolling(51, center=True, min_periods=10).median().to_numpy()
        ss, ml, _ = _envelope(steps[finite], med)
        ax.plot(ss, ml, color="black", lw=1.2, label="rolling median (51 rows)")
    for w in (metrics.get("loss") or {}).get("windows", []):
        ax.hlines(w["mean"], w["step_from"], w["step_to"], colors="tab:orange", lw=2)
    ax.plot([], [], color="tab:orange", lw=2, label="window means")
    events = (metrics.get("spikes") or {}).get("events", [])
    if events:
        ax.scatter([e["step"] for e in events], [e["value"] for e in events], marker="v",
                   color=["tab:green" if e["recovered"] else "tab:red" for e in events],
                   zorder=5, label="spikes (green = recovered)")
    bad = steps[~np.isfinite(loss) & np.isfinite(steps)]
    for b in bad[:200]:
        ax.axvline(b, color="red", lw=0.5, alpha=0.5)
    if len(bad):
        ax.plot([], [], color="red", lw=1, label=f"non-finite loss ({len(bad)} steps)")
    chance = (metrics.get("scale") or {}).get("chance_nats")
    if chance:
        ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ln(codes) = {chance:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{stage}: {key}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def write_loss_plots(histories: dict, stage_docs: dict, out_dir: Path) -> dict[str, str]:
    """One PNG per stage with a history; returns {stage: path}."""
    import matplotlib.pyplot as plt

    from .outputs import write_image
    written = {}
    for stage, hist in histories.items():
        metrics = (stage_docs.get(stage) or {}).get("metrics") or {}
        fig = loss_figure(stage, hist.frame, metrics)
        try:
            written[stage] = str(write_image(Path(out_dir) / f"loss_{stage}.png", fig))
        finally:
            plt.close(fig)
    return written
