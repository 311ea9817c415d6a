"""What one stage's evidence means for another.

- The frozen action model's statistics, logged by dynamics at every step,
  judge `latent_actions` when that stage's own log has too few action points
  (they are the trained action model's level; action problems belong to
  `latent_actions`, never to dynamics).
- A critical upstream stage makes the stages trained on it `watch`
  (`upstream_*`): their own training may be fine, but they learned from
  broken inputs and must be retrained once the upstream stage is fixed. It
  never moves their fallback.
- A stage with checkpoints or images but an unreadable log cannot be normal.
- Images are read by what their stage can show (`reconcile_visuals`): the
  tokenizer's reconstruction fidelity is a finding of its own; dynamics'
  predictions are decoded by that tokenizer, so when its fidelity is low their
  image findings are `info` ("limited by the tokenizer"); and when the dynamics
  loss says the model predicts masked tokens well, input-independent-looking
  images alone cannot make it critical (at most `watch`, both numbers stated).
- Facts worth stating: the divergence tracks the learning rate, not the
  action model; recorded upstream paths found by suffix.
"""
from __future__ import annotations

from . import stats
from .rules import IMAGE_RULES, Finding

UPSTREAM = {"latent_actions": ("video_tokenizer",), "dynamics": ("video_tokenizer", "latent_actions")}


def _critical(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["severity"] == "critical"]


def frozen_action_findings(a) -> list[Finding]:
    """latent_actions judged from dynamics' log of the frozen action model."""
    dyn = (a.stats["stages"].get("dynamics") or {}).get("metrics", {})
    frozen = dyn.get("actions")
    if not frozen or frozen.get("points", 0) < a.thresholds["data"]["min_action_points"]:
        return []
    own = ((a.stats["stages"].get("latent_actions") or {}).get("metrics", {}).get("actions") or {})
    if own.get("judged"):
        return []
    frozen = dict(frozen)
    if not frozen.get("n_actions"):
        lam_cfg = a.histories["latent_actions"].config if "latent_actions" in a.histories else {}
        frozen["n_actions"] = lam_cfg.get("n_actions")
    evidence = a.stats["stages"]["dynamics"]["evidence_path"]
    for f in (a.stats["stages"].get("latent_actions") or {}).get("findings", []):
        if f["rule_id"] == "action_stats_sparse":  # too few here, but judged below from dynamics' log
            f["message"] += (f"; judged instead from dynamics' log of the frozen action model "
                             f"({frozen['points']} points)")
    source = (f"the frozen action model as logged by dynamics, {frozen['points']} points; "
              f"the action model's own log has {own.get('points', 0)}")
    return stats.action_findings(frozen, a.thresholds, "latent_actions", evidence, source, frozen=True)


def unreadable_log_findings(a) -> list[Finding]:
    bad = [s for s in a.bundle.skipped if s.get("kind") == "wandb_log"]
    out = []
    for stage, art in a.bundle.stages.items():
        if not bad or stage in a.histories or not (art.checkpoints or art.images):
            continue
        mine = [s for s in bad if s.get("stage") in (None, stage)]
        if mine:
            out.append(Finding("log_unreadable", "watch", stage, "wandb_log", len(mine), 0, [],
                               mine[0]["path"],
                               f"{stage} has checkpoints or images but no readable W&B log; "
                               f"{len(mine)} log(s) in the bundle could not be read ({mine[0]['path']}: "
                               f"{mine[0]['reason']}): its training curve cannot be judged"))
    return out


def upstream_findings(a, extra: list[Finding]) -> list[Finding]:
    """Downstream stages trained on a critical upstream stage: `watch`."""
    out = []
    present = set(a.stage_names)
    for stage, ups in UPSTREAM.items():
        if stage not in present:
            continue
        for up in ups:
            crit = _critical(a.stage_findings(up) + [f.to_dict() for f in extra if f.stage == up])
            crit = [f for f in crit if not f["rule_id"].startswith(("ckpt_", "upstream_"))]
            if not crit:
                continue
            rules = sorted({f["rule_id"] for f in crit})
            out.append(Finding(f"upstream_{up}_critical", "watch", stage, "upstream_verdict", up, "normal",
                               [], crit[0]["evidence_path"],
                               f"{stage} was trained on a {up} that is critical ({', '.join(rules)}): "
                               f"whatever {stage} learned, it learned from broken inputs; retrain it once "
                               f"{up} is fixed"))
    return out


# --- images, read by what each stage can show -------------------------------------

def tokenizer_fidelity(a) -> dict | None:
    """Late reconstruction quality of the tokenizer's own grids, against its
    first image and against the fidelity floor."""
    v = a.visual_stages.get("video_tokenizer")
    if not v or not v.get("trend") or not v["trend"].get("psnr_db"):
        return None
    tr, t = v["trend"], a.thresholds["visuals"]
    psnr = tr["psnr_db"]
    late = tr["psnr_late_db"]
    fid = ((v.get("latest") or {}).get("metrics") or {}).get("fidelity") or {}
    dep = fid.get("input_dependence")
    reasons = []
    if len(psnr) >= 2 and late - psnr[0] < t["recon_min_gain_db"]:
        gain = late - psnr[0]
        reasons.append(f"late PSNR {late:.1f} dB rose only {gain:+.1f} dB above the first image's "
                       f"{psnr[0]:.1f} dB, under the {t['recon_min_gain_db']} dB a tokenizer needs"
                       + (f" (the image trend reads 'improving' from {t['trend_db']} dB; that is not enough here)"
                          if gain >= t["trend_db"] else ""))
    if late < t["recon_floor_db"]:
        reasons.append(f"late PSNR {late:.1f} dB is under the {t['recon_floor_db']} dB floor (a flat grey "
                       "frame scores about 6.5 dB on these frames)")
    if dep is not None and dep < t["recon_min_input_dependence"]:
        reasons.append(f"the latest reconstructions barely follow their inputs (input dependence "
                       f"{dep:.3f} < {t['recon_min_input_dependence']})")
    return {"late_psnr_db": late, "first_psnr_db": psnr[0], "input_dependence": dep,
            "low": bool(reasons), "reasons": reasons, "evidence": (v.get("latest") or {}).get("path"),
            "steps": tr.get("steps", [])}


def _loss_plateau(a, stage: str) -> str | None:
    """'the loss flattened by step N' when it reached its final level early."""
    m = (a.stats["stages"].get(stage) or {}).get("metrics") or {}
    w = [x["mean"] for x in (m.get("loss") or {}).get("windows", []) if x.get("mean")]
    frac = a.thresholds["visuals"]["recon_plateau_fraction"]
    if len(w) >= 3 and w[1] <= w[-1] * (1 + frac):
        return (f"and its loss flattened early (window means {', '.join(str(x) for x in w)}: the second "
                f"window is already within {frac:.0%} of the last)")
    return None


def _dynamics_learns(a) -> tuple[bool, str]:
    """Does the dynamics loss say the model predicts masked tokens well?"""
    st = a.stats["stages"].get("dynamics") or {}
    m = st.get("metrics") or {}
    frac = (m.get("scale") or {}).get("late_fraction_of_chance")
    failing = {f["rule_id"] for f in st.get("findings", []) if f["severity"] == "critical"}
    trend = ((m.get("loss") or {}).get("late_trend") or {}).get("direction")
    learns = frac is not None and frac < a.thresholds["stages"]["dynamics"]["chance_watch"] \
        and not failing and trend != "rising"
    return learns, (f"late loss {frac} of chance on the real scale, late trend {trend}" if frac is not None
                    else "no dynamics loss")


def degenerate_data(a) -> Finding | None:
    """Every training input the same picture: the grids' original panels do
    not vary across cells in any image of a stage trained on raw frames
    (tokenizer, action model). The logs' symptoms (an action-encoder variance
    of exactly 0, one action from step 0) are quoted beside it. A broken
    data pipeline, not a training problem: no learning rate fixes it."""
    t = a.thresholds["visuals"]
    details = (a.visuals or {}).get("details") or {}
    hits = []
    for stage in ("video_tokenizer", "latent_actions"):
        spreads = [((img.get("metrics") or {}).get("original") or {}).get("cross_cell_spread")
                   for img in details.get(stage, []) if not img.get("error")]
        spreads = [x for x in spreads if isinstance(x, (int, float))]
        if spreads and max(spreads) < t["degenerate_input_spread"]:
            hits.append((stage, len(spreads), max(spreads)))
    if not hits:
        return None
    also = []
    lam = ((a.stats["stages"].get("latent_actions") or {}).get("metrics") or {}).get("actions") or {}
    var = lam.get("encoder_variance") or {}
    if var and var.get("max") == 0:
        also.append("latent_actions' encoder variance is exactly 0 in every logged step")
    uniq = (lam.get("unique_actions") or {})
    if uniq and uniq.get("max") == 1:
        also.append("latent_actions chose one action in every logged batch")
    stage, n, worst = hits[0]
    where = "; ".join(f"{s}: {k} grid(s), input cross-cell spread at most {w:.4f}" for s, k, w in hits)
    ev = (details.get(stage) or [{}])[-1].get("path")
    return Finding("data_degenerate", "critical", stage, "input_cross_cell_spread", round(worst, 4),
                   t["degenerate_input_spread"], [0], ev,
                   f"every training input in the grids is the same picture ({where})"
                   + (f"; {'; '.join(also)}" if also else "")
                   + ": the data pipeline feeds one frame, so no stage trained on it learned anything usable")


def reconcile_visuals(a) -> list[str]:
    """Adjust image findings by what their stage can show; returns facts."""
    vis = a.visual_stages
    facts: list[str] = []
    data = degenerate_data(a)
    if data is not None:  # filed before the fallbacks: no stage trained on this data is one
        a.data_findings = [data]
        facts.append("the training data looks degenerate (every input the same picture): the verdicts of "
                     "all stages rest on it")
    tok = tokenizer_fidelity(a)
    if tok and tok["low"]:
        plateau = _loss_plateau(a, "video_tokenizer")
        f = Finding("recon_fidelity_low", "watch", "video_tokenizer", "fidelity.psnr_db", tok["late_psnr_db"],
                    a.thresholds["visuals"]["recon_floor_db"], tok["steps"], tok["evidence"],
                    "the tokenizer's reconstructions are poor: " + "; ".join(tok["reasons"])
                    + (f", {plateau}" if plateau else ""))
        for g in vis["video_tokenizer"]["findings"]:  # the same weakness, seen pixel by pixel
            if g["rule_id"] in IMAGE_RULES and g["severity"] != "info":
                g["severity"] = "info"
                g["message"] += " [part of recon_fidelity_low]"
        vis["video_tokenizer"]["onsets"].clear()
        vis["video_tokenizer"]["findings"].append(f.to_dict())
    dyn = vis.get("dynamics")
    if not dyn:
        return facts
    bound = tok is not None and tok["low"]
    if tok is None:
        facts.append("dynamics images are decoded by the tokenizer, whose fidelity is unknown here (no "
                     "tokenizer grids in this bundle): they are judged on their own")
    elif bound:
        facts.append(f"dynamics images are limited by the tokenizer (recon PSNR {tok['late_psnr_db']:.1f} dB, "
                     f"input dependence {tok['input_dependence']}): they cannot look better than its "
                     "reconstructions, so their findings do not set the dynamics verdict")
    learns, loss_text = _dynamics_learns(a)
    for f in dyn["findings"]:
        if f["rule_id"] not in IMAGE_RULES or f["severity"] == "info":
            continue
        if bound:
            f["severity"] = "info"
            f["message"] += (f" [limited by the tokenizer: its reconstructions reach "
                             f"{tok['late_psnr_db']:.1f} dB]")
            dyn["onsets"].pop(f["rule_id"], None)
        elif learns and f["severity"] == "critical":
            f["severity"] = "watch"
            f["message"] += (f" [but the loss says the model predicts masked tokens well ({loss_text}): "
                             "the images alone cannot make the stage critical]")
            dyn["onsets"].pop(f["rule_id"], None)
    return facts


def facts(a) -> list[str]:
    out = []
    dyn = a.stats["stages"].get("dynamics") or {}
    corr = (dyn.get("metrics") or {}).get("correlations") or {}
    dyn_ids = {f["rule_id"] for f in a.stage_findings("dynamics")}
    # In a healthy run loss and a decaying lr fall together; the reading only
    # means something when the loss is going the wrong way.
    if corr.get("reading") and dyn_ids & {"loss_divergence", "loss_blowup", "loss_rising",
                                          "dynamics_near_chance"}:
        out.append(f"dynamics: the divergence {corr['reading'].replace('loss ', '', 1)}")
    for dep in a.dependencies:
        if dep.get("resolved") and dep.get("how") != "as recorded":
            out.append(f"dynamics' {dep['key']} was recorded as {dep['recorded']} and found at "
                       f"{dep['resolved']} ({dep['how']}); status {dep['status']}")
    return out


def analyse(a) -> dict:
    found = frozen_action_findings(a) + unreadable_log_findings(a)
    found += upstream_findings(a, found)
    return {"findings": found, "facts": facts(a)}

