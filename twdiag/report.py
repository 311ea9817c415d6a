"""One answer from the parts: per-stage and overall verdicts, run state,
fallbacks, cross-stage facts and prioritised next actions, as a JSON
document, a compact stdout version that is enough to answer from, and a
Markdown report rendered from the JSON alone (so every number in it is in
the JSON).

Verdicts come from findings only (`rules`); actions come from `advice`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from . import __version__, advice, bundle as bundle_mod, checkpoints, fallback as fallback_mod, rules
from .pipeline import Analysis
from .rules import Finding

MAX_COMPACT_FINDINGS = 6
MAX_COMPACT_ACTIONS = 8


def combine(a: Analysis, comparison: dict | None = None) -> dict:
    stages = {stage: stage_entry(a, stage, comparison) for stage in _all_stages(a)}
    _worth_resuming(stages)
    doc = {
        "tool": "twdiag diagnose", "version": __version__,
        "bundle": str(a.bundle.root),
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "judged_at": _iso(a.now),
        "overall": rules.overall_of(stages, a.thresholds),
        "overall_rests_on_unverified": [s for s, e in stages.items() if e["verdict"] == "unverified"],
        "run_status": _current(stages),
        "copied": a.copy.get("copied", False), "copy_evidence": a.copy,
        "stages": stages,
        "cross_stage": a.cross["facts"],
        "checkpoint_dependencies": a.dependencies,
        "torch": checkpoints.torch_version(),
        "deep_mode": a.deep,
        "skipped": a.bundle.skipped, "notes": a.bundle.notes, "errors": a.errors,
        "timings": a.timings,
        "probe": probe_summary(a),
    }
    if comparison is not None:
        doc["comparison"] = comparison
    doc["next_actions"] = advice.next_actions(stages, a.stats, a.thresholds, a.histories)
    return doc


def _all_stages(a: Analysis) -> list[str]:
    present = set(a.stage_names)
    return [*bundle_mod.STAGES, *sorted(present - set(bundle_mod.STAGES))]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stage_entry(a: Analysis, stage: str, comparison: dict | None) -> dict:
    s = a.stats["stages"].get(stage)
    res = a.checkpoints.get(stage)
    v = a.visual_stages.get(stage)
    findings = a.stage_findings(stage)
    findings += ((comparison or {}).get("stages", {}).get(stage) or {}).get("findings", [])
    has_ckpts = bool(res and res.checkpoints)
    has_images = bool(v and v["analysed"])
    probed = ((a.probe or {}).get("stages") or {}).get(stage) or {}
    if not s and not has_ckpts and not has_images and stage in bundle_mod.STAGES:
        sev = a.thresholds["verdict"]["missing_stage"]
        findings = [Finding("stage_missing", sev, stage, None, None, None, [], None,
                            f"no logs, checkpoints or images for {stage}").to_dict()] + findings
        verdict = "missing"
    else:
        enough = (s["verdict"] != "insufficient_data") if s else (has_ckpts or has_images)
        verdict = rules.verdict_of(findings, enough)
        if verdict == "normal" and not s and not has_images and not probed.get("measures"):
            # Intact checkpoints say nothing about how the training went.
            verdict = "unverified"
            findings.append(Finding("stage_unverified", "info", stage, None, None, None, [],
                                    str(res.checkpoints_dir) if res and res.checkpoints_dir else None,
                                    f"{stage} is known only from its checkpoints (intact), not from its training: "
                                    "no W&B log and no image grids. Bring its wandb run and its visualizations/ "
                                    "folder to judge it").to_dict())
    findings = sorted(findings, key=lambda f: rules.SEVERITY_ORDER[f["severity"]])
    fb = a.fallbacks.get(stage)
    return {"verdict": verdict, "status": a.states.get(stage) or {"state": "unknown",
                                                                   "reason": "no W&B log for this stage"},
            "stats": s, "checkpoints": stage_checkpoints(res, fb) if res else None,
            "visuals": v, "findings": findings,
            "fallback": fb and {k: v for k, v in fb.items() if k != "checkpoints"},
            "lineage": a.lineage.get(stage),
            "probe": probed or None,
            "numbers": key_numbers(stage, s, v, a.states.get(stage)),
            "evidence": _evidence(s, res, v)}


def probe_summary(a: Analysis) -> dict:
    """The probe's run (per-stage results sit in each stage's `probe`); when it
    did not run, what "resumable" then means."""
    if a.probe is None:
        return {"ran": False, "reason": "not asked for (--tinyworlds PATH measures the models)",
                "resumable_means": RESUMABLE_WITHOUT_PROBE}
    return {k: v for k, v in a.probe.items() if k != "stages"}


RESUMABLE_WITHOUT_PROBE = ("without the probe, a fallback is intact (certified archive, allowlisted pickles, "
                           "finite tensors) but not loaded into TinyWorlds' classes: `resumable` is not verified")
RESUMABLE_WITH_PROBE = ("`resumable: verified` (the probe): the weights loaded strictly into TinyWorlds' class built "
                        "from the checkpoint's config, and the optimizer state fits the optimizer the config names")


def probe_line(stage: str, p: dict | None) -> str | None:
    """The probe's numbers for one stage, in one line (compact stdout)."""
    if not p:
        return None
    if p.get("error") and not p.get("checkpoints"):
        return f"probe failed: {p['error']}"
    parts = [f"step {c['step']} {'resumable' if c['resumable'] == 'verified' else 'NOT resumable: ' + str(c.get('reason'))}"
             for c in p.get("checkpoints", [])]
    if p.get("measure_error"):
        parts.append(f"not measured: {p['measure_error']}")
    m = p.get("measures") or {}
    at = (p.get("measured_checkpoint") or {}).get("step")
    if stage == "video_tokenizer" and m:
        parts.append(f"at step {at}: recon PSNR {m['psnr_db']:.2f} dB vs mean frame {m['reference_mean_frame_psnr_db']:.2f} dB "
                     f"({m['gain_over_mean_frame_db']:+.2f} dB), SSIM {m['ssim']:.3f}, codes {m['codes']['used']}/{m['codes']['of']}, "
                     f"dead dims {len(m['dead_dims'])}")
    elif stage == "latent_actions" and m:
        mi = m.get("true_actions")
        parts.append(f"at step {at}: actions used {m['usage']['used']}/{m['usage']['of']}, decoder gain inferred vs "
                     f"shuffled actions {m['action_gain_db']:+.3f} dB"
                     + (f", MI with true actions {mi['mi_nats']:.3f} nats (chance {mi['mi_shuffled_nats']:.3f})" if mi else ""))
    elif stage == "dynamics" and m:
        nf = m["next_frame"]
        parts.append(f"at step {at}: next frame {nf['psnr_db']:.2f} dB (copy last {nf['copy_last_psnr_db']:.2f}, tokenizer "
                     f"ceiling {nf['tokenizer_ceiling_psnr_db']:.2f}); "
                     + ("ΔtPSNR " + ", ".join(f"t{r['t']} {r['delta_db']:+.3f}" for r in m["delta_t_psnr"]) + " dB"
                        if m["delta_t_psnr"] else f"ΔtPSNR not applicable: {m.get('delta_t_psnr_not_applicable')}"))
    if p.get("frames"):  # where they came from is said once, in the top-level probe.frames_source
        f = p["frames"]
        parts.append(f"on {f['sequences']} sequences of {f['frames_per_sequence']} frames "
                     f"({'the data file' if f.get('kind') == 'data' else 'recovered from the grids'})")
    return "; ".join(parts)


def _worth_resuming(stages: dict) -> None:
    """An intact fallback is not worth resuming when a stage it was trained on
    (an upstream stage) is critical: it would go on learning from broken inputs."""
    order = [s for s in bundle_mod.STAGES if s in stages]
    for i, stage in enumerate(order):
        fb = stages[stage].get("fallback")
        if not fb:
            continue
        bad = [up for up in order[:i] if stages[up]["verdict"] == "critical"]
        if fb.get("step") is None:
            fb["worth_resuming"], fb["worth_resuming_reason"] = False, "no fallback checkpoint"
        elif bad:
            fb["worth_resuming"] = False
            fb["worth_resuming_reason"] = (f"intact, but retrain after {' and '.join(bad)}: {stage} was trained on "
                                           f"{'them' if len(bad) > 1 else 'it'}, and {'they are' if len(bad) > 1 else 'it is'} critical")
        else:
            fb["worth_resuming"], fb["worth_resuming_reason"] = True, "intact, and every stage it was trained on is not critical"


def stage_checkpoints(res: checkpoints.StageResult, fb: dict | None) -> dict:
    by_status: dict[str, list[int]] = {}
    for c in res.checkpoints:
        by_status.setdefault(c.status, []).append(c.step)
    ref = next((c for c in reversed(res.judged) if c.status == "valid"), None)
    latest = res.latest
    return {
        "checkpoints_dir": str(res.checkpoints_dir) if res.checkpoints_dir else None,
        "total": len(res.checkpoints),
        "valid": len(by_status.get("valid", [])),
        "steps_by_status": {s: checkpoints.steps_text(v) for s, v in by_status.items()},
        "latest": latest.summary() if latest else None,
        "latest_resumable": bool(latest and fb and fb.get("step") == latest.step),
        "in_progress": res.in_progress.step if res.in_progress else None,
        "deep_scanned": [c.step for c in res.checkpoints if c.deep in ("passed", "failed")],
        "problems": [c.summary() for c in res.checkpoints if c.status != "valid"][:20],
        "model": None if ref is None else {k: ref.fact(ref.model_file, k) for k in ("tensors", "elements")},
        "optimizer": None if ref is None else {k: ref.fact("optim_state_dict.pt", k) for k in
                                               ("state_entries", "param_groups", "learning_rates")},
        "state": None if ref is None else {k: ref.fact("state.pt", k) for k in ("step", "timestamp", "scheduler")},
        "extra_files": sorted({f for c in res.checkpoints for f in c.extra_files})[:20],
        "throughput": res.throughput,
        "table": (fb or {}).get("checkpoints", []),
    }


def _evidence(s, res, v) -> dict:
    out = {}
    if s:
        out["wandb_log"] = s["evidence_path"]
    if res is not None and res.checkpoints_dir:
        out["checkpoints_dir"] = str(res.checkpoints_dir)
    if v and v.get("latest"):
        out["latest_image"] = v["latest"]["path"]
    return out


def key_numbers(stage: str, s: dict | None, v: dict | None, state: dict | None) -> dict:
    """The few numbers an agent would quote for a stage."""
    out: dict = {}
    m = (s or {}).get("metrics") or {}
    loss = m.get("loss") or {}
    if m:
        out.update(last_step=m.get("step_max"), n_updates=m.get("n_updates"),
                   loss_first=loss.get("first"), loss_final=loss.get("final"), loss_min=loss.get("min"),
                   late_trend=(loss.get("late_trend") or {}).get("direction"))
        scale = m.get("loss_scale") or {}
        if scale.get("factor", 1) > 1:
            out["loss_scale_factor"] = scale["factor"]
        if m.get("scale", {}).get("late_fraction_of_chance") is not None:
            out["late_fraction_of_chance"] = m["scale"]["late_fraction_of_chance"]
            out["final_fraction_of_chance"] = m["scale"].get("final_fraction_of_chance")
        if loss.get("blowup"):
            b = loss["blowup"]
            out.update(blowup_peak_step=b["peak_step"], blowup_peak_smoothed=b.get("peak"),
                       blowup_raw_peak=b.get("raw_peak"), blowup_raw_peak_step=b.get("raw_peak_step"))
        acts = m.get("actions") or {}
        if acts.get("unique_actions"):
            out["unique_actions_late"] = acts["unique_actions"]["late_mean"]
            out["n_actions"] = acts.get("n_actions")
        if acts.get("entropy"):
            out["entropy_late_fraction"] = acts["entropy"].get("late_normalized")
        lr = m.get("learning_rate") or {}
        if lr:
            out.update(lr_peak=lr.get("max"), lr_current=lr.get("current"))
        tp = m.get("throughput") or {}
        if tp.get("steps_per_s_overall") is not None:
            out["steps_per_s"] = tp.get("steps_per_s_overall")
        elif tp.get("why_not"):
            out["steps_per_s_not_given"] = tp["why_not"]
    if v:
        fid = ((v.get("latest") or {}).get("metrics") or {}).get("fidelity") or {}
        if fid:
            out["latest_image_psnr_db"] = fid.get("psnr_db")
            if fid.get("best_reference"):
                out["latest_image_gain_db"] = fid.get("gain_over_best_reference_db")
                out["latest_image_reference"] = (f"{fid['best_reference']}: "
                                                 f"{fid['reference_psnr_db'][fid['best_reference']]} dB")
        out["image_trend"] = (v.get("trend") or {}).get("trend")
        if (v.get("trend") or {}).get("psnr_delta_db") is not None:
            out["image_trend_db"] = v["trend"]["psnr_delta_db"]
    if state and state.get("seconds_since_last_record") is not None:
        out["seconds_since_last_record"] = state["seconds_since_last_record"]
    return out


def _current(stages: dict) -> dict:
    """The state of the newest stage with a log (training runs in order)."""
    for stage in reversed(list(stages)):
        st = stages[stage].get("status", {})
        if st.get("state") not in (None, "unknown"):
            return {"stage": stage, **st}
    return {"stage": None, "state": "unknown", "reason": "no W&B logs found"}


# --- stdout ----------------------------------------------------------------------------

# What each key number is: raw or smoothed (how), over which window, on which scale.
NUMBERS_LEGEND = {
    "last_step": "the last logged step (the stage's own axis; see attempts)",
    "loss_first / loss_final / loss_min": "raw logged values: the first row, the last row, the lowest row (as logged)",
    "late_trend": "slope of the last 25% of rows, binned medians, counted only beyond 2 standard errors",
    "late_fraction_of_chance": "dynamics: mean of the last third of rows on the real scale / ln(codes)",
    "final_fraction_of_chance": "dynamics: mean of the last 5% of rows on the real scale / ln(codes)",
    "blowup_peak_smoothed": "the rolling median's peak (its rows are in the finding) that decided the blow-up; "
                            "dynamics: real scale (logged x loss_scale_factor)",
    "blowup_raw_peak / blowup_raw_peak_step": "the highest raw row within the blow-up and its step "
                                              "(dynamics: real scale)",
    "unique_actions_late / entropy_late_fraction": "mean of the last third of logged per-batch values "
                                                   "(entropy as a fraction of ln(n_actions))",
    "lr_peak / lr_current": "raw logged learning rate: the maximum, the last",
    "steps_per_s": "(last step - first step) / (last - first history _timestamp), from the records",
    "image_trend / image_trend_db": "the grids' PSNR, mean of the last third of images minus the first third; "
                                    "'improving' from visuals.trend_db",
    "latest_image_psnr_db": "PSNR of the newest grid's outputs against its originals, aligned cells (median)",
    "latest_image_gain_db / latest_image_reference": "that PSNR minus the best of the references from the same "
                                                     "grid (mean frame, background = per-pixel median, black "
                                                     "frame, dynamics: the previous frame copied)",
}


def compact(doc: dict) -> dict:
    """What stdout gets: per stage the verdict, run state, key numbers, the
    fallback with its reason, the top findings; then the top actions. Enough
    to answer from; diagnosis.json has everything. Lists say what they cut."""
    stages = {}
    for s, e in doc["stages"].items():
        top = [f for f in e["findings"] if f["severity"] != "info"]
        fb = e.get("fallback")
        stages[s] = {
            "verdict": e["verdict"], "state": e["status"].get("state"),
            "numbers": e.get("numbers", {}),
            "fallback": None if fb is None else {
                "step": fb.get("step"), "path": fb.get("path"), "restart": fb.get("restart"),
                "reason": fb.get("reason"), "verified": (fb.get("verified") or {}).get("level"),
                "resumable": (fb.get("resumable") or {}).get("status", "not verified (no probe)")
                if fb.get("step") is not None else "no fallback to resume",
                "worth_resuming": fb.get("worth_resuming"), "worth_resuming_reason": fb.get("worth_resuming_reason"),
                "newest_intact": _newest(fb),
                **({"earlier_attempt": {k: fb["earlier_attempt"][k] for k in ("step", "path", "note")}}
                   if fb.get("earlier_attempt") else {})},
            "findings": [{k: f[k] for k in ("rule_id", "severity", "value", "message", "evidence_path")}
                         for f in top[:MAX_COMPACT_FINDINGS]],
            "evidence": e["evidence"],
        }
        if e.get("probe"):
            stages[s]["probe"] = probe_line(s, e["probe"])
        lin = e.get("lineage")
        if lin:
            stages[s]["attempts"] = [attempt_line(x) for x in lin["attempts"]]
            if lin.get("final_checkpoint_saved") is False:
                stages[s]["final_checkpoint_saved"] = False
                stages[s]["steps_not_saved"] = lin.get("steps_not_saved")
        if len(top) > MAX_COMPACT_FINDINGS:
            stages[s]["findings_not_shown"] = len(top) - MAX_COMPACT_FINDINGS
    actions = doc["next_actions"]
    out = {"overall": doc["overall"], "bundle": doc["bundle"], "run_status": doc["run_status"],
           "copied": doc.get("copied"), "stages": stages, "cross_stage": doc["cross_stage"],
           "next_actions": [{k: a[k] for k in ("rank", "severity", "stage", "rule_id", "action")}
                            for a in actions[:MAX_COMPACT_ACTIONS]],
           "skipped": doc["skipped"][:10], "errors": doc.get("errors", [])[:10],
           "outputs": doc.get("outputs", {}), "numbers_legend": NUMBERS_LEGEND}
    if len(actions) > MAX_COMPACT_ACTIONS:
        out["next_actions_not_shown"] = len(actions) - MAX_COMPACT_ACTIONS
    if len(doc["skipped"]) > 10:
        out["skipped_not_shown"] = len(doc["skipped"]) - 10
    if doc.get("notes"):
        out["notes"] = doc["notes"][:10]
    if doc.get("overall_rests_on_unverified"):
        out["overall_rests_on_unverified"] = doc["overall_rests_on_unverified"]
    probe = doc.get("probe") or {}
    out["probe"] = ({k: probe.get(k) for k in ("ran", "tinyworlds", "seconds", "frames_source")} if probe.get("ran")
                    else {"ran": False, "reason": probe.get("reason")})
    return out


def attempt_line(a: dict) -> str:
    """One attempt in a line: what it was, how far it got, how it ended."""
    steps = f"steps {a['first_step']}–{a['last_step']}" if a["rows"] else "no history rows"
    if a["rows"] and a.get("global_first_step") not in (None, a["first_step"]):
        steps += f" (global {a['global_first_step']}–{a['global_last_step']})"
    prog = f" ({a['progress']:.0%} of n_updates {a['n_updates']})" if a.get("progress") is not None else ""
    how = {"first": "first run", "fresh_start": "fresh start", "continuation": "continuation",
           "resume": f"resume from step {(a.get('resumed_from') or {}).get('step')} (weights only, counter reset)"
           }[a["relation"]]
    end = f"{a['state']}" + (f", exit {a['exit_code']}" if a.get("exit_code") is not None else "")
    out = f"attempt {a['index']}: {how}; {steps}{prog}; {end}"
    if a.get("superseded_rows"):
        out += f"; superseded ({a['superseded_rows']} rows): {a['why_superseded']}"
    if a.get("error_lines"):
        out += f"; last error: {a['error_lines'][-1]}"
    return out


def _newest(fb: dict) -> dict | None:
    n = fb.get("newest_intact")
    if not n or n.get("step") == fb.get("step"):
        return None
    return {"step": n["step"], "path": n["path"], "why_not_fallback": n.get("why_not_fallback")}


# --- Markdown (rendered from the JSON document only) -------------------------------------

def _v(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x + 0.0:.{digits}g}"  # + 0.0 turns -0.0 into 0
    return str(x)


def _link(doc: dict, path: str | None) -> str | None:
    """An output path relative to diagnosis.md, so a Markdown preview shows it."""
    md = doc.get("outputs", {}).get("diagnosis_md")
    if not path or not md:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(md).resolve().parent))
    except ValueError:
        return path


def markdown(doc: dict) -> str:
    """diagnosis.md. Every string of the document is made safe first
    (`safetext.markdown`): bundle text cannot forge a section or raw HTML."""
    from .safetext import markdown_doc
    doc = markdown_doc(doc)
    out = [f"# TinyWorlds training diagnosis: **{doc['overall']}**", "",
           f"Bundle `{doc['bundle']}`, judged at {doc['judged_at']} by twdiag {doc['version']}"
           + (" (the bundle is a copy: file times were ignored)" if doc.get("copied") else "") + ".", ""]
    out += (_md_status(doc) + _md_numbers(doc) + _md_visuals(doc) + _md_checkpoints(doc) + _md_probe(doc)
            + _md_verdict(doc))
    if doc.get("comparison"):
        out += _md_comparison(doc["comparison"])
    if doc["skipped"]:
        out += ["## Skipped inputs", ""] + [f"- `{s.get('path')}`: {s.get('reason')}"
                                            for s in doc["skipped"][:30]] + [""]
    if doc.get("errors"):
        out += ["## Errors (the rest of the report still stands)", ""] + [
            f"- {e['step']}: {e['error']}" for e in doc["errors"][:20]] + [""]
    return "\n".join(out)


def _md_probe(doc: dict) -> list[str]:
    probe = doc.get("probe") or {}
    if not probe.get("ran"):
        return [f"Models not measured: {probe.get('reason')}.", ""] if probe.get("reason") else []
    out = [f"### The models, measured (TinyWorlds' classes from `{probe.get('tinyworlds')}`)", "",
           f"Frames: {probe.get('frames_source')}.", ""]
    out += [f"- **{s}**: {probe_line(s, e['probe'])}" for s, e in doc["stages"].items() if e.get("probe")]
    link = _link(doc, (doc.get("outputs") or {}).get("probe_sheet"))
    return out + ([f"", f"![probe sheet]({link})"] if link else []) + [""]


def _md_status(doc: dict) -> list[str]:
    rs = doc["run_status"]
    out = ["## 1. Run status", "",
           f"Current: **{rs['state']}** ({rs.get('stage') or 'no stage'}), from the logs' own records.", "",
           "| stage | verdict | state | exit code | newest record | W&B log |",
           "|---|---|---|---|---|---|"]
    for stage, e in doc["stages"].items():
        st = e["status"]
        out.append(f"| {stage} | {e['verdict']} | {st.get('state')} | {_v(st.get('exit_code'))} | "
                   f"{_v(st.get('last_record_time'))} | `{e['evidence'].get('wandb_log', 'none')}` |")
    out.append("")
    for stage, e in doc["stages"].items():
        lines = lineage_lines(e)
        if lines:
            out += [f"Attempts of {stage} ({e['lineage'].get('steps_axis')}):", ""]
            out += [f"- {line}" for line in lines] + [""]
    return out


def lineage_lines(entry: dict) -> list[str]:
    """A stage's attempts and earlier run roots, one line each, for the
    reports; empty when there was one attempt and no earlier root."""
    lin = entry.get("lineage") or {}
    if lin.get("count", 0) <= 1 and not lin.get("earlier_run_roots"):
        return []
    return ([attempt_line(a) for a in lin.get("attempts", [])]
            + [f"earlier run root {r['run_root']}: {r['checkpoints']} checkpoints, {r['images']} grids "
               "(not judged here)" for r in lin.get("earlier_run_roots", [])])


def _md_numbers(doc: dict) -> list[str]:
    out = ["## 2. Numeric summary by stage", ""]
    for stage, e in doc["stages"].items():
        s = e["stats"]
        out += [f"### {stage} ({e['verdict']})", ""]
        if not s:
            out += ["No W&B history.", ""]
            continue
        m = s["metrics"]
        loss = m.get("loss") or {}
        out += [f"- rows {m.get('rows')}, steps {m.get('step_min')}–{m.get('step_max')}"
                f" of n_updates {_v(m.get('n_updates'))}",
                f"- `{m.get('loss_key')}` (as logged): first {_v(loss.get('first'))}, min {_v(loss.get('min'))} "
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
            factor = (m.get("loss_scale") or {}).get("factor", 1)
            out.append(f"- late mean is {_v(scale['late_fraction_of_chance'])} of chance "
                       f"ln({scale.get('codes')}) = {_v(scale.get('chance_nats'))}"
                       + (f" on the real scale (logged x {factor} accumulation steps)" if factor > 1 else ""))
        acts = m.get("actions") or {}
        if acts.get("entropy") or acts.get("unique_actions"):
            out.append(f"- actions ({acts.get('source', 'own log')}): unique late mean "
                       f"{_v((acts.get('unique_actions') or {}).get('late_mean'))} of {acts.get('n_actions')}, "
                       f"entropy late mean {_v((acts.get('entropy') or {}).get('late_mean'))} "
                       f"(max {_v((acts.get('entropy') or {}).get('max_possible'))})")
        lr = m.get("learning_rate") or {}
        if lr:
            out.append(f"- learning rate: current {_v(lr.get('current'))}, max {_v(lr.get('max'))}, "
                       f"phase {lr.get('phase')}")
        corr = m.get("correlations") or {}
        if corr:
            out.append("- correlations: " + ", ".join(f"{k} {_v(v)}" for k, v in corr.items() if k != "reading"))
        tp = m.get("throughput") or {}
        if tp:
            out.append(f"- throughput: {_v(tp.get('steps_per_s_overall'))} steps/s overall, "
                       f"{_v(tp.get('steps_per_s_recent'))} recent ({tp.get('source')})")
        plot = doc.get("outputs", {}).get("loss_plots", {}).get(stage)
        if plot:
            out += ["", f"![{stage} loss]({_link(doc, plot)})"]
        out.append("")
    return out


def _md_visuals(doc: dict) -> list[str]:
    out = ["## 3. Visual findings", ""]
    sheet = doc.get("outputs", {}).get("contact_sheet")
    if sheet:
        out += [f"![contact sheet]({_link(doc, sheet)})", ""]
    for stage, e in doc["stages"].items():
        v = e["visuals"]
        if not v:
            out.append(f"- {stage}: no images")
            continue
        latest = v.get("latest") or {}
        fid = (latest.get("metrics") or {}).get("fidelity") or {}
        tr = v.get("trend") or {}
        out.append(f"- {stage}: {v['analysed']}/{v['images']} images analysed, trend **{tr.get('trend')}**"
                   + (f" (PSNR by image: {', '.join(_v(p) for p in tr['psnr_db'])} dB)" if tr.get("psnr_db") else "")
                   + f"; latest step {latest.get('step')} flags {latest.get('flags') or 'none'}"
                   + (f", PSNR {_v(fid.get('psnr_db'))} dB, input dependence {_v(fid.get('input_dependence'))}"
                      if fid else "") + f" (`{latest.get('path')}`)")
    return out + [""]


def _md_checkpoints(doc: dict) -> list[str]:
    out = ["## 4. Checkpoint integrity and the fallback", "",
           "| stage | valid / total | latest | fallback | newest intact |", "|---|---|---|---|---|"]
    for stage, e in doc["stages"].items():
        c, fb = e["checkpoints"], e.get("fallback") or {}
        if not c:
            out.append(f"| {stage} | no checkpoints | | | |")
            continue
        latest = c.get("latest") or {}
        newest = fb.get("newest_intact") or {}
        fb_cell = (f"step {fb['step']}: `{fb['path']}` ({(fb.get('verified') or {}).get('level')})" if fb.get("path") else
                   "**none: restart**" if fb.get("restart") else "**none**")
        out.append(f"| {stage} | {c['valid']} / {c['total']} | step {latest.get('step')}: "
                   f"{latest.get('status')} | {fb_cell} | {_v(newest.get('step'))} |")
    for stage, e in doc["stages"].items():
        fb = e.get("fallback") or {}
        if not fb:
            continue
        out += ["", f"- **{stage}**: {fb.get('reason')}"]
        newest = fb.get("newest_intact") or {}
        if newest.get("why_not_fallback"):
            out.append(f"  - newest intact `{newest['path']}` is not the fallback: {newest['why_not_fallback']}")
        rows = (e["checkpoints"] or {}).get("table") or []
        if rows:
            out.append("  - per checkpoint (step: status, loss near it, lr, weights vs earliest): " + "; ".join(
                f"{r['step']}: {r['status']}, {_v(r.get('loss'))}, {_v(r.get('learning_rate'))}, "
                + (f"{_v(r['weights_vs_earliest'])}x" if r.get("weights_vs_earliest") is not None else "n/a")
                for r in rows[:12]))
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
    for a in doc["next_actions"]:
        out.append(f"{a['rank']}. [{a['severity']}, `{a['rule_id']}`, {a['stage']}] {a['action']}")
    return out + [""]


def _md_comparison(cmp: dict) -> list[str]:
    out = ["## Comparison with the baseline", "",
           f"Baselines: {', '.join(f'`{b}`' for b in cmp['baselines']) or 'earlier runs in the same folder'}", ""]
    for stage, body in cmp["stages"].items():
        line = f"- {stage} ({body['verdict']}):"
        if body.get("comparable") is False:
            line += " not comparable: " + "; ".join(body.get("incomparable", []))
        drift = body.get("drift") or {}
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


def fallback_name(fb: dict | None) -> str | None:
    return fallback_mod.path_name(fb) if fb else None
