#!/usr/bin/env python3
"""Generate the example bundles: real wandb (offline mode) logs, real
torch.save checkpoints and real matplotlib image grids, in TinyWorlds' layout,
then run diagnose.py on each into examples/outputs/<bundle>/.

  python examples/make_examples.py     # rewrites examples/bundle-* and examples/outputs

bundle-healthy:   three stages learning normally (dynamics ends far below
                  chance), reconstructions improving, every checkpoint valid.
bundle-unhealthy: several problems at once, as in the real incident:
  - latent_actions collapses to one action;
  - dynamics' loss climbs back toward chance ln(1024) = 6.93 after a learning
    rate set too high, and its late predictions are one texture for every input;
  - the newest dynamics checkpoints were overwritten with {} (the multi-rank
    save bug), so the fallback is dynamics_step_150.
Only the .wandb files (and wandb's files/output.log) are kept, to stay small.
"""
import math
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from twdiag import synth  # noqa: E402

N = 600
CKPT_STEPS = (0, 150, 300, 450)
IMAGE_STEPS = (0, 300, 450)  # three grids per stage keep each bundle under 5 MB


def _prune(root: Path) -> None:
    for run_dir in (root / "wandb").glob("*run-*"):
        for junk in ("logs", "tmp"):
            shutil.rmtree(run_dir / junk, ignore_errors=True)
        for f in (run_dir / "files").glob("*"):
            if f.name != "output.log":
                f.unlink()
    for extra in (root / "wandb").glob("debug*.log"):
        extra.unlink()
    latest = root / "wandb" / "latest-run"
    if latest.is_symlink():
        latest.unlink()


def build(root: Path, unhealthy: bool) -> None:
    shutil.rmtree(root / "wandb", ignore_errors=True)
    cfg = synth.stage_config
    synth.wandb_run(root, "video_tokenizer_2026_11_28_06_35_05", cfg("video_tokenizer", n_updates=N),
                    synth.curve_rows("video_tokenizer", N, seed=1, start=0.45, end=0.02, noise=0.05),
                    console=lambda s: f"Step {s} Loss: 0.1" if s % 60 == 0 else None)
    lam_actions = synth.collapsed_actions if unhealthy else synth.healthy_actions()
    synth.wandb_run(root, "latent_actions_2026_11_28_06_36_26",
                    cfg("latent_actions", n_updates=N, log_interval=10),
                    synth.curve_rows("latent_actions", N, seed=2, start=1.4, end=0.03, noise=0.05,
                                     log_interval=10, actions=lam_actions))

    def diverging(step):  # learns, then unlearns as the high lr kicks in
        return 0.6 + 6.3 * math.exp(-step / 40) + (5.8 * (step - 200) / (N - 200) if step > 200 else 0)
    rows = synth.curve_rows("dynamics", N, seed=3, start=6.9, end=0.4, noise=0.04, n_updates=N,
                            base_lr=0.05 if unhealthy else 0.01, loss_fn=diverging if unhealthy else None,
                            actions=synth.healthy_actions())
    synth.wandb_run(root, "dynamics_2026_11_28_06_37_33", cfg("dynamics", n_updates=N), rows)
    _prune(root)
    _results(root, unhealthy)


def _results(root: Path, unhealthy: bool) -> None:
    """Checkpoints and image grids under results/<run>/<stage>/."""
    import torch
    run = root / "results" / synth.TS
    shutil.rmtree(root / "results", ignore_errors=True)
    for k, step in enumerate(CKPT_STEPS):
        late = k >= 2
        for stage in synth.STAGE_NAMES:
            synth.write_checkpoint(run / stage, stage, step, config=synth.stage_config(
                stage, n_updates=N, video_tokenizer_path=f"{OLD_HOST}/video_tokenizer/checkpoints/"
                "video_tokenizer_step_450", latent_actions_path=f"{OLD_HOST}/latent_actions/"
                "checkpoints/latent_actions_step_450") if stage == "dynamics" else None)
            if step not in IMAGE_STEPS:
                continue
            o = synth.pong_frames(16, seed=100 * k + len(stage))
            if stage == "latent_actions":
                pred = synth.predictions("good", synth.lam_targets(o), seed=k, amount=0.3 * (1 - k / 3))
                synth.write_grid_png(run / stage / "visualizations" /
                                     f"reconstructions_latent_actions_step_{step}.png", o, pred, LAM_TITLE)
            elif stage == "video_tokenizer":
                pred = synth.predictions("good", o, seed=k, amount=0.3 * (1 - k / 3))
                synth.write_grid_png(run / stage / "visualizations" / f"video_tokenizer_recon_step_{step}.png",
                                     o, pred)
            else:
                kind = "texture" if unhealthy and late else "good"
                pred = synth.predictions(kind, o, seed=7 if kind == "texture" else k, amount=0.3 * (1 - k / 3))
                synth.write_grid_png(run / stage / "visualizations" / f"dynamics_prediction_step_{step}.png",
                                     synth.masked(o, seed=k), pred)
    if unhealthy:  # ranks > 0 saved {} over rank 0's files
        for step in CKPT_STEPS[2:]:
            d = run / "dynamics" / "checkpoints" / f"dynamics_step_{step}"
            torch.save({}, d / "model_state_dict.pt")
            torch.save({}, d / "optim_state_dict.pt")


OLD_HOST = f"/old/host/results/{synth.TS}"  # bundles move: paths resolve by suffix
LAM_TITLE = "Reconstructed Sequences (4 sequences × 4 frames)"


def outputs(name: str) -> None:
    """Run diagnose.py exactly as a user would, into examples/outputs/<name>."""
    import subprocess
    out = HERE / "outputs" / name
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(HERE.parent / "scripts" / "diagnose.py"), f"examples/{name}",
                    "--out-dir", f"examples/outputs/{name}", "--now", str(NOW)],
                   cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL)


NOW = 1795856400.0  # 2026-11-28T09:00:00Z: liveness is judged at a fixed time


if __name__ == "__main__":
    for name in ("bundle-healthy", "bundle-unhealthy"):
        build(HERE / name, unhealthy=name == "bundle-unhealthy")
        outputs(name)
