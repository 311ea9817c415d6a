"""The fallback policy, in one place: which checkpoint to resume a stage from.

The fallback is the newest checkpoint that is intact (structurally valid,
and its weight files pass a deep scan when torch is here) *and* was saved
before the onset of a critical problem in the stage's own training: the loss
diverging or blowing up, its own collapse (actions, codebook), non-finite
values, outputs that ignore their inputs, or weights that blew up against
the earliest checkpoint. Onsets come from the history (the first step of a
sustained breach, `stats`), the images (`visuals`) and the deep scans here.
A problem inherited from an upstream stage does not move the fallback. A
step-0 checkpoint is the untrained initialisation, never a fallback: when no
checkpoint qualifies the answer is `fallback: null, restart: true`, with the
reason. `newest_intact` is reported beside it, with why it is not the
fallback, so the trade-off can be stated in numbers.

Deep scans run where they change the answer: the earliest valid checkpoint's
weights (the reference for weight growth), then candidates newest first
until one passes, and the newest intact one.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoints, ptfile, stats
from .checkpoints import Checkpoint, StageResult

RESTART_REASON_INIT = "a step-0 checkpoint is the untrained initialisation"


def onset_of(own: dict[str, int]) -> tuple[int | None, str | None]:
    """The earliest onset among a stage's own critical problems."""
    if not own:
        return None, None
    rule = min(own, key=lambda r: own[r])
    return own[rule], rule


def _mark_in_progress(res: StageResult, live: bool) -> None:
    """A truncated or incomplete newest checkpoint of a run that is live by
    its own records is most likely still being saved."""
    latest = res.latest
    if live and latest is not None and latest.status in ("truncated", "missing_files"):
        res.in_progress = latest


def _weight_ratio(ck: Checkpoint, ref: Checkpoint | None) -> float | None:
    if ref is None or ref is ck or not ck.weights or not ref.weights:
        return None
    ratios = []
    for key in ("max_abs_weight", "weight_norm"):
        a, b = ck.weights.get(key), ref.weights.get(key)
        if a is not None and b:
            ratios.append(a / b)
    return max(ratios) if ratios else None


def decide(res: StageResult, hist, stage_stats: dict | None, visual_onsets: dict[str, int],
           thresholds: dict, deep: str = "auto", live: bool = False) -> dict:
    """Deep-scan what the answer needs and choose the fallback; returns the
    stage's fallback document (with the per-checkpoint table)."""
    t = thresholds["checkpoints"]
    limits = ptfile.Limits.from_thresholds(thresholds)
    chunk = int(t["deep_chunk_elements"])
    _mark_in_progress(res, live)
    cks = res.judged
    own = dict((stage_stats or {}).get("metrics", {}).get("onsets", {}))
    own.update(visual_onsets)
    onset, onset_rule = onset_of(own)
    valid = [c for c in cks if c.status == "valid"]
    ref = valid[0] if valid else None  # the earliest weights: what growth is measured against
    if deep in ("all", "torch"):
        checkpoints.deep_scan_all([c for c in cks if c.usable], limits, chunk, second_opinion=deep == "torch")
    elif deep == "auto":
        if ref is not None and len(valid) > 1:
            checkpoints.deep_scan(ref, limits, chunk, model_only=True)
        for c in cks:  # structure already looks wrong: look closer
            if c.status == "inconsistent":
                checkpoints.deep_scan(c, limits, chunk)
    blown: dict[int, float] = {}

    def passes(c: Checkpoint) -> bool:
        if deep != "none":
            checkpoints.deep_scan(c, limits, chunk)
        ratio = _weight_ratio(c, ref) if c.intact and ref is not None and ref.intact else None
        if ratio is not None and ratio >= t["weight_blowup_ratio"]:
            blown[c.step] = round(ratio, 3)
        return c.intact and c.step not in blown

    fallback = newest_intact = None
    for c in reversed(valid):  # newest first
        if c.step <= 0:
            continue
        if newest_intact is not None and onset is not None and c.step >= onset:
            continue  # after the onset: not a candidate, and the newest intact is known
        ok = passes(c)
        if newest_intact is None and c.intact:
            newest_intact = c
        if c.step in blown and (onset is None or c.step < onset):
            onset, onset_rule = c.step, "weights_blowup"
        if ok and (onset is None or c.step < onset):
            fallback = c
            break
    unscanned = _weights_at_every_candidate(cks, ref, deep, limits, chunk, t)
    doc = _document(res, hist, stage_stats, fallback, newest_intact, onset, onset_rule, blown, ref,
                    thresholds)
    if unscanned:
        doc["weights_not_measured"] = {"steps": unscanned, "why": f"the weight scans' time budget "
                                       f"(checkpoints.weight_scan_seconds = {t['weight_scan_seconds']} s) ran out"}
    # Every critical problem's onset, not only the earliest: "images never
    # followed their inputs" and "the loss blew up at step 8" both matter.
    if blown:
        own.setdefault("weights_blowup", min(blown))
    doc["onsets"] = {r: s for r, s in sorted(own.items(), key=lambda kv: kv[1])}
    return doc


def _verified(c: Checkpoint) -> dict:
    return {"level": "deep scan" if c.deep == "passed" else "structure only",
            "deep_scanned": list(c.deep_files) if c.deep == "passed" else [],
            "allowlist_checked": sorted(c.files),
            "note": ("archive certified unambiguous; every CRC checked; every tensor of the weight files "
                     "read with numpy from the archive (NaN/Inf, norms); state.pt read through the allowlist, "
                     "never loaded")
            if c.deep == "passed" else "archive certified, pickle CRC and allowlist only: tensor data not read"}


def _weights_at_every_candidate(cks: list[Checkpoint], ref: Checkpoint | None, deep: str, limits, chunk: int,
                                t: dict) -> list[int]:
    """Weight norms for every valid checkpoint, newest first, within a time
    budget (the numpy scan of a model file is fast): weight growth decides the
    fallback, so the table gives it at every candidate, not only the ones the
    search opened. Returns the steps the budget left unmeasured."""
    if deep == "none" or ref is None:
        return []
    import time
    end = time.monotonic() + float(t["weight_scan_seconds"])
    todo = list(reversed([c for c in cks if c.status == "valid" and not c.weights]))
    scans = checkpoints.deep_scan_each(todo, limits, chunk, model_only=True)  # forked workers, newest first
    done = 0
    for _ in scans:
        done += 1
        if time.monotonic() > end:
            break
    scans.close()
    return sorted(c.step for c in todo[done:])


def _document(res: StageResult, hist, stage_stats, fb: Checkpoint | None, newest: Checkpoint | None,
              onset: int | None, onset_rule: str | None, blown: dict, ref: Checkpoint | None,
              thresholds: dict) -> dict:
    cks = res.judged
    table = checkpoint_table(cks, hist, stage_stats, onset, blown, ref, thresholds)
    doc: dict = {"step": None, "path": None, "restart": False, "reason": None,
                 "onset": {"step": onset, "rule_id": onset_rule} if onset is not None else None,
                 "newest_intact": None, "weights_blown_up": blown, "checkpoints": table}
    if fb is not None:
        doc.update(step=fb.step, path=str(fb.path), verified=_verified(fb),
                   reason=(f"newest intact checkpoint saved before the onset of {onset_rule} at step {onset}"
                           if onset is not None else "newest intact checkpoint; no critical problem in this "
                                                     "stage's own training"))
    else:
        doc.update(restart=bool(cks), reason=_restart_reason(cks, onset, onset_rule, blown))
    if newest is not None:
        entry = {"step": newest.step, "path": str(newest.path), "verified": _verified(newest)}
        if fb is None or newest.step != fb.step:
            entry["why_not_fallback"] = (
                f"its weights are {blown[newest.step]}x the earliest checkpoint's" if newest.step in blown
                else f"saved at step {newest.step}, after the onset of {onset_rule} at step {onset}"
                if onset is not None and newest.step >= onset else "not verified")
        doc["newest_intact"] = entry
    return doc


def _restart_reason(cks: list[Checkpoint], onset, rule, blown) -> str:
    if not cks:
        return "no checkpoints"
    valid = [c for c in cks if c.status == "valid"]
    if not valid:
        return f"none of the {len(cks)} checkpoints is intact"
    early = [c for c in valid if c.step > 0 and (onset is None or c.step < onset)]
    if onset is not None and not early:
        if onset <= 0:  # present from the first record or image: nothing predates it
            return (f"{rule} is present from step 0, so no trained checkpoint predates it "
                    f"({RESTART_REASON_INIT})")
        zero = any(c.step <= 0 for c in valid)
        return (f"every intact checkpoint was saved at or after the onset of {rule} at step {onset}"
                + (f"; the only earlier one is step 0 ({RESTART_REASON_INIT})" if zero else ""))
    if all(c.step <= 0 for c in valid):
        return f"the only intact checkpoint is step 0 ({RESTART_REASON_INIT})"
    return "no checkpoint passed the deep scan" + (f" (weights blew up at steps {sorted(blown)})" if blown else "")


def checkpoint_table(cks: list[Checkpoint], hist, stage_stats: dict | None, onset: int | None,
                     blown: dict, ref: Checkpoint | None, thresholds: dict) -> list[dict]:
    """Per checkpoint: status, loss near its step (window median, as logged),
    learning rate, weight growth against the earliest checkpoint."""
    steps = [c.step for c in cks]
    loss, lr = {}, {}
    if hist is not None and len(hist.frame):
        m = (stage_stats or {}).get("metrics", {})
        span = (m.get("step_max") or 0) - (m.get("step_min") or 0)
        half = max(1, int(span * thresholds["checkpoints"]["loss_window_fraction"]))
        loss = stats.loss_near(hist.frame, m.get("loss_key"), steps, half)
        lr = stats.value_at(hist.frame, (m.get("learning_rate") or {}).get("key"), steps)
    out = []
    for c in cks:
        row = {"step": c.step, "status": c.status, "deep_scan": c.deep, "loss": loss.get(c.step),
               "learning_rate": lr.get(c.step),
               "before_onset": None if onset is None else c.step < onset}
        if c.weights:
            row["weight_norm"] = stats._r(c.weights.get("weight_norm"))
            row["max_abs_weight"] = stats._r(c.weights.get("max_abs_weight"))
            ratio = 1.0 if c is ref else _weight_ratio(c, ref)
            row["weights_vs_earliest"] = stats._r(ratio, 4) if ratio is not None else None
        if c.step in blown:
            row["weights_blown_up"] = True
        out.append(row)
    return out


def path_name(doc: dict) -> str | None:
    return Path(doc["path"]).name if doc.get("path") else None


def apply_probe(doc: dict, probed: dict, verified: dict | None) -> None:
    """What the probe says about the fallback: `resumable` on the document,
    and a fallback that does not load strictly gives way to the newest older
    candidate that does (or to a restart when none does)."""
    if doc.get("step") is None:
        return
    mine = next((c for c in probed.get("checkpoints", []) if c["step"] == doc["step"]), None)
    if mine is None:
        return
    if mine["resumable"] == "verified":
        doc["resumable"] = {"status": "verified", "by": "probe"}
        return
    doc["resumable"] = {"status": "no", "by": "probe", "reason": mine.get("reason")}
    moved_from = {"step": doc["step"], "path": doc["path"], "why": mine.get("reason")}
    if verified is not None:
        doc.update(step=verified["step"], path=verified["path"],
                   reason=f"the newest candidate that loads into TinyWorlds' classes (the probe); step "
                          f"{moved_from['step']} does not: {moved_from['why']}",
                   resumable={"status": "verified", "by": "probe"}, moved_by_probe=moved_from)
    else:
        doc.update(step=None, path=None, restart=True, moved_by_probe=moved_from,
                   reason=f"no probed candidate loads into TinyWorlds' classes: {moved_from['why']}")


def earlier_attempt(doc: dict, stage: str, earlier: list, thresholds: dict) -> None:  # earlier: [bundle.EarlierRoot]
    """No fallback in the newest run root: name the newest intact checkpoint
    (after step 0, weights deep-scanned) that an earlier attempt left in an
    older run root. It is not judged against the newest attempt's history
    (that attempt's log replaced it), so it is offered, not chosen."""
    if doc.get("step") is not None or not earlier:
        return
    limits = ptfile.Limits.from_thresholds(thresholds)
    chunk = int(thresholds["checkpoints"]["deep_chunk_elements"])
    for root in reversed(earlier):
        run_root = root.run_root
        for ref in sorted(root.checkpoints, key=lambda r: -r.step):
            if ref.step <= 0:
                continue
            ck = checkpoints.check_checkpoint(stage, ref.step, ref.path, limits)
            if ck.status != "valid":
                continue
            checkpoints.deep_scan(ck, limits, chunk, model_only=True)
            if not ck.intact:
                continue
            doc["earlier_attempt"] = {
                "step": ck.step, "path": str(ck.path), "run_root": str(run_root), "verified": _verified(ck),
                "note": "the newest intact checkpoint an earlier attempt left in an older run root; it is not "
                        "judged against the newest attempt's history, so it is offered, not chosen as the fallback"}
            doc["reason"] = (f"{doc.get('reason')}; an earlier attempt left an intact checkpoint: "
                             f"{ck.path.name} in {run_root} (offered, see earlier_attempt)")
            return
