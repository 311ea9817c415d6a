"""Loss figures per stage, drawn for a person to read at a glance:

- the loss (binned min-max envelope on long runs, a rolling median, window
  means, spikes, non-finite steps); dynamics on the real scale (logged x
  gradient accumulation steps) so the chance line ln(codes) means chance;
- the learning rate on a second axis;
- every checkpoint as a marker on the x axis, coloured by status, with the
  fallback circled (or "restart" written when none qualifies);
- for latent_actions, a panel of action entropy and unique actions as
  fractions of their maximum, with the watch and critical lines, from its
  own log and from the frozen model's statistics logged during dynamics;
- the legend outside the axes, so it never hides the end of a curve.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MAX_POINTS = 4000  # envelope bins: matplotlib stays fast on 300k-step runs
STATUS_COLOURS = {"valid": "tab:green", "empty": "tab:red", "truncated": "tab:red", "corrupt": "tab:red",
                  "unsafe_pickle": "purple", "missing_files": "tab:orange", "non_finite": "tab:red",
                  "inconsistent": "tab:orange"}


def prepare() -> None:
    """Import what drawing needs (once, e.g. before forking drawers)."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def new_figure(**kw):
    """A Figure on the Agg canvas, without pyplot: no global figure registry to
    leak into, and pyplot's import is a fifth of matplotlib's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def close(fig) -> None:
    """Release a figure (pyplot's, if it came from there)."""
    import sys
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def png_bytes(fig) -> bytes:
    from . import png
    data = png.figure_bytes(fig)
    close(fig)
    return data


def _plain_log_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers ("100", "0.001"), not mathtext
    ("$10^{2}$"): parsing mathtext was a third of drawing a figure. Minor
    ticks only at 2 and 5 of each decade, the ones labelled: the unlabelled
    marks at 3, 4, 6-9 were a fifth of the drawing time (each tick is several
    matplotlib artists)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(v, _pos):  # 2 and 5 of each decade, so a short log axis still reads
        if v <= 0:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v)))
        return f"{v:g}" if lead in (2, 5) else ""
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _envelope(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(steps) <= MAX_POINTS:
        return steps, values, values
    edges = np.linspace(0, len(steps), MAX_POINTS + 1).astype(int)
    starts = edges[:-1]
    lo = np.minimum.reduceat(values, starts)
    hi = np.maximum.reduceat(values, starts)
    return steps[starts], lo, hi


def _numeric(frame: pd.DataFrame, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = pd.to_numeric(frame["_step"], errors="coerce").to_numpy(dtype=float)
    vals = pd.to_numeric(frame[key], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(steps) & np.isfinite(vals)
    return steps[ok], vals[ok]


def _loss_axes(ax, stage: str, frame: pd.DataFrame, metrics: dict, thresholds: dict) -> None:
    key = metrics.get("loss_key")
    factor = (metrics.get("loss_scale") or {}).get("factor", 1) if stage == "dynamics" else 1
    steps = pd.to_numeric(frame["_step"], errors="coerce").to_numpy(dtype=float)
    loss = pd.to_numeric(frame[key], errors="coerce").to_numpy(dtype=float) * factor
    finite = np.isfinite(loss) & np.isfinite(steps) & (loss > 0)
    label = f"{key} x {factor} (real scale)" if factor > 1 else key
    s, lo, hi = _envelope(steps[finite], loss[finite])
    ax.fill_between(s, lo, hi, color="tab:blue", alpha=0.25, linewidth=0, label=f"{label}: min-max")
    ax.plot(s, (lo + hi) / 2 if len(s) < finite.sum() else lo, color="tab:blue", lw=0.6)
    if finite.sum() > 50:
        med = pd.Series(loss[finite]).rolling(51, center=True, min_periods=51).median().to_numpy()
        ss, ml, _ = _envelope(steps[finite], med)
        ax.plot(ss, ml, color="black", lw=1.2, label="rolling median (51 rows)")
    for w in (metrics.get("loss") or {}).get("windows", []):
        ax.hlines(w["mean"] * factor, w["step_from"], w["step_to"], colors="tab:orange", lw=2)
    ax.plot([], [], color="tab:orange", lw=2, label="window means")
    events = (metrics.get("spikes") or {}).get("events", [])
    if events:
        ax.scatter([e["step"] for e in events], [e["value"] * factor for e in events], marker="v",
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
    blow = (metrics.get("loss") or {}).get("blowup")
    if blow:
        ax.axvspan(blow["onset_step"], blow["end_step"], color="tab:red", alpha=0.08,
                   label=f"blow-up {blow['onset_step']}–{blow['end_step']}")
    # Log scale only when the loss spans enough to need it (a flat 1.409 -> 1.405
    # on a log axis looks like a fall and prints unreadable ticks).
    pos = loss[finite]
    if len(pos) and pos.max() / pos.min() >= thresholds["plots"]["log_scale_min_ratio"]:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax.set_ylabel(label)


def _lr_axes(ax, frame: pd.DataFrame, metrics: dict):
    lr = metrics.get("learning_rate") or {}
    key = lr.get("key")
    if not key or key not in frame.columns:
        return None
    s, v = _numeric(frame, key)
    if not len(v):
        return None
    ax2 = ax.twinx()
    s, lo, hi = _envelope(s, v)
    ax2.plot(s, hi, color="tab:purple", lw=1, alpha=0.7, label=f"learning rate ({key})")
    ax2.set_ylabel("learning rate", color="tab:purple")
    ax2.tick_params(axis="y", which="both", colors="tab:purple")
    ax2.set_yscale("log")
    _plain_log_ticks(ax2.yaxis)
    return ax2


def _checkpoint_marks(ax, entry: dict | None) -> None:
    if not entry or not entry.get("checkpoints"):
        return
    table = entry["checkpoints"].get("table") or []
    fb = entry.get("fallback") or {}
    by_status: dict[str, list] = {}
    for row in table:
        by_status.setdefault(row["status"], []).append(row["step"])
    # One collection per status, not two artists per checkpoint: 10,000 empty
    # checkpoint folders drew for minutes.
    for status, steps in by_status.items():
        colour = STATUS_COLOURS.get(status, "gray")
        ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=colour, lw=1.0, linestyles=":",
                  alpha=0.8)
        ax.plot(steps, [0.02] * len(steps), ls="none", marker="|", ms=14, mew=2.5, color=colour,
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"checkpoint: {status}")
    if fb.get("step") is not None:
        ax.plot([fb["step"]], [0.06], marker="o", ms=13, mfc="none", mew=2.5, color="black",
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"fallback: step {fb['step']}")
    elif fb.get("restart"):
        ax.text(0.01, 0.95, "no fallback: restart", transform=ax.transAxes, color="tab:red",
                fontsize=11, fontweight="bold", va="top")
    onset = (fb.get("onset") or {})
    if onset.get("step") is not None:
        ax.axvline(onset["step"], color="tab:red", lw=1.5, ls="--",
                   label=f"onset: {onset['rule_id']} at step {onset['step']}")


def _action_axes(ax, frame: pd.DataFrame, acts: dict, title: str, thresholds: dict) -> None:
    n = acts.get("n_actions")
    th = thresholds["actions"]
    if "action_entropy" in frame.columns and n:
        s, v = _numeric(frame, "action_entropy")
        s, lo, hi = _envelope(s, v / np.log(n))
        ax.plot(s, (lo + hi) / 2, color="tab:blue", lw=1, marker="o" if len(s) < 30 else None,
                label="entropy / ln(n_actions)")
    if "unique_actions" in frame.columns and n:
        s, v = _numeric(frame, "unique_actions")
        s, lo, hi = _envelope(s, v / n)
        ax.plot(s, (lo + hi) / 2, color="tab:green", lw=1, marker="s" if len(s) < 30 else None,
                label="unique actions / n_actions")
    ax.axhline(th["entropy_watch"], color="tab:orange", ls="--", lw=1,
               label=f"entropy watch ({th['entropy_watch']})")
    ax.axhline(th["entropy_critical"], color="tab:red", ls="--", lw=1,
               label=f"entropy critical ({th['entropy_critical']})")
    ax.axhline(th["unique_fraction_watch"], color="tab:olive", ls=":", lw=1,
               label=f"unique-actions watch ({th['unique_fraction_watch']})")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("fraction of max")
    ax.set_title(title, fontsize=10, loc="left", y=1.0)  # y given: no tight-bbox pass to place it


def _attempt_marks(ax, entry: dict | None) -> None:
    """Where each later attempt starts on the global axis, labelled with how
    it relates to the one before (a resume, a fresh start)."""
    atts = ((entry or {}).get("lineage") or {}).get("attempts") or []
    for a in atts[1:]:
        start = a.get("global_first_step")
        if start is None:
            continue
        what = {"resume": f"resume from step {(a.get('resumed_from') or {}).get('step')}",
                "fresh_start": "fresh start", "continuation": "continuation"}.get(a["relation"], a["relation"])
        ax.axvline(start, color="tab:brown", lw=1.2, ls="-.", alpha=0.8,
                   label=f"attempt {a['index']} starts: {what}")
        ax.text(start, 0.98, f" attempt {a['index']}", transform=ax.get_xaxis_transform(), color="tab:brown",
                fontsize=8, va="top")


def stage_figure(stage: str, frame: pd.DataFrame, metrics: dict, entry: dict | None, thresholds: dict,
                 frozen: tuple[pd.DataFrame, dict] | None = None):
    """One figure for a stage; the caller saves and closes it."""
    acts = metrics.get("actions") or {}
    panels = [("loss", None)]
    if stage == "latent_actions" and acts:
        panels.append(("actions", (frame, acts, "actions in latent_actions' own log")))
    if stage == "latent_actions" and frozen is not None:
        panels.append(("actions", (frozen[0], frozen[1], "the frozen action model, as logged during dynamics "
                                                         "(x axis: dynamics steps)")))
    heights = [3] + [1.6] * (len(panels) - 1)
    fig = new_figure(figsize=(12, 4.2 + 2.2 * (len(panels) - 1)), dpi=100)
    axes = fig.subplots(len(panels), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    key = metrics.get("loss_key")
    ax = axes[0]
    handles = []
    if not key or key not in frame.columns:
        ax.text(0.5, 0.5, f"{stage}: no loss metric", ha="center", va="center", transform=ax.transAxes)
    else:
        _loss_axes(ax, stage, frame, metrics, thresholds)
        ax2 = _lr_axes(ax, frame, metrics)
        _checkpoint_marks(ax, entry)
        _attempt_marks(ax, entry)
        if ax2 is not None:
            h2, l2 = ax2.get_legend_handles_labels()
            handles = list(zip(h2, l2))
    verdict = (entry or {}).get("verdict")
    ax.set_title(f"{stage}: {key or 'loss'}" + (f"  —  verdict {verdict}" if verdict else ""), loc="left", y=1.0)
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend([h for h, _ in zip(h1, l1)] + [h for h, _ in handles], l1 + [lab for _, lab in handles],
              loc="upper left", bbox_to_anchor=(1.09, 1.0), fontsize=8, frameon=False)
    for panel_ax, (kind, spec) in zip(axes[1:], panels[1:]):
        _action_axes(panel_ax, *spec, thresholds)
        panel_ax.legend(loc="upper left", bbox_to_anchor=(1.09, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xlabel("step")
    # Fixed margins (the figure size is fixed, the legends sit in the right
    # margin): tight_layout measured every tick label and took most of the time.
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.075, right=0.70, top=1 - 0.4 / height, bottom=0.55 / height,
                        hspace=0.9 / (height / len(panels)))
    return fig


def loss_figure_names(a) -> list[str]:
    """loss_<stage>.png for every stage with a history."""
    return [f"loss_{stage}.png" for stage in a.histories]


def loss_figure(a, doc: dict, name: str):
    """The figure of one stage (`name` from loss_figure_names)."""
    return stage_figure(*figure_inputs(a, doc, name))


def figure_inputs(a, doc: dict, name: str) -> tuple:
    """stage_figure's arguments for one stage: plain data (frames and dicts),
    which a drawing process can receive pickled."""
    stage = name.removeprefix("loss_").removesuffix(".png")
    hist = a.histories[stage]
    dyn = a.histories.get("dynamics")
    dyn_acts = ((a.stats["stages"].get("dynamics") or {}).get("metrics") or {}).get("actions")
    metrics = (a.stats["stages"].get(stage) or {}).get("metrics") or {}
    frozen = None
    if stage == "latent_actions" and dyn is not None and dyn_acts:
        n = dyn_acts.get("n_actions") or (metrics.get("actions") or {}).get("n_actions") \
            or hist.config.get("n_actions")
        frozen = (_plotted(dyn.frame, {}), {**dyn_acts, "n_actions": n})
    if stage == "latent_actions" and metrics.get("actions") and not metrics["actions"].get("n_actions"):
        metrics = {**metrics, "actions": {**metrics["actions"], "n_actions": hist.config.get("n_actions")}}
    return stage, _plotted(hist.frame, metrics), metrics, doc["stages"].get(stage), a.thresholds, frozen


def _plotted(frame: pd.DataFrame, metrics: dict) -> pd.DataFrame:
    """Only the columns a figure draws (the step, the loss, the learning rate
    and the action statistics): a long run's frame has dozens more, and
    these inputs are pickled to the drawing process."""
    keys = ["_step", metrics.get("loss_key"), (metrics.get("learning_rate") or {}).get("key"),
            "action_entropy", "unique_actions"]
    return frame[[k for k in dict.fromkeys(keys) if k and k in frame.columns]]
