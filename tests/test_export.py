"""The exporter as agents and people call it: scripts, JSON stdout, files."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, tree_fingerprint
from twdiag import export

SCRIPT = ROOT / "scripts" / "export_local_wandb_history.py"


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_sample_bundle_export_read_only_and_unchanged(tmp_path, sample_bundle):
    before = tree_fingerprint(sample_bundle)
    out = run(SCRIPT, sample_bundle, "--out-dir", tmp_path / "Logs", "--format", "csv,json,parquet")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # stdout is exactly one JSON document
    assert set(doc["stages"]) == {"video_tokenizer", "latent_actions", "dynamics"}
    for stage, s in doc["stages"].items():
        assert s["rows"] == 240 and (s["step_min"], s["step_max"]) == (0, 239)
        run_entry = s["runs"][0]
        assert run_entry["status"] == "finished" and run_entry["stage_from"] == "run name"
        csv = pd.read_csv(s["outputs"]["csv"])
        assert len(csv) == 240 and "train/loss" in csv
        assert os.path.exists(run_entry["outputs"]["console"])
        meta = json.loads(open(run_entry["outputs"]["run"]).read())
        assert meta["meta"]["exit_code"] == 0 and meta["config"]["n_updates"] == 240
    assert doc["stages"]["dynamics"]["runs"][0]["record_types"]["history"] == 240
    assert tree_fingerprint(sample_bundle) == before
    assert not list(tmp_path.glob("Logs/.*.tmp"))  # atomic writes leave no temp files


def test_explicit_run_mapping_and_suffix(tmp_path, runs):
    out = run(SCRIPT, "--run", f"dynamics={runs['short']}", "--out-dir", tmp_path, "--suffix", "v2")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and list(doc["stages"]) == ["dynamics"]
    assert doc["stages"]["dynamics"]["runs"][0]["stage_from"] == "--run"
    assert doc["stages"]["dynamics"]["outputs"]["csv"].endswith("_v2.csv")


def test_resumed_runs_merge_with_provenance(tmp_path, runs):
    merged = export.load_histories([runs["resume_a"], runs["resume_b"]])["latent_actions"]
    f = merged.frame
    assert f["_step"].is_monotonic_increasing and f["_step"].iloc[-1] == 249
    assert merged.superseded_rows == 50  # steps 150..199 were re-logged
    assert f["_source"].nunique() == 2 and len(f) == 250


def test_non_finite_survive_csv(tmp_path, runs):
    doc = export.export([runs["odd"]], tmp_path, formats=("csv", "json", "parquet"))
    outs = doc["stages"]["video_tokenizer"]["outputs"]
    for fmt in ("csv", "json", "parquet"):
        frame, nf = export.read_table(outs[fmt])
        assert nf["train/loss"]["rows"] == [5, 6, 7], fmt
        assert nf["train/loss"]["values"] == ["-Infinity", "NaN", "Infinity"], fmt
        assert frame["train/loss"].iloc[10] == pytest.approx(1 / 11)


def test_errors_are_json_not_tracebacks(tmp_path, runs):
    missing = run(SCRIPT, tmp_path / "nope", "--out-dir", tmp_path / "o")
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run-x.wandb").write_bytes(b"garbage")
    unreadable = run(SCRIPT, bad, "--out-dir", tmp_path / "o")
    doc = json.loads(unreadable.stdout)
    assert unreadable.returncode == 4 and doc["skipped"][0]["reason"].startswith("bad ident")
    usage = run(SCRIPT, runs["short"], "--format", "xml", "--out-dir", tmp_path / "o")
    assert usage.returncode == 2 and "unknown format" in json.loads(usage.stdout)["error"]
    bad_flag = run(SCRIPT, runs["short"], "--no-such-flag")
    assert bad_flag.returncode == 2 and json.loads(bad_flag.stdout)["exit_code"] == 2


def test_refuses_out_dir_inside_bundle(tmp_path, runs):
    bundle = tmp_path / "bundle"
    shutil.copytree(runs["root"] / "short", bundle)
    out = run(SCRIPT, bundle, "--out-dir", bundle / "wandb" / "logs")
    assert out.returncode == 5 and "inside" in json.loads(out.stdout)["error"]
    assert not (bundle / "wandb" / "logs").exists()


def test_help_has_examples_and_exit_codes():
    out = run(SCRIPT, "--help")
    assert out.returncode == 0 and "examples:" in out.stdout and "exit codes:" in out.stdout


def test_copied_skill_folder_runs_without_install(tmp_path, runs):
    dest = tmp_path / ".claude" / "skills" / "tinyworlds-training-diagnostics"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "tests", "examples", "bench",
                                                              "__pycache__", "*.egg-info", "build"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run(dest / "scripts" / "export_local_wandb_history.py", runs["short"], "--out-dir",
              tmp_path / "o", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stages"]["video_tokenizer"]["rows"] == 20
    # the one-shot script too: it needs every data file (thresholds, actions)
    diag = run(dest / "scripts" / "diagnose.py", ROOT / "examples" / "bundle-healthy", "--out-dir",
               tmp_path / "d", "--now", "1795856400", cwd=tmp_path, env=env)
    assert diag.returncode == 0, diag.stderr
    assert json.loads(diag.stdout)["overall"] == "normal"


def test_installed_package_serves_a_lone_script(tmp_path, runs):
    """With `pip install .` (CI does a non-editable install) a script copied
    away from the skill folder falls back to the installed library."""
    probe = run("-c", "import twdiag, sys; print(twdiag.__file__)", cwd=tmp_path)
    if probe.returncode != 0 or str(ROOT) in probe.stdout:
        pytest.skip("twdiag is not pip-installed (non-editable) here")
    lone = tmp_path / "export_local_wandb_history.py"
    shutil.copy(SCRIPT, lone)
    out = run(lone, runs["short"], "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lone_diag = tmp_path / "diagnose.py"
    shutil.copy(ROOT / "scripts" / "diagnose.py", lone_diag)
    diag = run(lone_diag, ROOT / "examples" / "bundle-unhealthy", "--out-dir", tmp_path / "d",
               "--now", "1795856400", cwd=tmp_path)
    assert diag.returncode == 0, diag.stderr
    assert json.loads(diag.stdout)["overall"] == "critical"
    assert shutil.which("twdiag") and subprocess.run(["twdiag", "--help"], capture_output=True).returncode == 0
