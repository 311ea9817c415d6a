"""diagnose.py end to end on the example bundles and on partial bundles."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tree_fingerprint

SCRIPT = ROOT / "scripts" / "diagnose.py"
EXAMPLES = ROOT / "examples"
NOW = "1795856400"  # the time examples/make_examples.py judged liveness at
EXPECTED = {
    "bundle-healthy": ("normal", {"video_tokenizer": "normal", "latent_actions": "normal",
                                  "dynamics": "normal"}),
    "bundle-unhealthy": ("critical", {"video_tokenizer": "normal", "latent_actions": "critical",
                                      "dynamics": "critical"}),
}


def run(*args, env=None, cwd=None) -> tuple[int, dict, str]:
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd)
    return r.returncode, json.loads(r.stdout), r.stderr


def _all_paths(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("evidence_path", "path", "wandb_log", "checkpoints_dir", "latest_image") and v:
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
    code, doc, err = run(bundle, "--out-dir", tmp_path, "--now", NOW)
    assert code == 0, err
    overall, stages = EXPECTED[name]
    assert doc["overall"] == overall
    assert {s: v["verdict"] for s, v in doc["stages"].items()} == stages
    full = json.loads((tmp_path / "diagnosis.json").read_text())
    paths = list(_all_paths(full))
    assert len(paths) > 10 and all(Path(p).exists() for p in paths), [p for p in paths if not Path(p).exists()]
    assert tree_fingerprint(bundle) == before
    md = (tmp_path / "diagnosis.md").read_text()
    for section in ("## 1. Run status", "## 2. Numeric summary", "## 3. Visual findings",
                    "## 4. Checkpoint integrity", "## 5. Verdict and next actions"):
        assert section in md
    for f in ("contact_sheet.png", "loss_dynamics.png", "checkpoints.json", "visuals.json"):
        assert (tmp_path / f).is_file()
    # the committed example outputs are what this code produces now
    shipped = json.loads((EXAMPLES / "outputs" / name / "diagnosis.json").read_text())
    assert shipped["overall"] == overall
    assert {s: v["verdict"] for s, v in shipped["stages"].items()} == stages


def test_unhealthy_names_fallback_and_orders_actions(tmp_path):
    code, doc, _ = run(EXAMPLES / "bundle-unhealthy", "--out-dir", tmp_path, "--now", NOW)
    dyn = doc["stages"]["dynamics"]
    assert dyn["fallback"]["step"] == 150 and dyn["fallback"]["verified"] == "deep scan"
    actions = doc["next_actions"]
    assert actions[0]["severity"] == "critical"
    sev = [a["severity"] for a in actions]
    assert sev == sorted(sev, key=lambda s: {"critical": 0, "watch": 1}[s])
    ids = [a["rule_id"] for a in actions]
    assert ids.index("loss_divergence") < ids.index("ckpt_invalid_ratio") < ids.index("dynamics_near_chance")
    assert any("dynamics_step_150" in a["action"] for a in actions)
    assert any("latent_actions collapsed" in f for f in doc["cross_stage"])
    md = (tmp_path / "diagnosis.md").read_text()
    assert "dynamics_step_150" in md and "`loss_divergence` (critical)" in md


def test_fail_on_gate(tmp_path):
    code, doc, _ = run(EXAMPLES / "bundle-unhealthy", "--out-dir", tmp_path / "a", "--fail-on", "critical",
                       "--now", NOW)
    assert code == 10 and doc["overall"] == "critical"
    code, _, _ = run(EXAMPLES / "bundle-healthy", "--out-dir", tmp_path / "b", "--fail-on", "watch",
                     "--now", NOW)
    assert code == 0


def _copy(src: Path, dst: Path, parts: tuple[str, ...]) -> Path:
    for part in parts:
        shutil.copytree(src / part, dst / part)
    return dst


def _drop_stage(b: Path, stage: str) -> None:
    from twdiag import bundle, history
    shutil.rmtree(b / "results" / "2026_11_28_06_35_02" / stage)
    for run_dir in list((b / "wandb").iterdir()):
        name = history.decode(next(run_dir.glob("*.wandb"))).meta.get("name")
        if bundle.stage_from_run_name(name) == stage:
            shutil.rmtree(run_dir)


def test_missing_stage_is_missing_not_a_crash(tmp_path):
    b = _copy(EXAMPLES / "bundle-healthy", tmp_path / "b", ("wandb", "results"))
    _drop_stage(b, "latent_actions")
    code, doc, err = run(b, "--out-dir", tmp_path / "out", "--now", NOW)
    assert code == 0, err
    assert doc["stages"]["latent_actions"]["verdict"] == "missing"
    assert doc["stages"]["latent_actions"]["findings"][0]["rule_id"] == "stage_missing"
    assert doc["overall"] == "watch"
    assert doc["stages"]["video_tokenizer"]["verdict"] == "normal"


def test_wandb_only_bundle(tmp_path):
    b = _copy(EXAMPLES / "bundle-unhealthy", tmp_path / "b", ("wandb",))
    code, doc, err = run(b, "--out-dir", tmp_path / "out", "--now", NOW)
    assert code == 0, err
    assert doc["stages"]["dynamics"]["verdict"] == "critical"
    assert doc["stages"]["dynamics"]["fallback"] is None
    assert doc["run_status"]["state"] == "finished"


def test_results_only_bundle(tmp_path):
    b = _copy(EXAMPLES / "bundle-unhealthy", tmp_path / "b", ("results",))
    code, doc, err = run(b, "--out-dir", tmp_path / "out")
    assert code == 0, err
    dyn = doc["stages"]["dynamics"]
    assert dyn["verdict"] == "critical" and dyn["status"] == "unknown"
    assert {f["rule_id"] for f in dyn["findings"]} >= {"ckpt_latest_unusable", "input_independent_output"}
    assert doc["stages"]["video_tokenizer"]["verdict"] == "normal"


def test_read_only_bundle_default_out_dir(tmp_path):
    b = _copy(EXAMPLES / "bundle-unhealthy", tmp_path / "ro", ("wandb", "results"))
    before = tree_fingerprint(b)
    tree = [b, *b.rglob("*")]
    for p in tree:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        env = {**os.environ, "RUN_BUNDLE_ROOT": str(b)}
        code, doc, err = run("--now", NOW, env=env, cwd=tmp_path)
    finally:
        for p in tree:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert code == 0, err
    assert Path(doc["outputs"]["diagnosis_md"]).parent == tmp_path / "docs" / "action"
    assert tree_fingerprint(b) == before
    assert "Traceback" not in err


def test_bad_inputs_exit_codes(tmp_path):
    code, doc, _ = run(tmp_path / "nope")
    assert code == 3 and "does not exist" in doc["error"]
    (tmp_path / "empty").mkdir()
    code, doc, _ = run(tmp_path / "empty", "--out-dir", tmp_path / "o")
    assert code == 3 and "no TinyWorlds" in doc["error"]
    code, doc, _ = run(EXAMPLES / "bundle-healthy", "--out-dir", EXAMPLES / "bundle-healthy" / "results" / "x")
    assert code == 5
    code, doc, _ = run(EXAMPLES / "bundle-healthy", "--fail-on", "sometimes")
    assert code == 2 and doc["error"].startswith("usage error")


def test_results_override_reads_another_run_root(tmp_path):
    healthy_root = EXAMPLES / "bundle-healthy" / "results" / "2026_11_28_06_35_02"
    code, doc, err = run(EXAMPLES / "bundle-unhealthy", "--results", healthy_root,
                         "--out-dir", tmp_path, "--now", NOW)
    assert code == 0, err
    dyn = doc["stages"]["dynamics"]
    assert dyn["fallback"]["step"] == 450  # the healthy run root's checkpoints
    assert dyn["evidence"]["checkpoints_dir"].startswith(str(healthy_root))
    assert dyn["verdict"] == "critical"  # the unhealthy W&B log still diverges
    assert {f["rule_id"] for f in dyn["findings"]} >= {"loss_divergence"}
    assert "ckpt_latest_unusable" not in {f["rule_id"] for f in dyn["findings"]}


def test_real_incident_rebuild_gets_the_real_advice(tmp_path, incident):
    """real-incidents.md: dynamics diverged with lr 0.01, 25 of 28 checkpoints
    were {} overwrites; the right advice was to fall back to 52000, lower the
    learning rate and fix the multi-rank save."""
    import torch

    from twdiag import synth
    b = tmp_path / "incident"
    shutil.copytree(incident["root"] / "wandb", b / "wandb")
    stage_dir = b / "results" / "2026_02_06_00_44_34" / "dynamics"
    for step in range(0, 56000, 2000):
        d = synth.write_checkpoint(stage_dir, "dynamics", step, config={})
        if step not in (26000, 44000, 52000):
            torch.save({}, d / "model_state_dict.pt")
            torch.save({}, d / "optim_state_dict.pt")
    code, doc, err = run(b, "--out-dir", tmp_path / "out")
    assert code == 0, err
    dyn = doc["stages"]["dynamics"]
    assert dyn["verdict"] == "critical"
    assert dyn["fallback"]["step"] == 52000
    full = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    ck = full["stages"]["dynamics"]["checkpoints"]
    assert (ck["total"], ck["valid"]) == (28, 3) and ck["latest"]["status"] == "empty"
    assert any("tracks the learning rate" in f and "not the action model" in f for f in doc["cross_stage"])
    actions = [a["rule_id"] for a in doc["next_actions"]]
    assert actions[:3] == ["loss_divergence", "ckpt_latest_unusable", "ckpt_invalid_ratio"]
    assert "dynamics_step_52000" in doc["next_actions"][0]["action"]
    assert "lower learning rate" in doc["next_actions"][0]["action"]
    assert "rank 0" in doc["next_actions"][2]["action"]
    assert doc["stages"]["video_tokenizer"]["verdict"] == "normal"
    assert doc["stages"]["latent_actions"]["verdict"] == "watch"


def test_every_number_in_the_report_is_in_the_json(tmp_path):
    """diagnosis.md is rendered from diagnosis.json alone: each number in its
    prose and tables is a JSON value (as printed with 4 significant digits)
    or appears in a JSON string (messages, paths)."""
    import re

    from twdiag.report import _v
    run(EXAMPLES / "bundle-unhealthy", "--out-dir", tmp_path, "--now", NOW)
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
    text = re.sub(r"`[^`]*`", "", md)                      # code spans: paths, rule ids
    text = re.sub(r"(?m)^(#+ |\s*)\d+\. ", "", text)       # section and list numbering
    numbers = re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])", text)
    assert len(numbers) > 50
    missing = sorted({n for n in numbers if n not in known})
    assert not missing, missing


def test_live_and_stalled_run_status(tmp_path):
    """A dynamics log cut before its exit record: live when just written,
    stalled or crashed when quiet for hours."""
    from twdiag import bundle, history
    b = _copy(EXAMPLES / "bundle-healthy", tmp_path / "b", ("wandb",))
    for wf in bundle.find_wandb_files(b):
        if bundle.stage_from_run_name(history.decode(wf.path).meta.get("name")) == "dynamics":
            data = wf.path.read_bytes()
            wf.path.write_bytes(data[: int(len(data) * 0.9)])  # still being written
            mtime = wf.path.stat().st_mtime
    code, doc, err = run(b, "--out-dir", tmp_path / "o1", "--now", str(mtime + 10))
    assert code == 0, err
    assert doc["run_status"]["stage"] == "dynamics" and doc["run_status"]["state"] == "live"
    assert doc["stages"]["video_tokenizer"]["status"] == "finished"
    code, doc, err = run(b, "--out-dir", tmp_path / "o2", "--now", str(mtime + 7200))
    assert doc["run_status"]["state"] == "stalled_or_crashed"
    assert "run_stalled" in {f["rule_id"] for f in doc["stages"]["dynamics"]["findings"]}
    assert doc["stages"]["dynamics"]["verdict"] in ("watch", "critical")
