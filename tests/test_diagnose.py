"""diagnose end to end: the genuine example bundles, the real-incident
rebuild, copied and read-only bundles, output safety and natural mistakes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, EXAMPLES, SCRIPTS, copy_fresh, diagnose, now_after, run_read_only, tree_fingerprint

NOW = "1796169600"  # the time examples/make_examples.py judged liveness at (examples/README.md)
EXPECTED = json.loads((EXAMPLES / "expected.json").read_text())


def _all_paths(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("evidence_path", "path", "wandb_log", "checkpoints_dir", "latest_image") and v \
                    and not str(v).startswith("wandb-api://"):
                yield v
            else:
                yield from _all_paths(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_paths(v)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_examples_give_documented_verdicts(tmp_path, name):
    bundle = EXAMPLES / name
    before = tree_fingerprint(bundle)
    code, doc, err = diagnose(bundle, "--out-dir", tmp_path, "--now", NOW, "--fail-on", "critical")
    want = EXPECTED[name]
    assert code == (10 if want["overall"] == "critical" else 0), err  # the --fail-on gate
    assert doc["overall"] == want["overall"]
    assert {s: v["verdict"] for s, v in doc["stages"].items()} == want["stages"]
    assert {s: v["fallback"]["step"] for s, v in doc["stages"].items() if v["fallback"]} == want["fallback"]
    assert {s: v["state"] for s, v in doc["stages"].items()} == {s: "finished" for s in want["stages"]}
    full = json.loads((tmp_path / "diagnosis.json").read_text())
    paths = list(_all_paths(full))
    assert len(paths) > 10 and all(Path(p).exists() for p in paths), [p for p in paths if not Path(p).exists()]
    assert tree_fingerprint(bundle) == before
    md = (tmp_path / "diagnosis.md").read_text()
    for section in ("## 1. Run status", "## 2. Numeric summary", "## 3. Visual findings",
                    "## 4. Checkpoint integrity", "## 5. Verdict and next actions"):
        assert section in md
    assert "![contact sheet](contact_sheet.png)" in md  # relative links: a preview shows the pictures
    for f in ("contact_sheet.png", "loss_dynamics.png", "checkpoints.json", "visuals.json", "diagnosis.html"):
        assert (tmp_path / f).is_file()
    shipped = json.loads((EXAMPLES / "outputs" / name / "diagnosis.json").read_text())
    assert shipped["overall"] == want["overall"]
    assert {s: v["verdict"] for s, v in shipped["stages"].items()} == want["stages"]


def test_unhealthy_story_and_actions(unhealthy):
    doc, tmp_path = unhealthy["compact"], unhealthy["out"]
    lam, dyn = doc["stages"]["latent_actions"], doc["stages"]["dynamics"]
    assert "action_collapse" in {f["rule_id"] for f in lam["findings"]}
    assert {"loss_blowup", "ckpt_latest_unusable"} <= {f["rule_id"] for f in dyn["findings"]}
    acts = doc["next_actions"]
    assert [a["rank"] for a in acts] == list(range(1, len(acts) + 1))
    full = json.loads((tmp_path / "diagnosis.json").read_text())["next_actions"]
    assert [a["priority"] for a in full] == [a["rank"] for a in full] == [a["rank"] for a in acts]
    assert acts[0]["stage"] == "latent_actions"  # the upstream critical stage comes first
    assert "higher learning rate" in acts[0]["action"] and "Lower" not in acts[0]["action"]
    # its images ignore their inputs because it never learned: one action, not "lower the lr"
    assert "input_independent_output" in full[0]["also"]
    assert not any("lower learning rate" in a["action"] for a in acts if a["stage"] == "latent_actions")
    blowup = next(a for a in acts if a["rule_id"] == "loss_blowup")
    assert "blew up at step 8" in blowup["action"]  # its own onset, not the images' step 0
    dyn_resume = next(a for a in full if a["stage"] == "dynamics" and a.get("variant"))
    assert dyn_resume["variant"] == "after_upstream" and "Fix latent_actions first" in dyn_resume["action"]
    for a in acts:  # no action resumes a stage whose fallback is null
        fb = doc["stages"][a["stage"]]["fallback"]
        if fb and fb["step"] is None:
            assert "Resume from" not in a["action"], a


def test_real_incident_rebuild_gets_the_real_advice(tmp_path, incident_bundle):
    """real-incidents.md: dynamics diverged with lr 0.01, 25 of 28 checkpoints
    were {} overwrites, and the only intact ones (26k, 44k, 52k) were all saved
    after the onset: no fallback qualifies; the advice weighs a restart against
    resuming from 52000 at a lower learning rate, then fixes the save."""
    code, doc, err = diagnose(incident_bundle, "--out-dir", tmp_path / "out")
    assert code == 0, err
    assert {s: e["verdict"] for s, e in doc["stages"].items()} == {
        "video_tokenizer": "normal", "latent_actions": "watch", "dynamics": "critical"}
    fb = doc["stages"]["dynamics"]["fallback"]
    assert fb["step"] is None and fb["restart"] is True
    assert fb["newest_intact"]["step"] == 52000 and "after the onset" in fb["newest_intact"]["why_not_fallback"]
    full = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    ck = full["stages"]["dynamics"]["checkpoints"]
    assert (ck["total"], ck["valid"]) == (28, 3) and ck["latest"]["status"] == "empty"
    table = {r["step"]: r for r in ck["table"]}
    assert table[52000]["loss"] == pytest.approx(6.6, rel=0.1) and table[52000]["learning_rate"] > 0.009
    assert any("tracks the learning rate" in f and "not the action model" in f for f in doc["cross_stage"])
    ids = [a["rule_id"] for a in doc["next_actions"]]
    # the save is fixed first: the restart or resume after it saves checkpoints again
    assert ids[:3] == ["ckpt_invalid_ratio", "loss_divergence", "ckpt_latest_unusable"]
    assert "rank 0" in doc["next_actions"][0]["action"] and "not a torn write" in doc["next_actions"][0]["action"]
    second = doc["next_actions"][1]["action"]
    assert "restart" in second.lower() and "dynamics_step_52000" in second and "52,000 steps" in second
    # the suggested lr comes from this run: below the lr in force when the loss broke, with its reason
    assert "0.01 -> 0.000" in second and "the lr in force when the loss broke" in second
    assert "3.56" not in second and "5e-4" not in second  # no number from another run
    md = (tmp_path / "out" / "diagnosis.md").read_text()
    assert "### dynamics (critical)" in md and "### latent_actions (watch)" in md


def _cut_log(bundle: Path, stage: str) -> Path:
    from twdiag import bundle as bmod, history
    for wf in bmod.discover([bundle]).wandb_files:
        if bmod.stage_from_run_name(history.decode(wf.path).meta.get("name")) == stage:
            data = wf.path.read_bytes()
            wf.path.write_bytes(data[: int(len(data) * 0.8)])
            return wf.path
    raise AssertionError(stage)


def test_copied_bundle_never_reads_live(tmp_path):
    """A run killed mid-checkpoint, then backed up (every file copied, fresh
    mtimes): crashed or stalled, never live; a finished stage stays finished;
    the truncated newest checkpoint gets no 'save in progress' pass."""
    src = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "orig")
    log = _cut_log(src, "dynamics")
    newest = sorted((next((src / "results").iterdir()) / "dynamics" / "checkpoints").iterdir(),
                    key=lambda p: int(p.name.rsplit("_", 1)[1]))[-1] / "model_state_dict.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    later = now_after(log, 3 * 86400)
    copy = copy_fresh(src, tmp_path / "backup")
    for f in copy.rglob("*"):  # the backup ran a day after the crash, whatever the clock says today
        os.utime(f, (float(later) - 2 * 86400,) * 2)
    code, doc, err = diagnose(copy, "--out-dir", tmp_path / "out", "--now", later)
    assert code == 0, err
    assert doc["copied"] is True
    assert doc["stages"]["dynamics"]["state"] in ("crashed", "stalled_or_crashed")
    assert doc["stages"]["video_tokenizer"]["state"] == "finished"
    assert doc["stages"]["dynamics"]["fallback"]["step"] is not None
    full = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert full["stages"]["dynamics"]["checkpoints"]["in_progress"] is None
    assert "ckpt_latest_unusable" in {f["rule_id"] for f in full["stages"]["dynamics"]["findings"]}
    # the same copy judged moments after its newest record: live by the records
    code, doc, _ = diagnose(copy, "--out-dir", tmp_path / "out2", "--now", now_after(log, 30))
    assert doc["stages"]["dynamics"]["state"] == "live"


def test_read_only_bundle_writes_under_cwd(tmp_path):
    """A bundle on a read-only mount: the outputs go to ./twdiag-<name>."""
    b = copy_fresh(EXAMPLES / "bundle-unhealthy", tmp_path / "ro")
    before = tree_fingerprint(b)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "RUN_BUNDLE_ROOT": str(b)}
    r = run_read_only(b, [sys.executable, str(SCRIPTS / "diagnose.py"), "--now", NOW], env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    out = work / "twdiag-ro"
    assert Path(doc["outputs"]["diagnosis_json"]).parent == out and f"outputs: {out}" in r.stderr
    assert tree_fingerprint(b) == before and "Traceback" not in r.stderr


def test_default_out_dir_is_the_bundles_docs_action(tmp_path):
    a = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "runs" / "a")
    b = copy_fresh(EXAMPLES / "bundle-unhealthy", tmp_path / "runs" / "b")
    for bundle in (a, b):
        code, doc, err = diagnose(bundle, "--now", NOW)
        assert code == 0 and Path(doc["outputs"]["diagnosis_json"]) == bundle / "docs" / "action" / "diagnosis.json"
    assert json.loads((a / "docs/action/diagnosis.json").read_text())["overall"] == "normal"
    assert json.loads((b / "docs/action/diagnosis.json").read_text())["overall"] == "critical"
    mode = (a / "docs/action/diagnosis.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_writes_inside_a_bundle_only_under_docs_action(tmp_path):
    b = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "b")
    for bad in (b, b / "docs", b / "results" / "x", b / "wandb" / "x", b / "notes"):
        code, doc, _ = diagnose(b, "--out-dir", bad, "--now", NOW)
        assert code == 5 and "docs/action" in doc["error"], bad
        assert not (b / "docs").exists() and not (b / "notes").exists()
    code, doc, _ = diagnose(b, "--out-dir", b / "docs" / "action" / "run1", "--now", NOW)
    assert code == 0


def test_nothing_is_created_when_the_run_fails_first(tmp_path):
    code, doc, _ = diagnose(tmp_path / "nope", "--out-dir", tmp_path / "out")
    assert code == 3 and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    code, doc, _ = diagnose(tmp_path / "empty", "--out-dir", tmp_path / "out")
    assert code == 3 and "no TinyWorlds" in doc["error"] and not (tmp_path / "out").exists()


def test_an_internal_error_still_leaves_diagnosis_json(tmp_path, monkeypatch):
    from twdiag import report

    def broken(doc):
        raise RuntimeError("boom in the markdown")
    monkeypatch.setattr(report, "markdown", broken)
    code, doc, _ = diagnose(EXAMPLES / "bundle-healthy", "--out-dir", tmp_path, "--now", NOW)
    full = json.loads((tmp_path / "diagnosis.json").read_text())
    assert code == 0 and full["overall"] == "normal"
    assert any("boom in the markdown" in e["error"] for e in full["errors"])
    assert not list(tmp_path.glob(".twdiag-tmp-*"))


def test_an_interrupted_write_keeps_the_old_outputs(tmp_path):
    from twdiag import outputs
    (tmp_path / "diagnosis.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with outputs.OutputSet(tmp_path) as o:
            o.write_text("diagnosis.md", "new")
            raise KeyboardInterrupt
    assert (tmp_path / "diagnosis.json").read_text() == "old" and not (tmp_path / "diagnosis.md").exists()
    assert not list(tmp_path.glob(".twdiag-tmp-*"))


@pytest.mark.parametrize("when", ["renaming", "before"])
def test_a_sigterm_during_the_commit_leaves_a_whole_set_and_no_temp_dir(tmp_path, when):
    """A SIGTERM while the renames run is held until they end, the temp dir
    removed with them, and only then unwinds; one as the commit begins
    (before the renames) leaves the old set and no temp dir either. Found by
    CI: the held SIGTERM unwound between the renames and the temp dir's
    removal, which left it behind."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from twdiag import outputs
outputs.install_sigterm_handler()
out = Path(sys.argv[1])
(out / "diagnosis.json").write_text("old")
real_replace, real_commit = os.replace, outputs.OutputSet.commit
def replace(src, dst):
    os.kill(os.getpid(), signal.SIGTERM)  # held: delivered when the renames end
    real_replace(src, dst)
def commit(self):
    os.kill(os.getpid(), signal.SIGTERM)  # not held yet: unwinds at once
    return real_commit(self)
if sys.argv[2] == "renaming":
    outputs.os.replace = replace
else:
    outputs.OutputSet.commit = commit
try:
    with outputs.OutputSet(out) as o:
        o.write_text("diagnosis.md", "new")
        o.write_json("diagnosis.json", {{"new": True}})
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), when], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "interrupted", r.stderr[-2000:]
    assert not list(tmp_path.glob(".twdiag-tmp-*"))
    if when == "renaming":  # the whole new set
        assert (tmp_path / "diagnosis.md").read_text() == "new" and "new" in (tmp_path / "diagnosis.json").read_text()
    else:  # the old one
        assert (tmp_path / "diagnosis.json").read_text() == "old" and not (tmp_path / "diagnosis.md").exists()


def test_sigterm_leaves_no_temp_files(tmp_path):
    import signal
    import time
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(SCRIPTS / "diagnose.py"), str(EXAMPLES / "bundle-unhealthy"),
                          "--out-dir", str(out), "--now", NOW], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for _ in range(200):
        if out.exists() or p.poll() is not None:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    assert not list(out.glob(".twdiag-tmp-*")) if out.exists() else True
    if (out / "diagnosis.json").exists():  # it got to the end: then the set is whole
        assert (out / "diagnosis.md").exists()


def test_pointing_inside_the_bundle_steps_up(tmp_path):
    b = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "b")
    code, doc, err = diagnose(b / "wandb", "--out-dir", tmp_path / "o", "--now", NOW)
    assert code == 0 and doc["bundle"] == str(b) and "using the bundle root" in " ".join(doc["notes"])
    assert all(e["verdict"] == "normal" for e in doc["stages"].values())
    run_root = next((b / "results").iterdir())
    code, doc, err = diagnose(run_root / "dynamics", "--out-dir", tmp_path / "o2", "--now", NOW)
    assert code == 0 and doc["stages"]["dynamics"]["fallback"]["step"] is not None


def test_one_wandb_file_is_its_stages_run(tmp_path):
    from twdiag import bundle as bmod, history
    b = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "b")
    dyn = next(w.path for w in bmod.discover([b]).wandb_files
               if history.decode(w.path).meta["name"].startswith("dynamics"))
    code, doc, err = diagnose(dyn, "--out-dir", tmp_path / "o", "--now", NOW)
    assert code == 0, err
    assert doc["stages"]["dynamics"]["evidence"]["wandb_log"] == str(dyn)
    assert "its stage's --run" in " ".join(doc["notes"])


def test_unknown_stage_in_run_is_a_usage_error(tmp_path):
    code, doc, _ = diagnose(EXAMPLES / "bundle-healthy", "--run", "foo=x.wandb", "--out-dir", tmp_path)
    assert code == 2 and "video_tokenizer, latent_actions, dynamics" in doc["error"]


@pytest.mark.parametrize("damage", ["zero bytes", "wrong magic", "a directory"])
def test_unreadable_log_of_a_stage_with_artifacts_is_watch(tmp_path, damage):
    from twdiag import bundle as bmod, history
    b = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "b")
    lam = next(w.path for w in bmod.discover([b]).wandb_files
               if history.decode(w.path).meta["name"].startswith("latent_actions"))
    if damage == "zero bytes":
        lam.write_bytes(b"")
    elif damage == "wrong magic":
        lam.write_bytes(b"NOTWANDB" * 100)
    else:
        lam.unlink()
        lam.mkdir()
    code, doc, _ = diagnose(b, "--out-dir", tmp_path / "o", "--now", NOW)
    assert code == 0
    st = doc["stages"]["latent_actions"]
    assert st["verdict"] == "watch" and "log_unreadable" in {f["rule_id"] for f in st["findings"]}
    assert any(s["path"] == str(lam) for s in doc["skipped"])


def test_results_only_and_wandb_only(tmp_path):
    b = tmp_path / "r"
    shutil.copytree(EXAMPLES / "bundle-unhealthy" / "results", b / "results")
    code, doc, err = diagnose(b, "--out-dir", tmp_path / "o1")
    assert code == 0 and doc["stages"]["dynamics"]["state"] == "unknown"
    assert doc["stages"]["dynamics"]["verdict"] == "critical"
    w = tmp_path / "w"
    shutil.copytree(EXAMPLES / "bundle-unhealthy" / "wandb", w / "wandb")
    code, doc, err = diagnose(w, "--out-dir", tmp_path / "o2", "--now", NOW)
    assert code == 0 and doc["stages"]["dynamics"]["fallback"] is None
    assert doc["run_status"]["state"] == "finished"


def test_every_number_in_the_report_is_in_the_json(unhealthy):
    """diagnosis.md is rendered from diagnosis.json alone."""
    from twdiag.report import _v
    tmp_path = unhealthy["out"]
    doc = json.loads((tmp_path / "diagnosis.json").read_text())
    known: set[str] = set()

    def collect(x):
        if isinstance(x, dict):
            for k, v in x.items():
                collect(k), collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)
        elif isinstance(x, bool) or x is None:
            return
        elif isinstance(x, (int, float)):
            known.update({str(x), _v(x), _v(float(x))})
        elif isinstance(x, str):
            known.update(re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", x))
    collect(doc)
    md = (tmp_path / "diagnosis.md").read_text()
    text = re.sub(r"`[^`]*`", "", md)
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", text)         # image links
    text = re.sub(r"(?m)^(#+ |\s*)\d+\. ", "", text)       # section and list numbering
    text = re.sub(r"(\d)x\b", r"\1 x", text)                 # ratios: "125.4x"
    numbers = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])", text)
    assert len(numbers) > 50
    missing = sorted({n for n in numbers if n not in known})
    assert not missing, missing


def test_compact_stdout_is_enough_to_answer(unhealthy):
    doc = unhealthy["compact"]
    assert len(json.dumps(doc)) < 20_000
    dyn = doc["stages"]["dynamics"]
    assert {"verdict", "state", "numbers", "fallback", "findings"} <= set(dyn)
    assert dyn["fallback"]["reason"] and "loss_first" in dyn["numbers"]
    assert doc["next_actions"] and all("rank" in a for a in doc["next_actions"])
