"""Next actions, in priority order, each conditioned on its evidence.

One action per watch/critical finding (one per `group` of findings that
are the same problem seen several ways), worded from `actions.yaml`. A rule
with variants picks the one its evidence supports: resume from the fallback,
or restart (with the newest intact checkpoint's trade-off in numbers), or
retrain after the upstream stage is fixed; for the action model, "never
learned" (raise the learning rate) against "collapsed after learning"
(lower it). Order: critical before watch; among critical actions the most
upstream stage first, because later stages are built on it; then the
rule's priority. `rank` (and `priority`) is the position, 1..n.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from . import bundle as bundle_mod, stats
from .rules import IMAGE_RULES, SEVERITY_ORDER, read_yaml

ACTIONS_FILE = Path(__file__).with_name("actions.yaml")
MAX_ACTIONS = 12
_SEVERITY = {s: r for s, r in SEVERITY_ORDER.items() if s != "info"}  # actions for watch and critical only
# Actions that stand whatever the data is (with degenerate data, the rest do not).
DATA_INDEPENDENT = {"ckpt_unsafe_pickle", "log_unreadable", "crashed_at_startup", "run_exit_nonzero",
                    "ckpt_invalid_ratio", "ckpt_latest_unusable", "stage_unverified"}


@functools.lru_cache(maxsize=1)
def load_actions() -> dict:
    """The action table, parsed once per process (a --follow run judges every
    poll; the YAML parse was an eighth of a poll). Read-only: do not mutate."""
    with open(ACTIONS_FILE, encoding="utf-8") as fh:
        return read_yaml(fh)["actions"]


class _Safe(dict):
    """str.format_map that leaves unknown placeholders visible, never raises."""

    def __missing__(self, key):
        return "n/a"


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _hours(steps: int | None, rate: float | None) -> str:
    if not steps or not rate:
        return "time unknown"
    h = steps / rate / 3600
    return f"about {h:.1f} h at {rate:.3g} steps/s" if h >= 0.1 else f"about {h * 60:.0f} min at {rate:.3g} steps/s"


def lr_evidence(frame, lr_key: str | None, onset: int | None, lag_rows: int) -> dict:
    """What this run says about its learning rate around an onset.

    TinyWorlds logs `learning_rate/group_*` after `scheduler.step()`, so the lr
    logged at step i is the one the update after it used: the update that
    produced step `onset` used the lr logged at the step before. The highest
    lr the loss stayed stable under is the largest logged before the smoothed
    onset's lag (the onset is read on a rolling median `lag_rows` wide)."""
    if frame is None or not lr_key or onset is None or lr_key not in frame.columns:
        return {}
    s, v = stats.series(frame, lr_key)
    if not len(s):
        return {}
    before = np.flatnonzero(s < onset)
    at = float(v[before[-1]]) if len(before) else float(v[0])
    at_step = int(s[before[-1]]) if len(before) else int(s[0])
    stable = np.flatnonzero(s < onset)[:-lag_rows] if lag_rows else np.flatnonzero(s < onset)
    highest = float(np.max(v[stable])) if len(stable) else None
    return {"lr_at_onset": at, "lr_logged_at_step": at_step,
            "highest_stable_lr": highest, "stable_until_step": int(s[stable[-1]]) if len(stable) else None}


def suggested_lr(ev: dict, peak: float | None, cut: float) -> tuple[float | None, str]:
    """A learning rate below anything this run showed to blow up, and why."""
    if not ev:
        if not peak:
            return None, "no learning rate logged"
        return peak * cut, f"{cut:g}x the peak {peak:.3g}: the log gives no lr at the onset"
    bad = ev["lr_at_onset"]
    value = bad * cut
    why = f"{cut:g}x the lr in force when the loss broke ({bad:.3g}, logged at step {ev['lr_logged_at_step']})"
    stable = ev.get("highest_stable_lr")
    if stable is not None and stable < value:
        value = stable
        why = (f"the highest lr the loss stayed stable under ({stable:.3g}, up to step {ev['stable_until_step']}), "
               f"below {cut:g}x the lr at the break ({bad:.3g})")
    elif stable is not None:
        why += f"; the loss was stable up to lr {stable:.3g} (step {ev['stable_until_step']})"
    return value, why


def stage_context(stage: str, entry: dict, metrics: dict, thresholds: dict, upstream: str | None,
                  frame=None) -> dict:
    """The numbers an action may quote for one stage."""
    fb = entry.get("fallback") or {}
    lr = metrics.get("learning_rate") or {}
    peak = lr.get("max") or lr.get("config_learning_rate")
    onset = (fb.get("onset") or {}).get("step")
    newest = fb.get("newest_intact") or {}
    table = {row["step"]: row for row in fb.get("checkpoints", [])}
    loss = metrics.get("loss") or {}
    rate = (metrics.get("throughput") or {}).get("steps_per_s_overall")
    acts = metrics.get("actions") or {}
    var = acts.get("encoder_variance") or {}
    rows = len(frame) if frame is not None else 0
    lag = max(int(thresholds["loss"]["onset_min_rows"]), int(rows * thresholds["loss"]["smooth_fraction"]))
    ev = lr_evidence(frame, lr.get("key"), onset, lag)
    lower, lower_why = suggested_lr(ev, peak, thresholds["advice"]["lr_cut"])
    lr_at_onset = ev.get("lr_at_onset")
    saved = ((entry.get("checkpoints") or {}).get("optimizer") or {}).get("learning_rates") or []
    ctx = {
        "stage": stage,
        "fallback": f"{Path(fb['path']).name} (step {fb['step']})" if fb.get("path") else None,
        "newest_intact": f"{Path(newest['path']).name} (step {newest['step']})" if newest else None,
        "newest_loss": _fmt((table.get(newest.get("step")) or {}).get("loss")),
        "best_loss": _fmt(metrics.get("loss", {}).get("best_level") or loss.get("min")),
        "onset_step": onset, "onset_rule": (fb.get("onset") or {}).get("rule_id"),
        "peak_lr": _fmt(peak), "lower_lr": _fmt(lower) if lower else "n/a",
        "lr_reason": lower_why,
        "lr_at_onset": _fmt(lr_at_onset),
        "save_fix": _save_fix(entry),
        # "a larger n_actions" only when the model already uses every code it has
        "more_actions": ", or a larger n_actions (it uses all of its codes)" if (
            (acts.get("pooled") or {}).get("n_codes_used") and acts.get("n_actions")
            and acts["pooled"]["n_codes_used"] >= acts["n_actions"]) else "",
        "saved_lr": (f" The checkpoints' optimizer state still holds lr {_fmt(saved[0])}: TinyWorlds' checkpoint= "
                     "loads weights only, so set learning_rate in the config; a loader that restores the optimizer "
                     "or scheduler state would bring the old rate back." if saved and saved[0] else ""),
        "steps_kept": f"{newest['step']:,}" if newest else "n/a",
        "hours_kept": _hours(newest.get("step"), rate),
        "upstream": upstream,
        "enc_var_first": _fmt(var.get("first")), "enc_var_max": _fmt(var.get("max")),
        "lam_lr": _fmt(peak),
    }
    floor = thresholds["stages"]["latent_actions"]["encoder_variance_floor"]
    ctx["_never_learned"] = bool(var) and (var.get("max") or 0) < floor
    ctx["_fallback"] = bool(fb.get("path"))
    ctx["_newest"] = bool(newest)
    return ctx


def _save_fix(entry: dict) -> str:
    """What the broken checkpoints say about how they were saved."""
    statuses = set(((entry.get("checkpoints") or {}).get("steps_by_status") or {}))
    fixes = []
    if "empty" in statuses:
        fixes.append("save on rank 0 only (the empty files are complete zips holding {}: a wrong object was "
                     "saved, by a rank without the weights, not a torn write)")
    if statuses & {"truncated", "corrupt", "missing_files"}:
        fixes.append("write atomically (a temp file, then rename): some files are cut short or incomplete")
    return "; and ".join(fixes) or "check how the checkpoints are written"


def _variant(rule: str, spec: dict, ctx: dict, finding: dict) -> str | None:
    variants = spec.get("variants")
    if not variants:
        return None
    if rule in ("action_collapse", "lam_variance_penalty"):
        return "never_learned" if ctx["_never_learned"] else "collapsed"
    if rule == "ckpt_latest_unusable":
        return "fallback" if ctx["_fallback"] else "no_fallback"
    if finding["severity"] == "watch" and "watch" in variants:
        return "watch"
    if ctx["upstream"]:
        return "after_upstream"
    if ctx["_fallback"]:
        return "resume"
    return "restart_or_newest" if ctx["_newest"] else "restart"


def _upstream_critical(stage: str, stages: dict) -> str | None:
    order = bundle_mod.STAGES
    if stage not in order:
        return None
    for up in order[:order.index(stage)]:
        if (stages.get(up) or {}).get("verdict") == "critical":
            return up
    return None


def next_actions(stages: dict, stats_doc: dict, thresholds: dict, histories: dict | None = None) -> list[dict]:
    table = load_actions()
    items = []
    for stage, entry in stages.items():
        metrics = ((stats_doc.get("stages") or {}).get(stage) or {}).get("metrics") or {}
        frame = histories[stage].frame if histories and stage in histories else None
        ctx = stage_context(stage, entry, metrics, thresholds, _upstream_critical(stage, stages), frame)
        groups: dict[str, dict] = {}
        seen = set()
        for f in sorted(entry["findings"], key=lambda f: (_SEVERITY.get(f["severity"], 9),
                                                          table.get(f["rule_id"], {}).get("priority", 50))):
            asks = table.get(f["rule_id"], {}).get("info_action") and f["severity"] == "info"
            if (f["severity"] not in _SEVERITY and not asks) or f["rule_id"] in seen:
                continue
            seen.add(f["rule_id"])
            spec = table.get(f["rule_id"], {"priority": 50, "action": "Investigate: {message}"})
            group = spec.get("group")
            if stage == "latent_actions" and ctx["_never_learned"] and f["rule_id"] in IMAGE_RULES:
                # Its images ignore their inputs because it never learned: the
                # cure is the "train it harder" action, not a lower learning rate.
                group = "lam"
            if group and group in groups:
                groups[group]["_also"].append(f["rule_id"])
                continue
            item = {"severity": f["severity"] if not asks else "watch", "stage": stage, "rule_id": f["rule_id"],
                    "evidence_path": f["evidence_path"], "_spec": spec, "_finding": f, "_also": [],
                    "_priority": spec["priority"]}
            items.append(item)
            if group:
                groups[group] = item
        for item in [i for i in items if i["stage"] == stage]:
            f, spec = item["_finding"], item["_spec"]
            variant = _variant(f["rule_id"], spec, ctx, f)
            template = spec["variants"][variant] if variant else spec["action"]
            also = f" (Also seen: {', '.join(item['_also'])}.)" if item["_also"] else ""
            # The step this rule's own problem began ("blew up at step 8"), not
            # the stage's earliest onset, which may belong to another rule.
            own_onset = ((entry.get("fallback") or {}).get("onsets") or {}).get(f["rule_id"], ctx["onset_step"])
            item["action"] = template.format_map(_Safe(
                {k: (v if v is not None else "n/a") for k, v in ctx.items() if not k.startswith("_")},
                onset_step=own_onset if own_onset is not None else "n/a",
                value=_fmt(f["value"]), evidence=f["evidence_path"], message=f["message"], also=also,
                fallback=ctx["fallback"] or "no checkpoint (none qualifies)"))
            if variant:
                item["variant"] = variant
            if item["_also"]:
                item["also"] = item["_also"]
    if any(i["rule_id"] == "data_degenerate" for i in items):
        # Broken data explains the rest: keep only what does not depend on it
        # (unsafe files, unreadable logs, crashes); say what it covers.
        keep = DATA_INDEPENDENT | {"data_degenerate"}
        covered = sorted({i["rule_id"] for i in items if i["rule_id"] not in keep})
        items = [i for i in items if i["rule_id"] in keep]
        for i in items:
            if i["rule_id"] == "data_degenerate" and covered:
                i["action"] += f" (Covers: {', '.join(covered)}.)"
                i["also"] = covered
    order = {s: i for i, s in enumerate(bundle_mod.STAGES)}
    items.sort(key=lambda a: (_SEVERITY[a["severity"]],
                              order.get(a["stage"], 9) if a["severity"] == "critical" else 0,
                              a["_priority"], order.get(a["stage"], 9)))
    out = []
    for rank, a in enumerate(items[:MAX_ACTIONS], 1):
        out.append({"rank": rank, "priority": rank, **{k: v for k, v in a.items() if not k.startswith("_")}})
    return out
