"""Shared fixtures. Real artifacts are built once per session: every
`wandb.init` costs about a second. `diagnose()` runs the CLI in-process
(same code path as the script, minus ~2 s of interpreter and import start-up).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
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


@pytest.fixture(autouse=True, scope="session")
def _serial_in_the_test_process():
    """In-process calls run serially. Whether a pytest worker may fork
    (forking.can_fork) depends on whether an earlier test in it started
    wandb's threads, so forked and serial runs alternated at random between
    sessions. The forked paths are tested in fresh processes instead
    (test_background, test_examples_outputs, test_probe), as users run them."""
    from twdiag import forking
    can_fork = forking.can_fork
    forking.can_fork = lambda: False
    yield
    forking.can_fork = can_fork
SAMPLE = SHARED / "tinyworlds-sample" / "bundle"
EXAMPLES = ROOT / "examples"
SCRIPTS = ROOT / "scripts"


def tree_fingerprint(root: Path) -> dict:
    """Bytes and mtimes of every file under root (bundle-safety checks)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


def run_read_only(bundle: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run argv with `bundle` genuinely read-only, as on a read-only mount.
    A normal user: write bits removed (and restored). Root, whom permission
    bits do not stop: a read-only bind mount of the bundle in a private mount
    namespace (`unshare`), seen by that process only. Skips if neither works."""
    kw = {"capture_output": True, "text": True, **kw}
    if os.geteuid() != 0:
        tree = [bundle, *bundle.rglob("*")]
        for p in tree:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            return subprocess.run(argv, **kw)
        finally:
            for p in tree:
                p.chmod(p.stat().st_mode | 0o200)
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            'mount --bind -o ro "$0" "$0" && ! touch "$0/.probe" 2>/dev/null', str(bundle)],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without a way to mount read-only (unshare -m)")
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           'mount --bind -o ro "$0" "$0" && exec "$@"', str(bundle), *argv], **kw)


def cli(*args) -> tuple[int, dict, str]:
    """Run `twdiag <args>` in-process: (exit code, stdout JSON, stderr)."""
    from twdiag import cli as cli_mod
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_mod.main([str(a) for a in args])
    text = out.getvalue()
    return code, (json.loads(text) if text.strip() else {}), err.getvalue()


def diagnose(*args) -> tuple[int, dict, str]:
    return cli("diagnose", *args)


def copy_fresh(src: Path, dst: Path) -> Path:
    """A copy the way backups and `cp` without -p make them: fresh mtimes."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def now_after(wandb_file: Path, seconds: float) -> str:
    """A `--now` this many seconds after the newest record of a log."""
    from twdiag import history, runstate
    return str(runstate.record_times(history.decode(wandb_file))["newest"] + seconds)


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
    out["resume_a"] = synth.wandb_run(root / "resume", "latent_actions_2026_11_28_07_06_00", lam_cfg,
                                      synth.curve_rows("latent_actions", 200, seed=5, log_interval=10,
                                                       actions=synth.healthy_actions()))
    out["resume_b"] = synth.wandb_run(root / "resume", "latent_actions_2026_11_28_07_07_00", lam_cfg,
                                      [dict(r, _step=r["_step"] + 150) for r in
                                       synth.curve_rows("latent_actions", 100, seed=6, start=0.2,
                                                        log_interval=10, actions=synth.healthy_actions())])
    out["root"] = root
    return out


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict:
    """Real offline wandb runs in the failure shapes of genuine TinyWorlds runs."""
    from twdiag import synth
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    n = 1200
    chance = math.log(1024)

    def blowup_back(step):  # learns, blows up ~3x chance, comes back as the cosine lr decays
        if step < 300:
            return 6.9 * math.exp(-step / 120) + 2.0
        if step < 700:
            return 2.2 + 19.0 * math.sin(math.pi * (step - 300) / 400) ** 0.5
        return 2.2 + 3.0 * math.exp(-(step - 700) / 150)
    cfg = synth.stage_config("dynamics", n_updates=n, gradient_accumulation_steps=4)
    out["dyn_blowup_back"] = synth.wandb_run(
        root / "a", "dynamics_2026_11_29_01_00_00", cfg,
        synth.curve_rows("dynamics", n, seed=7, loss_fn=blowup_back, noise=0.03, n_updates=n, base_lr=0.01,
                         gas=4, actions=synth.healthy_actions()))
    # dynamics near 3x chance on the real scale, logged / 4: "0.79 of chance" if read as logged
    out["dyn_3x_chance"] = synth.wandb_run(
        root / "b", "dynamics_2026_11_29_01_01_00", cfg,
        synth.curve_rows("dynamics", 600, seed=8, loss_fn=lambda s: chance * (1.2 + 1.8 * min(1, s / 200)),
                         noise=0.03, n_updates=n, base_lr=0.01, gas=4, actions=synth.healthy_actions()))
    lam_cfg = synth.stage_config("latent_actions", n_updates=n, log_interval=10, n_actions=8,
                                 learning_rate=1e-4)
    out["lam_never_learned"] = synth.wandb_run(
        root / "c", "latent_actions_2026_11_29_01_02_00", lam_cfg,
        synth.curve_rows("latent_actions", 600, seed=9, loss_fn=lambda s: 1.4 - 0.0001 * s, noise=0.01,
                         log_interval=10, actions=synth.collapsed_actions, base_lr=1e-4,
                         encoder_variance=lambda s: 1.5e-7 + 1e-10 * s))

    def narrowing(step, rng):  # the incident's phases, late entropy at 42% of ln 8
        phase = min(2, step * 3 // 600)
        e = (0.93, 1.05, 0.875)[phase] + rng.normal(0, 0.08)
        u = int(round((4.6, 5.0, 4.3)[phase] + rng.normal(0, 0.4)))
        return u, float(e)
    out["lam_narrowing"] = synth.wandb_run(
        root / "d", "latent_actions_2026_11_29_01_03_00", lam_cfg,
        synth.curve_rows("latent_actions", 600, seed=10, start=1.4, end=0.03, log_interval=5,
                         actions=narrowing))
    tok_cfg = synth.stage_config("video_tokenizer", n_updates=n)
    out["tok_exploded"] = synth.wandb_run(
        root / "e", "video_tokenizer_2026_11_29_01_04_00", tok_cfg,
        synth.curve_rows("video_tokenizer", 400, seed=11, loss_fn=lambda s: 0.47 if s < 8 else 4.0 + 0.001 * s,
                         noise=0.02))
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


@pytest.fixture(scope="session")
def incident_bundle(tmp_path_factory, incident) -> Path:
    """The incident's logs plus its 28 dynamics checkpoints, 25 of them {}."""
    import torch

    from twdiag import synth
    b = tmp_path_factory.mktemp("incident_bundle") / "bundle"
    shutil.copytree(incident["root"] / "wandb", b / "wandb")
    stage_dir = b / "results" / "2026_02_06_00_44_34" / "dynamics"
    for step in range(0, 56000, 2000):
        d = synth.write_checkpoint(stage_dir, "dynamics", step, config={})
        if step not in (26000, 44000, 52000):
            torch.save({}, d / "model_state_dict.pt")
            torch.save({}, d / "optim_state_dict.pt")
    return b


@pytest.fixture(scope="session")
def unhealthy(tmp_path_factory) -> dict:
    """One diagnose of the unhealthy example at the examples' fixed --now,
    run from the project root with a relative path (as examples/outputs was
    made), shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("unhealthy") / "out"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code, doc, err = diagnose("examples/bundle-unhealthy", "--out-dir", out, "--now", "1796169600")
    finally:
        os.chdir(cwd)
    assert code == 0, err
    return {"out": out, "compact": doc, "full": json.loads((out / "diagnosis.json").read_text())}
