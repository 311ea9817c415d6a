"""The exporter as agents and people call it: scripts, JSON stdout, files;
the local decoder and the W&B API path (with a fake Api, no network)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest

from conftest import EXAMPLES, ROOT, cli, copy_fresh, tree_fingerprint
from twdiag import bundle, history, logs, wandb_api

SCRIPT = ROOT / "scripts" / "export_local_wandb_history.py"
pytestmark = pytest.mark.fast


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_sample_bundle_export_read_only_and_unchanged(tmp_path, sample_bundle):
    before = tree_fingerprint(sample_bundle)
    code, doc, _ = cli("export", sample_bundle, "--out-dir", tmp_path / "Logs", "--format", "csv,json,parquet",
                       "--source", "local")
    assert code == 0
    assert set(doc["stages"]) == {"video_tokenizer", "latent_actions", "dynamics"}
    for stage, s in doc["stages"].items():
        assert s["rows"] == 240 and (s["step_min"], s["step_max"]) == (0, 239)
        run_entry = s["runs"][0]
        assert run_entry["status"] == "finished" and run_entry["stage_from"] == "run name"
        csv = pd.read_csv(s["outputs"]["csv"])
        assert len(csv) == 240 and "train/loss" in csv
        frame, _ = logs.read_table(s["outputs"]["json"])
        assert frame["train/loss"].tolist() == pytest.approx(csv["train/loss"].tolist())
        logged = history.decode(run_entry["path"]).history
        assert frame["train/loss"].tolist() == logged["train/loss"].tolist()  # exact round trip
        assert os.path.exists(run_entry["outputs"]["console"])
        meta = json.loads(open(run_entry["outputs"]["run"]).read())
        assert meta["meta"]["exit_code"] == 0 and meta["config"]["n_updates"] == 240
    assert doc["stages"]["dynamics"]["runs"][0]["record_types"]["history"] == 240
    assert tree_fingerprint(sample_bundle) == before
    assert not list(tmp_path.glob("Logs/.*"))  # the set is moved into place: no temp files


def test_export_defaults_follow_the_seed_per_bundle(tmp_path):
    b = copy_fresh(EXAMPLES / "bundle-healthy", tmp_path / "b")
    code, doc, err = cli("export", b)
    assert code == 0 and doc["out_dir"] == str(b / "docs" / "action" / "Logs")
    assert all(p.endswith("_latest.csv") for s in doc["stages"].values() for p in [s["outputs"]["csv"]])
    assert f"outputs: {b / 'docs' / 'action' / 'Logs'}" in err


def test_explicit_run_mapping_and_suffix(tmp_path, runs):
    code, doc, _ = cli("export", "--run", f"dynamics={runs['short']}", "--out-dir", tmp_path, "--suffix", "v2")
    assert code == 0 and list(doc["stages"]) == ["dynamics"]
    assert doc["stages"]["dynamics"]["runs"][0]["stage_from"] == "--run"
    assert doc["stages"]["dynamics"]["outputs"]["csv"].endswith("_v2.csv")


def test_resumed_runs_merge_with_provenance(runs):
    merged = logs.load(bundle.discover([runs["resume_a"], runs["resume_b"]]), progress=lambda m: None)
    f = merged["latent_actions"].frame
    assert f["_step"].is_monotonic_increasing and f["_step"].iloc[-1] == 249
    assert merged["latent_actions"].superseded_rows == 50  # steps 150..199 were re-logged
    assert f["_source"].nunique() == 2 and len(f) == 250


def test_non_finite_survive_every_format(tmp_path, runs):
    code, doc, _ = cli("export", runs["odd"], "--out-dir", tmp_path, "--format", "csv,json,parquet")
    outs = doc["stages"]["video_tokenizer"]["outputs"]
    for fmt in ("csv", "json", "parquet"):
        frame, nf = logs.read_table(outs[fmt])
        assert nf["train/loss"]["rows"] == [5, 6, 7], fmt
        assert nf["train/loss"]["values"] == ["-Infinity", "NaN", "Infinity"], fmt
        assert frame["train/loss"].iloc[10] == pytest.approx(1 / 11)
    text = open(outs["json"]).read()
    json.loads(text)  # strict JSON: no bare NaN
    assert "NaN," not in text and "Infinity," not in text.replace('"Infinity"', "")


def test_errors_are_json_not_tracebacks(tmp_path, runs):
    missing = run(SCRIPT, tmp_path / "nope", "--out-dir", tmp_path / "o")
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run-x.wandb").write_bytes(b"garbage")
    code, doc, _ = cli("export", bad, "--out-dir", tmp_path / "o")
    assert code == 4 and doc["skipped"][0]["reason"].startswith("bad ident")
    code, doc, _ = cli("export", runs["short"], "--format", "xml", "--out-dir", tmp_path / "o")
    assert code == 2 and "unknown format" in doc["error"]
    bad_flag = run(SCRIPT, runs["short"], "--no-such-flag")
    assert bad_flag.returncode == 2 and json.loads(bad_flag.stdout)["exit_code"] == 2


def test_fifo_and_symlink_loop_do_not_hang(tmp_path, runs):
    w = tmp_path / "b" / "wandb" / "offline-run-20261128_070000-fifo1234"
    w.mkdir(parents=True)
    os.mkfifo(w / "run-fifo1234.wandb")
    loop = tmp_path / "b" / "wandb" / "offline-run-20261128_070001-loop1234" / "run-loop1234.wandb"
    loop.parent.mkdir()
    os.symlink(loop, loop)
    shutil.copytree(runs["root"] / "short" / "wandb", tmp_path / "b" / "wandb", dirs_exist_ok=True)
    code, doc, _ = cli("export", tmp_path / "b", "--out-dir", tmp_path / "o")
    reasons = " ".join(s["reason"] for s in doc["skipped"])
    assert code == 0 and "FIFO" in reasons and "symlink loop" in reasons
    assert doc["stages"]["video_tokenizer"]["rows"] == 20


def test_refuses_out_dir_inside_bundle(tmp_path, runs):
    b = tmp_path / "bundle"
    shutil.copytree(runs["root"] / "short", b)
    code, doc, _ = cli("export", b, "--out-dir", b / "wandb" / "logs")
    assert code == 5 and "inside" in doc["error"]
    assert not (b / "wandb" / "logs").exists()


# --- the W&B API path -------------------------------------------------------------------

class FakeRun:
    def __init__(self, path, rows, config, name, state="finished"):
        self.entity, self.project, self.id = path.split("/")
        self.path, self._rows, self.config, self.name, self.state = path, rows, config, name, state
        self.summary = {"train/loss": rows[-1]["train/loss"]}

    def scan_history(self):
        yield from self._rows

    def history(self, stream="default", pandas=True):
        return pd.DataFrame([{"_timestamp": 1.0, "system.cpu": 12.5}])


class FakeApi:
    calls: list = []

    def __init__(self, runs=None, fail=False):
        self.runs, self.fail = runs or {}, fail

    def run(self, path):
        FakeApi.calls.append(path)
        if self.fail:
            raise ConnectionError("api.wandb.ai unreachable")
        return self.runs[path]


@pytest.fixture
def fake_api(monkeypatch):
    rows = [{"_step": i, "train/loss": 6.9 / (1 + i), "_timestamp": 1.0e9 + i} for i in range(120)]
    run_ = FakeRun("team/tinyworlds/abc123", rows, {"n_updates": 120, "num_bins": 4, "latent_dim": 5},
                   "dynamics_2026_11_28_07_00_00")
    FakeApi.calls = []
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb_api, "API_FACTORY", lambda: FakeApi({run_.path: run_}))
    return run_


def test_api_source_writes_the_same_tidy_outputs(tmp_path, fake_api):
    (tmp_path / "in").mkdir()
    code, doc, _ = cli("export", tmp_path / "in", "--source", "api", "--api-run", "team/tinyworlds/abc123",
                       "--out-dir", tmp_path / "o")
    assert code == 0, doc
    assert doc["source"]["used"] == "api" and FakeApi.calls == ["team/tinyworlds/abc123"]
    st = doc["stages"]["dynamics"]
    assert st["rows"] == 120 and st["runs"][0]["stage_from"] == "run name"
    frame, _ = logs.read_table(st["outputs"]["csv"])
    assert frame["train/loss"].iloc[0] == pytest.approx(6.9)
    assert (tmp_path / "o" / "dynamics_system_abc123_latest.csv").exists()


def test_api_unreachable_falls_back_to_local(tmp_path, runs, fake_api, monkeypatch):
    monkeypatch.setattr(wandb_api, "API_FACTORY", lambda: FakeApi(fail=True))
    code, doc, _ = cli("export", runs["short"], "--source", "auto", "--api-run", "team/tinyworlds/abc123",
                       "--out-dir", tmp_path / "o")
    assert code == 0 and doc["source"]["used"] == "local"
    assert "unreachable" in doc["source"]["reason"] and "local files used" in doc["source"]["reason"]
    assert doc["stages"]["video_tokenizer"]["rows"] == 20


def test_auto_without_credentials_or_ids_stays_local(tmp_path, runs, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    code, doc, _ = cli("export", runs["short"], "--out-dir", tmp_path / "o")
    assert doc["source"] == {"requested": "auto", "used": "local",
                             "reason": "no W&B credentials configured (WANDB_API_KEY or ~/.netrc): local files used"}
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    code, doc, _ = cli("export", runs["short"], "--out-dir", tmp_path / "o2")
    assert doc["source"]["used"] == "local" and "not identified" in doc["source"]["reason"]


def test_local_never_opens_a_socket(tmp_path, runs, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a socket was opened")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    code, doc, _ = cli("export", runs["healthy"], "--source", "local", "--out-dir", tmp_path / "o")
    assert code == 0 and doc["source"] == {"requested": "local", "used": "local"}
    code, doc, _ = cli("diagnose", runs["healthy"].parent.parent, "--out-dir", tmp_path / "d")
    assert code == 0


def test_json_history_is_the_same_without_orjson(tmp_path, monkeypatch, runs):
    """orjson is optional: the standard-library path writes the same document."""
    from twdiag import export
    log = history.decode(runs["odd"])
    frame = log.history.copy()
    frame["nested"] = [{"a": [1, float("nan")], "b": "x"} if i % 3 == 0 else None for i in range(len(frame))]
    fast = export.write_json_history(frame, tmp_path / "fast.json", log.non_finite).read_text()
    monkeypatch.setattr(export, "orjson", None)
    plain = export.write_json_history(frame, tmp_path / "plain.json", log.non_finite).read_text()
    assert json.loads(fast) == json.loads(plain)
    doc = json.loads(plain)  # strict JSON either way; a nested NaN spelled as everywhere
    assert doc["columns"]["nested"][0] == {"a": [1, "NaN"], "b": "x"} and doc["columns"]["nested"][1] is None
    assert doc["non_finite"]["train/loss"]["values"] == ["-Infinity", "NaN", "Infinity"]
