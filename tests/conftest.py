"""Shared fixtures. Real artifacts are built once per session: every
`wandb.init` costs about a second."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # test the working tree, not an installed copy
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "wandb-corpus"
SAMPLE = SHARED / "tinyworlds-sample" / "bundle"


def tree_fingerprint(root: Path) -> dict:
    """Bytes and mtimes of every file under root (bundle-safety checks)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.json").is_file():
        pytest.skip("wandb corpus not present (../shared/wandb-corpus)")
    return CORPUS


@pytest.fixture(scope="session")
def sample_bundle() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip("TinyWorlds sample bundle not present (../shared/tinyworlds-sample)")
    return SAMPLE


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict:
    """Real offline wandb runs in healthy and odd shapes, built once."""
    from twdiag import synth
    root = tmp_path_factory.mktemp("runs")
    out = {}
    cfg = synth.stage_config("dynamics", n_updates=600)
    out["healthy"] = synth.wandb_run(root / "healthy", "dynamics_2026_11_28_07_00_00", cfg,
                                     synth.curve_rows("dynamics", 600, seed=1, start=6.9, end=0.4,
                                                      noise=0.04, n_updates=600, base_lr=0.01,
                                                      spike_at=300, actions=synth.healthy_actions()))
    out["nan"] = synth.wandb_run(root / "nan", "dynamics_2026_11_28_07_01_00", cfg,
                                 synth.curve_rows("dynamics", 400, seed=2, start=6.9, end=0.5,
                                                  n_updates=600, nan_from=250,
                                                  actions=synth.healthy_actions()))
    lam_cfg = synth.stage_config("latent_actions", n_updates=600, log_interval=10)
    out["collapse"] = synth.wandb_run(root / "collapse", "latent_actions_2026_11_28_07_02_00", lam_cfg,
                                      synth.curve_rows("latent_actions", 600, seed=3, start=1.4, end=0.05,
                                                       log_interval=10, actions=synth.collapsed_actions))
    out["short"] = synth.wandb_run(root / "short", "video_tokenizer_2026_11_28_07_03_00",
                                   synth.stage_config("video_tokenizer"),
                                   synth.curve_rows("video_tokenizer", 20, seed=4, start=0.5, end=0.1))
    # Odd shapes: non-finite values, histograms, an image, console spam.
    import numpy as np
    import wandb

    def odd_rows():
        for s in range(30):
            row = {"_step": s, "train/loss": [float("nan"), float("inf"), -float("inf")][s % 3]
                   if s in (5, 6, 7) else 1.0 / (s + 1), "nested": {"a": s, "b": {"c": s * 2}}}
            if s % 10 == 0:
                row["action_distribution"] = wandb.Histogram(np.arange(s + 4) % 4, num_bins=4)
                row["frame"] = wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))
            yield row
    out["odd"] = synth.wandb_run(root / "odd", "video_tokenizer_2026_11_28_07_04_00",
                                 synth.stage_config("video_tokenizer"), odd_rows(),
                                 console=lambda s: f"Step {s} Loss: {1.0 / (s + 1):.4f}\r" * 3)
    out["empty"] = synth.wandb_run(root / "empty", "dynamics_2026_11_28_07_05_00", cfg, [])
    # A resumed stage: the second file re-logs steps 150.. after a restart.
    out["resume_a"] = synth.wandb_run(root / "resume" , "latent_actions_2026_11_28_07_06_00", lam_cfg,
                                      synth.curve_rows("latent_actions", 200, seed=5, log_interval=10,
                                                       actions=synth.healthy_actions()))
    out["resume_b"] = synth.wandb_run(root / "resume", "latent_actions_2026_11_28_07_07_00", lam_cfg,
                                      [dict(r, _step=r["_step"] + 150) for r in
                                       synth.curve_rows("latent_actions", 100, seed=6, start=0.2,
                                                        log_interval=10, actions=synth.healthy_actions())])
    out["root"] = root
    return out


@pytest.fixture(scope="session")
def incident(tmp_path_factory) -> dict:
    """The real-incident three-stage history as real .wandb files."""
    from twdiag import synth
    root = tmp_path_factory.mktemp("incident")
    files = {}
    for stage, stride, name in (("video_tokenizer", 10, "video_tokenizer_2026_02_04_19_52_33"),
                                ("latent_actions", 5, "latent_actions_2026_02_05_21_06_49"),
                                ("dynamics", 10, "dynamics_2026_02_06_00_44_34")):
        cfg, rows = synth.incident_rows(stage, stride)
        files[stage] = synth.wandb_run(root, name, cfg, rows, project="tinyworlds-incident")
    files["root"] = root
    return files
