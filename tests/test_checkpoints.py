"""check_ckpts on real torch.save output in TinyWorlds' layout, with real damage."""
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

torch = pytest.importorskip("torch")

from twdiag import checkpoints, rules, synth  # noqa: E402

TS = synth.TS


class Evil:
    """A pickle payload that would create a file if anything ran it."""

    def __init__(self, marker: Path, how: str = "system"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (open, (str(self.marker), "w"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _entry_offset(path: Path, suffix: str) -> int:
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
        with zf.open(info) as fh:
            fh.read(1)
        return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """One dynamics checkpoints dir, one anomaly per step, plus healthy upstream
    stages that the dynamics config points at from an old host path."""
    root = tmp_path_factory.mktemp("ckzoo") / "bundle"
    run = root / "results" / TS
    for stage in ("video_tokenizer", "latent_actions"):
        for step in (0, 60, 120, 180):
            synth.write_checkpoint(run / stage, stage, step, seed=1)
    dyn = run / "dynamics"
    steps = {}
    for step in range(0, 1100, 100):
        steps[step] = synth.write_checkpoint(dyn, "dynamics", step, seed=2)
    torch.save({}, steps[100] / "model_state_dict.pt")      # multi-rank {} overwrite
    torch.save({}, steps[100] / "optim_state_dict.pt")
    m = steps[200] / "model_state_dict.pt"                     # disk full mid-save
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    _flip(steps[300] / "model_state_dict.pt",                  # bit rot in the pickle
          _entry_offset(steps[300] / "model_state_dict.pt", "data.pkl"))
    synth.write_checkpoint(dyn, "dynamics", 400, seed=2, nan=True)
    (steps[500] / "optim_state_dict.pt").unlink()
    marker = root.parent / "pwned"
    torch.save({"step": 600, "config": Evil(marker)}, steps[600] / "state.pt")
    torch.save({"w": Evil(marker, "open")}, steps[700] / "model_state_dict.pt", pickle_protocol=4)
    state = steps[800] / "state.pt"                            # saved step != folder step
    shutil.copy(steps[900] / "state.pt", state)
    _flip(steps[900] / "model_state_dict.pt",                  # bit rot in tensor data
          _entry_offset(steps[900] / "model_state_dict.pt", "data/0"))
    (steps[1000] / "model_state_dict.pt").write_bytes(b"")   # zero bytes
    return {"root": root, "run": run, "dyn": dyn, "steps": steps, "marker": marker}


def _statuses(res) -> dict:
    return {c.step: c.status for c in res.checkpoints}


def test_each_anomaly_gets_its_status_and_nothing_runs(zoo):
    th = rules.load_thresholds()
    sc = checkpoints.discover(zoo["dyn"] / "checkpoints")[0]
    res = checkpoints.check_stage(sc, th, deep="all")
    got = _statuses(res)
    assert got == {0: "valid", 100: "empty", 200: "truncated", 300: "corrupt", 400: "non_finite",
                   500: "missing_files", 600: "unsafe_pickle", 700: "unsafe_pickle",
                   800: "inconsistent", 900: "corrupt", 1000: "truncated"}
    assert not zoo["marker"].exists()
    by_step = {c.step: c for c in res.checkpoints}
    assert "system" in by_step[600].problems[0].detail  # posix.system on Linux
    assert "saved step 900" in by_step[800].problems[0].detail
    assert "CRC" in " ".join(p.detail for p in by_step[900].problems)
    assert "encoder.layers.0.weight (1)" in by_step[400].problems[0].detail
    size = (zoo["steps"][100] / "model_state_dict.pt").stat().st_size
    assert f"0 items, {size} bytes" in by_step[100].problems[0].detail


def test_default_mode_deep_scans_only_what_matters(zoo):
    th = rules.load_thresholds()
    sc = checkpoints.discover(zoo["dyn"] / "checkpoints")[0]
    res = checkpoints.check_stage(sc, th, deep="auto")
    got = _statuses(res)
    # Newest first until one passes: 900 fails its tensor CRC, 400 holds NaN,
    # 0 passes; 800 looked inconsistent, so it was scanned too. Nothing else.
    assert by_deep(res) == {900: "failed", 800: "passed", 400: "failed", 0: "passed"}
    assert got[900] == "corrupt" and got[400] == "non_finite"
    assert res.fallback.step == 0
    doc = checkpoints.stage_document(res)
    assert doc["recommended_fallback"]["step"] == 0
    assert doc["latest"]["status"] == "truncated" and doc["latest_resumable"] is False


def by_deep(res) -> dict:
    return {c.step: c.deep for c in res.checkpoints if c.deep != "no"}


def test_old_tensor_damage_needs_deep_all(tmp_path):
    th = rules.load_thresholds()
    stage = tmp_path / "results" / TS / "latent_actions"
    old = synth.write_checkpoint(stage, "latent_actions", 0)
    synth.write_checkpoint(stage, "latent_actions", 60)
    _flip(old / "optim_state_dict.pt", _entry_offset(old / "optim_state_dict.pt", "data/1"))
    sc = checkpoints.discover(stage)[0]
    auto = checkpoints.check_stage(sc, th, deep="auto")
    assert by_deep(auto) == {60: "passed"} and _statuses(auto)[0] == "valid"
    full = checkpoints.check_stage(sc, th, deep="all")
    assert _statuses(full) == {0: "corrupt", 60: "valid"}


def test_stage_findings_name_the_fallback(zoo):
    th = rules.load_thresholds()
    out = checkpoints.analyse([zoo["root"]], th)
    dyn = out["doc"]["stages"]["dynamics"]
    assert dyn["verdict"] == "critical"
    ids = {f["rule_id"]: f for f in dyn["findings"]}
    assert {"ckpt_unsafe_pickle", "ckpt_invalid_ratio", "ckpt_latest_unusable"} <= set(ids)
    assert "dynamics_step_0" in ids["ckpt_latest_unusable"]["message"]
    assert ids["ckpt_invalid_ratio"]["value"] >= th["checkpoints"]["invalid_ratio_critical"]
    # Upstream stages are healthy, and the old host path resolves by suffix.
    assert out["doc"]["stages"]["video_tokenizer"]["verdict"] == "normal"
    deps = {d["key"]: d for d in out["doc"]["dependencies"]}
    assert deps["video_tokenizer_path"]["status"] == "valid"
    assert deps["video_tokenizer_path"]["resolved"].startswith(str(zoo["root"]))
    assert deps["latent_actions_path"]["how"].startswith("results/")


def test_state_pt_with_unimportable_classes_reads_inertly(zoo):
    ck = checkpoints.check_checkpoint("dynamics", 0, zoo["steps"][0], rules.load_thresholds())
    fc = ck.files["state.pt"]
    assert fc.foreign_globals == ["utils.config.DeviceType"]
    assert "utils.config" not in sys.modules
    cfg = checkpoints.config_of(ck)
    assert cfg["device"] == "utils.config.DeviceType()" and cfg["n_actions"] == 4
    with pytest.raises(Exception):  # the real loader refuses it, as in TinyWorlds
        torch.load(zoo["steps"][0] / "state.pt", weights_only=True)


def test_empty_checkpoint_is_found_without_torch(zoo, monkeypatch):
    monkeypatch.setattr(checkpoints, "torch_available", lambda: False)
    out = checkpoints.analyse([zoo["dyn"] / "checkpoints" / "dynamics_step_100"], rules.load_thresholds())
    doc = out["doc"]
    assert doc["deep_mode"].startswith("unavailable")
    st = doc["stages"]["dynamics"]
    assert st["latest"]["status"] == "empty" and st["total"] == 1
    assert (zoo["steps"][100] / "model_state_dict.pt").stat().st_size < 2000


def test_missing_dependency_and_empty_dependency(tmp_path):
    th = rules.load_thresholds()
    run = tmp_path / "b" / "results" / TS
    synth.write_checkpoint(run / "dynamics", "dynamics", 0)
    out = checkpoints.analyse([tmp_path / "b"], th)
    f = out["doc"]["stages"]["dynamics"]["findings"]
    assert [(x["rule_id"], x["metric"]) for x in f] == [
        ("ckpt_dependency_missing", "video_tokenizer_path"),
        ("ckpt_dependency_missing", "latent_actions_path")]
    d = synth.write_checkpoint(run / "video_tokenizer", "video_tokenizer", 180)
    torch.save({}, d / "model_state_dict.pt")
    out = checkpoints.analyse([tmp_path / "b"], th)
    ids = {x["rule_id"]: x for x in out["doc"]["stages"]["dynamics"]["findings"]}
    assert ids["ckpt_dependency_invalid"]["severity"] == "critical"
    assert ids["ckpt_dependency_invalid"]["value"] == "empty"


def test_cli_read_only_bundle_unchanged(tmp_path, zoo):
    ro = tmp_path / "ro"
    shutil.copytree(zoo["root"], ro)
    before = tree_fingerprint(ro)
    for p in [ro, *ro.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_ckpts.py"), str(ro),
                            "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["overall"] == "critical"
    assert doc["stages"]["dynamics"]["recommended_fallback"]["step"] == 0
    assert tree_fingerprint(ro) == before
    details = json.loads((tmp_path / "out" / "checkpoints.json").read_text())
    assert len(details["checkpoints"]["dynamics"]) == 11
    assert "Traceback" not in r.stderr


def test_cli_errors_and_help(tmp_path):
    script = str(ROOT / "scripts" / "check_ckpts.py")
    r = subprocess.run([sys.executable, script, str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 3 and json.loads(r.stdout)["error"].startswith("input does not exist")
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, script, str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode == 3 and json.loads(r.stdout)["stages"] == {}
    h = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "examples:" in h.stdout and "--deep" in h.stdout


def test_sample_bundle_checkpoints(sample_bundle):
    out = checkpoints.analyse([sample_bundle], rules.load_thresholds())
    st = out["doc"]["stages"]
    assert {s: v["verdict"] for s, v in st.items()} == dict.fromkeys(
        ("video_tokenizer", "latent_actions", "dynamics"), "normal")
    assert st["video_tokenizer"]["model"] == {"tensors": 61, "parameters": 8398}
    assert st["dynamics"]["model"] == {"tensors": 33, "parameters": 21039}
    assert st["latent_actions"]["state"]["scheduler"] is None
    assert all(d["status"] == "valid" for d in out["doc"]["dependencies"])


def test_fresh_truncated_latest_is_in_progress_not_broken(tmp_path):
    th = rules.load_thresholds()
    stage = tmp_path / "results" / TS / "latent_actions"
    synth.write_checkpoint(stage, "latent_actions", 0)
    new = synth.write_checkpoint(stage, "latent_actions", 60)
    m = new / "model_state_dict.pt"
    m.write_bytes(m.read_bytes()[:1000])  # mid-save
    written = max(p.stat().st_mtime for p in new.iterdir())
    fresh = checkpoints.analyse([tmp_path], th, now=written + 5)["doc"]["stages"]["latent_actions"]
    assert fresh["verdict"] == "normal"
    assert [f["rule_id"] for f in fresh["findings"]] == ["ckpt_latest_in_progress"]
    assert fresh["recommended_fallback"]["step"] == 0
    old = checkpoints.analyse([tmp_path], th, now=written + 3600)["doc"]["stages"]["latent_actions"]
    assert old["verdict"] == "critical"
    assert "ckpt_latest_unusable" in {f["rule_id"] for f in old["findings"]}


def test_shared_reference_bomb_is_walked_once(tmp_path):
    """A pickle can nest one list under itself many times: 2**40 paths in a
    few hundred bytes. The checker must not walk every path (if it did, this
    test would never finish)."""
    th = rules.load_thresholds()
    d = synth.write_checkpoint(tmp_path / "results" / TS / "latent_actions", "latent_actions", 0)
    bomb: list = []
    for _ in range(40):
        bomb = [bomb, bomb]
    model = torch.load(d / "model_state_dict.pt", weights_only=True)
    torch.save({**model, "bomb": bomb}, d / "model_state_dict.pt")
    sc = checkpoints.discover(d)[0]
    res = checkpoints.check_stage(sc, th, deep="all")
    assert res.checkpoints[0].status == "valid"
    assert res.checkpoints[0].fact("model_state_dict.pt", "tensors") == 6


def test_single_file_checkpoints_by_alias(tmp_path):
    """Forks save one `<name>_checkpoint_<N>.pt` holding the model under a key,
    and name the latent-action stage `lam`."""
    ckdir = tmp_path / "results" / TS / "lam" / "checkpoints"
    ckdir.mkdir(parents=True)
    weights = {"enc.weight": torch.randn(8, 8), "enc.bias": torch.zeros(8)}
    torch.save({"model_state_dict": weights, "step": 100}, ckdir / "lam_checkpoint_100.pt")
    torch.save({"model_state_dict": {}, "step": 200}, ckdir / "lam_checkpoint_200.pt")
    out = checkpoints.analyse([tmp_path], rules.load_thresholds())["doc"]["stages"]
    st = out["latent_actions"]
    assert st["total"] == 2 and st["steps_by_status"] == {"valid": [100], "empty": [200]}
    assert st["recommended_fallback"]["step"] == 100 and st["recommended_fallback"]["verified"] == "deep scan"
    assert st["model"] == {"tensors": 2, "parameters": 72}
