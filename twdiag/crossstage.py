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
- Facts worth stating: the divergence tracks the learning rate, not the
  action model; recorded upstream paths found by suffix.
"""
from __future__ import annotations

from . import stats
from .rules import Finding

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

