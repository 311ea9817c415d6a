#!/usr/bin/env python3
"""Generate the example bundles with real wandb (offline mode).

  python examples/make_examples.py            # rewrites examples/bundle-*/wandb

bundle-healthy:   three stages learning normally (dynamics ends far below chance).
bundle-unhealthy: the latent-action model collapses to one action and the
                  dynamics loss climbs back toward chance ln(1024) = 6.93 after a
                  learning-rate set too high.
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


if __name__ == "__main__":
    build(HERE / "bundle-healthy", unhealthy=False)
    build(HERE / "bundle-unhealthy", unhealthy=True)
