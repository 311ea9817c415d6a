"""One answer from the parts: stats, checkpoints and visuals combined into
per-stage and overall verdicts, run status, cross-stage facts, prioritised
next actions, a Markdown report and loss-curve plots.

Verdicts come from findings only (`rules`); actions come from
`actions.yaml`, one per watch/critical finding. The Markdown is rendered
from the JSON document alone, so every number in it is in the JSON.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from . import __version__, bundle, checkpoints, export, outputs, rules, stats, visuals
from .rules import Finding

ACTIONS_FILE = Path(__file__).with_name("actions.yaml")
MAX_ACTIONS = 12


def load_actions() -> dict:
    with open(ACTIONS_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)["actions"]


# --- gathering ------------------------------------------------------------------------

def diagnose(root: Path, thresholds: dict, explicit: dict | None = None, now: float | None = None,
             deep: str = "auto", count: int | None = None, progress=outputs.log,
             baselines: list[Path] | None = None, results: Path | None = None) -> dict:
    """Run every analysis on a bundle and combine them; returns
    {"doc": full JSON document, "histories": ..., "sheet": PIL image or None,
    "figures": comparison overlays}. With `baselines`, the comparison's
    findings join each stage's findings (and so its verdict). `results`
    overrides where checkpoints and images are read (a run root or stage dir)."""
    started = time.perf_counter()
    timings = {}
    progress("stats: decoding logs and analysing history")
    t = time.perf_counter()
    stats_doc, histories = stats.analyse_paths([root], explicit or {}, thresholds, now)
    timings["stats_s"] = round(time.perf_counter() - t, 3)
    progress("checkpoints: structure, pickles, deep scan of the newest valid")
    t = time.perf_counter()
    ck = checkpoints.analyse([results or root], thresholds, deep, now=now)
    timings["checkpoints_s"] = round(time.perf_counter() - t, 3)
    progress("visuals: image grids and contact sheet")
    t = time.perf_counter()
    vis = visuals.analyse([results or root], thresholds, count)
    timings["visuals_s"] = round(time.perf_counter() - t, 3)
    cmp = None
    if baselines:
        from . import compare
        progress("compare: against the baseline run(s)")
        t = time.perf_counter()
        decoded = {s: export.StageRuns(s, h.logs) for s, h in histories.items()}  # decode once
        cmp = compare.compare(root, baselines, thresholds, count or thresholds["visuals"]["sheet_count"],
                              current_runs=decoded)
        timings["compare_s"] = round(time.perf_counter() - t, 3)
    doc = combine(root, stats_doc, ck["doc"], vis["doc"], thresholds,
                  cmp["doc"] if cmp else None)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    doc["timings"] = timings
    return {"doc": doc, "histories": histories, "sheet": vis["sheet"],
            "checkpoint_details": ck["details"], "image_details": vis["details"],
            "figures": cmp["figures"] if cmp else {}, "compare_sheet": cmp["sheet"] if cmp else None}


def combine(root: Path, st: dict, ck: dict, vis: dict, thresholds: dict, cmp: dict | None = None) -> dict:
    stages = {}
    extra = {s: v["findings"] for s, v in (cmp or {}).get("stages", {}).items()}
    for stage in bundle.STAGES:
        s, c, v = st["stages"].get(stage), ck["stages"].get(stage), vis["stages"].get(stage)
        stages[stage] = stage_entry(stage, s, c, v, thresholds, extra.get(stage, []))
    for stage in set(st["stages"]) | set(ck["stages"]) | set(vis["stages"]):
        if stage not in stages:  # unknown-stage inputs are kept, not judged silently
            stages[stage] = stage_entry(stage, st["stages"].get(stage), ck["stages"].get(stage),
                                        vis["stages"].get(stage), thresholds)
    doc = {
        "tool": "twdiag diagnose", "version": __version__,
        "bundle": str(root),
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "overall": rules.overall_of(stages, thresholds),
        "run_status": current_status(stages),
        "stages": stages,
        "cross_stage": cross_stage_facts(stages, ck),
        "checkpoint_dependencies": ck.get("dependencies", []),
        "torch": ck.get("torch"), "deep_mode": ck.get("deep_mode"),
        "skipped": st.get("skipped", []) + vis.get("skipped", []),
    }
    if cmp is not None:
        doc["comparison"] = cmp
    doc["next_actions"] = next_actions(stages)
    return doc


def stage_entry(stage: str, s: dict | None, c: dict | None, v: dict | None, thresholds: dict,
                extra: list[dict] = ()) -> dict:
    findings = [f for part in (s, c, v) if part for f in part["findings"]] + list(extra)
    has_ckpts = bool(c and c["total"])
    has_images = bool(v and v["analysed"])
    if not s and not has_ckpts and not has_images:
        sev = thresholds["verdict"]["missing_stage"]
        findings = [Finding("stage_missing", sev, stage, None, None, None, [], None,
                            f"no logs, checkpoints or images for {stage}").to_dict()]
        verdict = "missing"
    else:
        enough = (s["verdict"] != "insufficient_data") if s else (has_ckpts or has_images)
        verdict = rules.verdict_of(findings, enough)
    findings = sorted(findings, key=lambda f: {"critical": 0, "watch": 1, "info": 2}[f["severity"]])
    return {"verdict": verdict, "status": run_status(s), "stats": s, "checkpoints": c,
            "visuals": v, "findings": findings,
            "fallback": (c or {}).get("recommended_fallback"),
            "evidence": evidence_paths(s, c, v)}


def evidence_paths(s: dict | None, c: dict | None, v: dict | None) -> dict:
    out = {}
    if s:
        out["wandb_log"] = s["evidence_path"]
    if c:
        out["checkpoints_dir"] = c["checkpoints_dir"]
    if v and v.get("latest"):
        out["latest_image"] = v["latest"]["path"]
    return out


def run_status(s: dict | None) -> dict:
    """live | finished | crashed | stalled | unknown, from the exit record,
    file mtimes and the last history time."""
    if not s:
        return {"state": "unknown", "reason": "no W&B log for this stage"}
    m = s["metrics"]
    live = m.get("liveness") or {}
    if live.get("status") == "finished":
        state = "finished" if not live.get("exit_code") else "crashed"
    elif live.get("state") == "live":
        state = "live"
    elif live.get("state") == "stalled_or_crashed":
        state = "stalled_or_crashed"
    else:
        state = "unknown"
    return {"state": state, "exit_code": live.get("exit_code"), "last_step": m.get("step_max"),
            "n_updates": m.get("n_updates"), "progress_fraction": m.get("progress_fraction"),
            "last_history_time": _iso(live.get("last_history_time")),
            "seconds_since_file_write": live.get("seconds_since_file_write")}


def _iso(ts) -> str | None:
    if not isinstance(ts, (int, float)):
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_status(stages: dict) -> dict:
    """The status of the newest stage with a log (training runs in order)."""
    for stage in reversed(bundle.STAGES):
        st = stages.get(stage, {}).get("status", {})
        if st.get("state") not in (None, "unknown"):
            return {"stage": stage, **st}
    return {"stage": None, "state": "unknown", "reason": "no W&B logs found"}


# --- cross-stage ----------------------------------------------------------------------------

def cross_stage_facts(stages: dict, ck: dict) -> list[str]:
    facts = []
    dyn = stages.get("dynamics", {})
    corr = ((dyn.get("stats") or {}).get("metrics") or {}).get("correlations") or {}
    dyn_ids = {f["rule_id"] for f in dyn.get("findings", [])}
    # In a healthy run loss and a decaying lr fall together; the reading only
    # means something when the loss is going the wrong way.
    if corr.get("reading") and dyn_ids & {"loss_divergence", "loss_rising", "dynamics_near_chance"}:
        facts.append(f"dynamics: the divergence {corr['reading'].replace('loss ', '', 1)}")
    lam_ids = {f["rule_id"] for f in stages.get("latent_actions", {}).get("findings", [])}
    if "action_collapse" in lam_ids and dyn.get("verdict") not in (None, "missing"):
        facts.append("latent_actions collapsed to one action, so dynamics is trained on actions that "
                     "carry no information: fix latent_actions first")
    tok = stages.get("video_tokenizer", {})
    if tok.get("verdict") == "critical" and any(
            stages.get(s, {}).get("verdict") not in (None, "missing") for s in ("latent_actions", "dynamics")):
        facts.append("video_tokenizer is critical and later stages depend on its codes: "
                     "their results are suspect until it is fixed")
    for dep in ck.get("dependencies", []):
        if dep.get("resolved") and dep.get("how") != "as recorded":
            facts.append(f"dynamics' {dep['key']} was recorded as {dep['recorded']} and found at "
                         f"{dep['resolved']} ({dep['how']}); status {dep['status']}")
    return facts


# --- next actions ----------------------------------------------------------------------------

def next_actions(stages: dict) -> list[dict]:
    table = load_actions()
    order = {"critical": 0, "watch": 1}
    items, seen = [], set()
    for stage, entry in stages.items():
        fb = entry.get("fallback")
        fallback = f"{Path(fb['path']).name} (step {fb['step']})" if fb else "the newest valid checkpoint"
        for f in entry["findings"]:
            if f["severity"] not in order or (f["rule_id"], stage) in seen:
                continue
            seen.add((f["rule_id"], stage))
            spec = table.get(f["rule_id"], {"priority": 50, "action": "Investigate: {message}"})
            text = spec["action"].format(stage=stage, fallback=fallback, value=f["value"],
                                         evidence=f["evidence_path"], message=f["message"])
            items.append({"severity": f["severity"], "priority": spec["priority"], "stage": stage,
                          "rule_id": f["rule_id"], "action": text,
                          "evidence_path": f["evidence_path"]})
    stage_rank = {s: i for i, s in enumerate(bundle.STAGES)}
    items.sort(key=lambda a: (order[a["severity"]], a["priority"], stage_rank.get(a["stage"], 9)))
    return items[:MAX_ACTIONS]


def compact(doc: dict) -> dict:
    """What stdout gets: verdicts, the fallbacks and the actions, with paths."""
    return {
        "overall": doc["overall"], "bundle": doc["bundle"], "run_status": doc["run_status"],
        "stages": {s: {"verdict": e["verdict"], "status": e["status"]["state"],
                       "fallback": e["fallback"], "evidence": e["evidence"],
                       "findings": [{k: f[k] for k in ("rule_id", "severity", "value", "message",
                                                          "evidence_path")}
                                    for f in e["findings"] if f["severity"] != "info"][:6]}
                   for s, e in doc["stages"].items()},
        "cross_stage": doc["cross_stage"], "next_actions": doc["next_actions"],
        "skipped": doc["skipped"][:20], "outputs": doc.get("outputs", {}),
    }


# --- Markdown (rendered from the JSON document only) -------------------------------------

def _v(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x + 0.0:.{digits}g}"  # + 0.0 turns -0.0 into 0
    return str(x)


def markdown(doc: dict) -> str:
    out = [f"# TinyWorlds training diagnosis: **{doc['overall']}**", "",
           f"Bundle `{doc['bundle']}`, generated {doc['generated_at']} by twdiag {doc['version']}.", ""]
    out += _md_status(doc) + _md_numbers(doc) + _md_visuals(doc) + _md_checkpoints(doc) + _md_verdict(doc)
    if doc.get("comparison"):
        out += _md_comparison(doc["comparison"])
    if doc["skipped"]:
        out += ["## Skipped inputs", ""] + [f"- `{s.get('path')}`: {s.get('reason')}"
                                            for s in doc["skipped"][:30]] + [""]
    return "\n".join(out)


def _md_status(doc: dict) -> list[str]:
    rs = doc["run_status"]
    out = ["## 1. Run status", "",
           f"Current: **{rs['state']}** ({rs.get('stage') or 'no stage'}).", "",
           "| stage | status | exit code | last step | n_updates | last history row | W&B log |",
           "|---|---|---|---|---|---|---|"]
    for stage, e in doc["stages"].items():
        st = e["status"]
        out.append(f"| {stage} | {st['state']} | {_v(st.get('exit_code'))} | {_v(st.get('last_step'))} | "
                   f"{_v(st.get('n_updates'))} | {_v(st.get('last_history_time'))} | "
                   f"`{e['evidence'].get('wandb_log', 'none')}` |")
    return out + [""]


def _md_numbers(doc: dict) -> list[str]:
    out = ["## 2. Numeric summary by stage", ""]
    for stage, e in doc["stages"].items():
        s = e["stats"]
        if not s:
            out += [f"### {stage}", "", "No W&B history.", ""]
            continue
        m = s["metrics"]
        loss = m.get("loss") or {}
        out += [f"### {stage} ({s['verdict']})", "",
                f"- rows {m.get('rows')}, steps {m.get('step_min')}–{m.get('step_max')}"
                f" of n_updates {_v(m.get('n_updates'))}",
                f"- `{m.get('loss_key')}`: first {_v(loss.get('first'))}, min {_v(loss.get('min'))} "
                f"(step {_v(loss.get('min_step'))}), median {_v(loss.get('median'))}, "
                f"final {_v(loss.get('final'))}; early/mid/late means {_v(loss.get('early_mean'))} / "
                f"{_v(loss.get('mid_mean'))} / {_v(loss.get('late_mean'))}"]
        if loss.get("windows"):
            out.append("- window means: " + ", ".join(_v(w["mean"]) for w in loss["windows"]))
        trend = loss.get("late_trend") or {}
        if trend:
            out.append(f"- late trend: {trend.get('direction')} "
                       f"({_v(trend.get('slope_log_per_1k_steps'))} log-loss per 1k steps)")
        scale = m.get("scale") or {}
        if scale.get("late_fraction_of_chance") is not None:
            out.append(f"- late mean is {_v(scale['late_fraction_of_chance'])} of chance "
                       f"ln({scale.get('codes')}) = {_v(scale.get('chance_nats'))}")
        acts = m.get("actions") or {}
        if acts.get("entropy"):
            out.append(f"- actions: unique late mean {_v(acts['unique_actions'].get('late_mean'))} "
                       f"of {acts.get('n_actions')}, entropy late mean {_v(acts['entropy'].get('late_mean'))} "
                       f"(max {_v(acts['entropy'].get('max_possible'))})")
        lr = m.get("learning_rate") or {}
        if lr:
            out.append(f"- learning rate: current {_v(lr.get('current'))}, max {_v(lr.get('max'))}, "
                       f"phase {lr.get('phase')}")
        corr = m.get("correlations") or {}
        if corr:
            out.append("- correlations: " + ", ".join(f"{k} {_v(v)}" for k, v in corr.items()
                                                      if k != "reading"))
        tp = m.get("throughput") or {}
        if tp:
            out.append(f"- throughput: {_v(tp.get('steps_per_s_overall'))} steps/s overall, "
                       f"{_v(tp.get('steps_per_s_recent'))} recent")
        plot = doc.get("outputs", {}).get("loss_plots", {}).get(stage)
        if plot:
            out.append(f"- loss curve: `{plot}`")
        out.append("")
    return out


def _md_visuals(doc: dict) -> list[str]:
    out = ["## 3. Visual findings", ""]
    sheet = doc.get("outputs", {}).get("contact_sheet")
    if sheet:
        out += [f"Contact sheet: `{sheet}`", ""]
    for stage, e in doc["stages"].items():
        v = e["visuals"]
        if not v:
            out.append(f"- {stage}: no images")
            continue
        latest = v.get("latest") or {}
        fid = (latest.get("metrics") or {}).get("fidelity") or {}
        tr = v.get("trend") or {}
        out.append(f"- {stage}: {v['analysed']}/{v['images']} images analysed, trend **{tr.get('trend')}**"
                   + (f" (PSNR {_v(tr.get('psnr_early_db'))} → {_v(tr.get('psnr_late_db'))} dB)"
                      if tr.get("psnr_delta_db") is not None else "")
                   + f"; latest step {latest.get('step')} flags {latest.get('flags') or 'none'}"
                   + (f", PSNR {_v(fid.get('psnr_db'))} dB, input dependence {_v(fid.get('input_dependence'))}"
                      if fid else "") + f" (`{latest.get('path')}`)")
    return out + [""]


def _md_checkpoints(doc: dict) -> list[str]:
    out = ["## 4. Checkpoint integrity", "",
           "| stage | valid / total | latest | newest valid | recommended fallback |",
           "|---|---|---|---|---|"]
    for stage, e in doc["stages"].items():
        c = e["checkpoints"]
        if not c:
            out.append(f"| {stage} | no checkpoints | | | |")
            continue
        latest = c.get("latest") or {}
        fb = c.get("recommended_fallback")
        out.append(f"| {stage} | {c['valid']} / {c['total']} | step {latest.get('step')}: "
                   f"{latest.get('status')} | {_v(c.get('newest_valid'))} | "
                   + (f"`{fb['path']}` ({fb['verified']})" if fb else "**none**") + " |")
    for dep in doc.get("checkpoint_dependencies", []):
        out.append(f"\n- dynamics `{dep['key']}` → `{dep['resolved'] or dep['recorded']}` "
                   f"({dep['how']}; {dep['status'] or 'not found'})")
    return out + [""]


def _md_verdict(doc: dict) -> list[str]:
    out = ["## 5. Verdict and next actions", "", f"Overall: **{doc['overall']}**", ""]
    for stage, e in doc["stages"].items():
        out.append(f"- **{stage}: {e['verdict']}**")
        for f in e["findings"]:
            if f["severity"] != "info":
                out.append(f"  - `{f['rule_id']}` ({f['severity']}): {f['message']} "
                           f"[value {_v(f['value'])}, threshold {_v(f['threshold'])}]"
                           + (f" — `{f['evidence_path']}`" if f.get("evidence_path") else ""))
    if doc["cross_stage"]:
        out += ["", "Cross-stage:", ""] + [f"- {x}" for x in doc["cross_stage"]]
    out += ["", "Next actions, in priority order:", ""]
    if not doc["next_actions"]:
        out.append("1. None needed: keep training and re-run this check.")
    for i, a in enumerate(doc["next_actions"], 1):
        out.append(f"{i}. [{a['severity']}, `{a['rule_id']}`, {a['stage']}] {a['action']}")
    return out + [""]


def _md_comparison(cmp: dict) -> list[str]:
    out = ["## Comparison with the baseline", "", f"Baselines: {', '.join(f'`{b}`' for b in cmp['baselines']) or 'earlier runs in the same folder'}", ""]
    for stage, body in cmp["stages"].items():
        drift = body.get("drift") or {}
        line = f"- {stage} ({body['verdict']}):"
        if drift:
            line += (f" common steps {drift['common_steps'][0]}–{drift['common_steps'][1]}, onset "
                     f"{_v(drift['onset_step'])}, late ratio {_v(drift['late_ratio'])}x")
        tp = body.get("throughput") or {}
        if tp:
            line += f"; throughput {_v(tp['ratio'])}x"
        diff = body.get("config_diff") or []
        if diff:
            line += "; config: " + ", ".join(f"{d['key']} {d['baseline']} -> {d['current']}" for d in diff[:5])
        out.append(line)
        out += [f"  - {n}" for n in body.get("notes", [])]
    return out + [""]
