"""compare_runs on real offline wandb runs: twins, an lr change, an action
drop, a slower run, a shorter run, and a folder holding several runs."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, diagnose, tree_fingerprint
from twdiag import compare, rules, synth


N = 600
CHANGE = 300  # the step where the lr is raised / actions collapse
T0 = 1795850000.0


def _rows(stage: str, seed: int, n: int = N, dt: float = 0.5, lr_from: int | None = None,
          actions_from: int | None = None) -> list[dict]:
    rows = synth.curve_rows(stage, n, seed=seed, start=6.9 if stage == "dynamics" else 1.4,
                            end=0.4 if stage == "dynamics" else 0.05, noise=0.04, n_updates=N,
                            base_lr=1e-3, log_interval=10, actions=synth.healthy_actions())
    for r in rows:
        s = r["_step"]
        r["_timestamp"] = T0 + s * dt  # wall clock per step: dt seconds
        if lr_from is not None and s >= lr_from:
            r["learning_rate/group_0"] *= 10
            r["learning_rate/group_1"] *= 10
            r["train/loss"] *= 1 + 2.0 * (1 - math.exp(-(s - lr_from) / 15))
        if actions_from is not None and s >= actions_from and "unique_actions" in r:
            r["unique_actions"], r["action_entropy"] = 1, 0.0
    return rows


@pytest.fixture(scope="session")
def cmp_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cmp")
    dyn_cfg = synth.stage_config("dynamics", n_updates=N, learning_rate=1e-3)
    lam_cfg = synth.stage_config("latent_actions", n_updates=N, log_interval=10)
    out = {}

    def run(name, stage, cfg, rows, folder=None):
        d = root / (folder or name)
        synth.wandb_run(d, f"{stage}_2026_11_28_07_{len(out):02d}_00", cfg, rows)
        out[name] = d
        return d

    run("base", "dynamics", dyn_cfg, _rows("dynamics", 1))
    run("twin", "dynamics", dyn_cfg, _rows("dynamics", 2))
    run("lr10", "dynamics", {**dyn_cfg, "learning_rate": 1e-2}, _rows("dynamics", 3, lr_from=CHANGE))
    run("slow", "dynamics", dyn_cfg, _rows("dynamics", 4, dt=1.0))
    run("short", "dynamics", dyn_cfg, _rows("dynamics", 5, n=350))
    run("lam_base", "latent_actions", lam_cfg, _rows("latent_actions", 6))
    run("lam_drop", "latent_actions", lam_cfg, _rows("latent_actions", 7, actions_from=CHANGE))
    # one wandb/ folder holding an older healthy run and a newer lr-raised one
    shutil.copytree(out["base"] / "wandb", root / "folder" / "wandb")
    for d in (out["lr10"] / "wandb").iterdir():
        if d.name.startswith("offline-run"):
            shutil.copytree(d, root / "folder" / "wandb" / d.name)
    out["folder"] = root / "folder"
    return out


TH = rules.load_thresholds()


def _cmp(cur: Path, base: Path | None) -> dict:
    """compare.compare()'s per-stage bodies."""
    return compare.compare(cur, [base] if base else [], TH)["doc"]["stages"]


@pytest.mark.fast
def test_seeded_twin_has_no_drift(cmp_runs):
    st = _cmp(cmp_runs["twin"], cmp_runs["base"])["dynamics"]
    assert st["drift"]["onset_step"] is None and st["verdict"] == "normal"
    assert 0.85 < st["drift"]["late_ratio"] < 1.15
    assert not [f for f in st["findings"] if f["severity"] != "info"]


@pytest.mark.fast
def test_lr_raised_tenfold_drifts_from_that_step(cmp_runs):
    st = _cmp(cmp_runs["lr10"], cmp_runs["base"])["dynamics"]
    onset = st["drift"]["onset_step"]
    assert onset is not None and abs(onset - CHANGE) <= 3 * 10, onset  # a few log intervals
    assert st["config_diff"][0]["key"] == "learning_rate"
    assert st["config_diff"][0]["current"] == 1e-2 and st["config_diff"][0]["baseline"] == 1e-3
    f = next(f for f in st["findings"] if f["rule_id"] == "drift_from_baseline")
    assert f["steps"] == [onset] and "learning_rate" in f["message"]
    assert f["severity"] == "critical" and f["value"] >= TH["compare"]["drift_critical_ratio"]


@pytest.mark.fast
def test_unique_actions_falling_to_one(cmp_runs):
    st = _cmp(cmp_runs["lam_drop"], cmp_runs["lam_base"])["latent_actions"]
    f = next(f for f in st["findings"] if f["rule_id"] == "action_diversity_drop")
    assert f["value"] < TH["compare"]["action_drop_ratio"]
    onset = st["actions"]["unique_actions"]["onset_step"]
    assert onset is not None and abs(onset - CHANGE) <= 60, onset
    assert st["drift"]["onset_step"] is None  # the loss itself did not move


@pytest.mark.fast
def test_slower_run_is_a_throughput_regression(cmp_runs):
    st = _cmp(cmp_runs["slow"], cmp_runs["base"])["dynamics"]
    assert st["throughput"]["ratio"] == pytest.approx(0.5, rel=0.05)
    assert any(f["rule_id"] == "throughput_regression" for f in st["findings"])


@pytest.mark.fast
def test_shorter_current_run_uses_common_steps(cmp_runs):
    st = _cmp(cmp_runs["short"], cmp_runs["base"])["dynamics"]
    assert st["drift"]["common_steps"] == [0, 349]
    assert any("common steps 0–349 only" in n for n in st["notes"])
    assert st["drift"]["onset_step"] is None


@pytest.mark.fast
def test_folder_with_several_runs_compares_newest_with_earlier(cmp_runs):
    st = _cmp(cmp_runs["folder"] / "wandb", None)["dynamics"]
    assert any("newest dynamics run compared with the 1 before it" in n for n in st["notes"])
    assert st["drift"]["onset_step"] is not None
    assert st["config_diff"][0]["key"] == "learning_rate"


@pytest.mark.fast
def test_cli_outputs_and_bundles_unchanged(tmp_path, cmp_runs):
    before = {k: tree_fingerprint(cmp_runs[k]) for k in ("lr10", "base")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(cmp_runs["lr10"]),
                        "--baseline", str(cmp_runs["base"]), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stages"]["dynamics"]["verdict"] == "critical"
    assert Path(doc["outputs"]["overlay_dynamics.png"]).is_file()
    assert json.loads((tmp_path / "compare.json").read_text())["stages"]["dynamics"]["drift"]["onset_step"]
    assert {k: tree_fingerprint(cmp_runs[k]) for k in ("lr10", "base")} == before


def test_examples_side_by_side_and_diagnose_baseline(tmp_path):
    """The genuine unhealthy bundle against the genuine healthy one: same
    model and data settings, so the comparison means something."""
    code, doc, err = diagnose(EXAMPLES / "bundle-unhealthy", "--baseline", EXAMPLES / "bundle-healthy",
                              "--out-dir", tmp_path, "--now", "1796169600")
    assert code == 0, err
    full = json.loads((tmp_path / "diagnosis.json").read_text())
    cmp = full["comparison"]["stages"]
    assert cmp["dynamics"]["comparable"] is True and cmp["video_tokenizer"]["comparable"] is True
    assert cmp["dynamics"]["config_diff"][0]["key"] == "learning_rate"
    assert "drift_from_baseline" in {f["rule_id"] for f in cmp["dynamics"]["findings"]}
    from PIL import Image
    with Image.open(doc["outputs"]["compare_sheet"]) as im:
        assert max(im.size) <= 2000
    assert "## Comparison with the baseline" in (tmp_path / "diagnosis.md").read_text()


@pytest.mark.fast
def test_a_baseline_with_other_model_dims_gives_the_config_diff_only(tmp_path, cmp_runs):
    other = tmp_path / "other"
    cfg = synth.stage_config("dynamics", n_updates=N, learning_rate=1e-3, embed_dim=64, batch_size_per_gpu=64)
    synth.wandb_run(other, "dynamics_2026_11_28_08_00_00", cfg, _rows("dynamics", 9, dt=0.001))
    st = _cmp(cmp_runs["base"], other)["dynamics"]
    assert st["comparable"] is False
    assert "embed_dim 64 -> 16" in st["incomparable"] and "batch_size_per_gpu 64 -> 8" in st["incomparable"]
    assert "drift" not in st and "throughput" not in st
    assert {f["rule_id"] for f in st["findings"]} == {"baseline_not_comparable"}
    assert st["verdict"] == "normal" and st["config_diff"]


@pytest.mark.fast
def test_checkpoints_a_thousand_times_smaller(tmp_path, cmp_runs):
    import torch
    cur, base = tmp_path / "cur", tmp_path / "base"
    shutil.copytree(cmp_runs["twin"] / "wandb", cur / "wandb")
    shutil.copytree(cmp_runs["base"] / "wandb", base / "wandb")
    for step in (0, 100, 200):
        synth.write_checkpoint(base / "results" / synth.TS / "dynamics", "dynamics", step, width=128)
        d = synth.write_checkpoint(cur / "results" / synth.TS / "dynamics", "dynamics", step, width=128)
        torch.save({}, d / "model_state_dict.pt")  # the multi-rank {} overwrite
    st = _cmp(cur, base)["dynamics"]
    assert st["checkpoints"]["current"]["count"] == st["checkpoints"]["baseline"]["count"] == 3
    f = next(f for f in st["findings"] if f["rule_id"] == "checkpoint_size_drop")
    assert f["value"] < 0.01 and f["value"] == st["checkpoints"]["size_ratio"]
