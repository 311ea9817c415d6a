#!/usr/bin/env python3
"""Build the example bundles by running upstream TinyWorlds' own training
scripts on CPU, then run diagnose.py on each into examples/outputs/<bundle>/.

    python examples/make_examples.py --tinyworlds PATH [--only NAME ...] [--keep-work DIR]

PATH is a git checkout (or the git dir) of AlmondGod/tinyworlds. The pinned
commit (TINYWORLDS_COMMIT) is exported with `git archive` into a scratch
work tree, so the checkout itself is never touched. Into that work tree go:
  - data/pong_frames.h5: our synthetic data set (tinyworlds_env/dataset.py)
    in the PONG loader's format;
  - configs/examples_cpu_training.yaml: the shared training config below.
Each stage then runs as

    WANDB_MODE=offline MPLBACKEND=Agg OMP_NUM_THREADS=1 TW_EXAMPLE_SEED=<seed> \
    PYTHONPATH=<work tree>:examples/tinyworlds_env NG_RUN_ROOT_DIR=<work>/results/<ts> \
      python scripts/train_<stage>.py --config configs/<stage>.yaml \
        --training_config configs/examples_cpu_training.yaml <overrides>

with the overrides in BUNDLES. `tinyworlds_env/` holds a torchvision
stand-in (PyPI's torchvision does not load against the CPU torch here) and
a sitecustomize that seeds Python/numpy/torch (TinyWorlds sets no seed).
The run root and the wandb run dirs are copied into examples/<bundle>/
(wandb's logs/ and tmp/ dropped, as in ../shared/tinyworlds-sample), then
the documented post-hoc damage, if any, is applied. Every number that
describes a bundle is in examples/README.md.

Needs, besides this package: einops, h5py, opencv-python-headless,
omegaconf, tqdm (`pip install ".[examples]"`) and torch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_DIR = HERE / "tinyworlds_env"
TINYWORLDS_COMMIT = "a99f3a8"  # ../shared/spec: AlmondGod/tinyworlds @ a99f3a8
DATA_SEED, DATA_FRAMES = 0, 4000
NOW = 1796169600.0  # 2026-12-02T00:00:00Z: the outputs judge liveness at a fixed time

# configs/examples_cpu_training.yaml: merged over each stage's own YAML by
# TinyWorlds (training config wins), then the CLI overrides win over both.
TRAINING_CONFIG = """\
use_wandb: true
wandb_project: tinyworlds-examples
dataset: PONG
preload_ratio: 1.0
patch_size: 8
context_length: 4
frame_size: 64
latent_dim: 5
num_bins: 4
n_actions: 4
embed_dim: 16
num_heads: 4
hidden_dim: 32
num_blocks: 1
amp: false
tf32: false
compile: false
device: CPU
distributed:
  use_ddp: False
  use_fsdp: False
  reshard_after_forward: False
nproc_per_node: 1
standalone: true
video_tokenizer_config: configs/video_tokenizer.yaml
latent_actions_config: configs/latent_actions.yaml
dynamics_config: configs/dynamics.yaml
run_video_tokenizer: true
run_latent_actions: true
run_dynamics: true
optimizer: "adamw"
use_moe: false
"""

STAGES = ("video_tokenizer", "latent_actions", "dynamics")
# Per bundle: each stage's seed and CLI overrides (in the order given), and
# post-hoc damage. `{vt}` / `{lam}` become the newest upstream checkpoint of
# the same run root, as TinyWorlds' full_train.py passes them. The action
# model at this size is seed-sensitive: with these settings seeds 11 and 14
# settle on 3 of its 4 actions, seed 13 on 2 and seed 12 on 1.
SANE = {
    "video_tokenizer": ["n_updates=401", "batch_size_per_gpu=16", "log_interval=200", "learning_rate=0.003"],
    "latent_actions": ["n_updates=601", "batch_size_per_gpu=8", "log_interval=300", "learning_rate=0.001"],
    "dynamics": ["n_updates=281", "batch_size_per_gpu=32", "log_interval=140", "learning_rate=0.01",
                 "video_tokenizer_path={vt}", "latent_actions_path={lam}"],
}
SEEDS = {"video_tokenizer": 11, "latent_actions": 11, "dynamics": 13}
BUNDLES = {
    "bundle-healthy": {
        "story": "a sane three-stage pipeline: every stage learns",
        "seeds": SEEDS,
        "stages": SANE,
        "damage": [],
    },
    "bundle-unhealthy": {
        "story": ("the action model is trained at a learning rate 1,000x too low (1e-6) and never leaves its "
                  "collapsed initial state (one action for everything); dynamics trains on it at a "
                  "learning rate 300x too high (3.0) with 2 gradient-accumulation steps and blows up far "
                  "above chance, then partly comes back as the cosine schedule decays; then the newest two "
                  "dynamics checkpoints are overwritten with {} (the multi-rank save bug)"),
        "seeds": SEEDS,
        # Its tokenizer and action model save only at the start and the end
        # (log_interval = n_updates - 1): fewer grids and checkpoints keep the
        # bundle under 6 MB; the problems are in what they learn, not when.
        "stages": {
            "video_tokenizer": ["n_updates=401", "batch_size_per_gpu=16", "log_interval=400",
                                "learning_rate=0.003"],
            "latent_actions": ["n_updates=601", "batch_size_per_gpu=8", "log_interval=600",
                               "learning_rate=0.000001"],
            "dynamics": ["n_updates=400", "batch_size_per_gpu=32", "gradient_accumulation_steps=2",
                         "log_interval=100", "learning_rate=3.0",
                         "video_tokenizer_path={vt}", "latent_actions_path={lam}"],
        },
        "damage": [("dynamics", "empty_newest", 2)],
    },
    "bundle-weak-tokenizer": {
        "story": ("the tokenizer is too small (embed_dim 4, hidden_dim 8) and too short (100 updates) to "
                  "reconstruct the frames; the action model and dynamics are trained sanely on top of it"),
        "seeds": SEEDS,
        "stages": {
            "video_tokenizer": ["n_updates=101", "batch_size_per_gpu=16", "log_interval=50",
                                "learning_rate=0.003", "embed_dim=4", "hidden_dim=8"],
            "latent_actions": SANE["latent_actions"],
            "dynamics": SANE["dynamics"],
        },
        "damage": [],
    },
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_tree(tinyworlds: Path, dest: Path) -> str:
    """`git archive` of the pinned commit into dest; returns the full hash."""
    git = ["git", "-C", str(tinyworlds)]
    full = subprocess.run(git + ["rev-parse", f"{TINYWORLDS_COMMIT}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(git + ["archive", full], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"git archive of {full} failed")
    return full


def prepare_work_tree(tinyworlds: Path, work: Path) -> str:
    commit = export_tree(tinyworlds, work)
    sys.path.insert(0, str(ENV_DIR))
    import dataset
    (work / "data").mkdir(exist_ok=True)
    dataset.write(str(work / "data" / "pong_frames.h5"), DATA_FRAMES, DATA_SEED)
    (work / "configs" / "examples_cpu_training.yaml").write_text(TRAINING_CONFIG)
    return commit


def run_stage(work: Path, run_root: Path, stage: str, overrides: list[str], seed: int) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "TW_EXAMPLE_SEED": str(seed),
           "PYTHONPATH": os.pathsep.join([str(work), str(ENV_DIR)]), "NG_RUN_ROOT_DIR": str(run_root)}
    cmd = [sys.executable, f"scripts/train_{stage}.py", "--config", f"configs/{stage}.yaml",
           "--training_config", "configs/examples_cpu_training.yaml", *overrides]
    log(f"  {stage}: {' '.join(cmd[1:])}")
    t = time.perf_counter()
    with open(run_root.parent / f"{stage}.console.txt", "w") as out:
        subprocess.run(cmd, cwd=work, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def newest_checkpoint(run_root: Path, stage: str) -> Path:
    ckpts = sorted((run_root / stage / "checkpoints").iterdir(),
                   key=lambda p: int(p.name.rsplit("_", 1)[1]))
    return ckpts[-1]


def train_bundle(work: Path, name: str, spec: dict) -> tuple[Path, dict]:
    ts = time.strftime("%Y_%m_%d_%H_%M_%S")  # TinyWorlds' readable_timestamp() format
    run_root = work / "runs" / name / "results" / ts
    run_root.mkdir(parents=True)
    seconds = {}
    for stage in STAGES:
        subs = {}
        if stage == "dynamics":
            subs = {"vt": newest_checkpoint(run_root, "video_tokenizer"),
                    "lam": newest_checkpoint(run_root, "latent_actions")}
        overrides = [o.format(**subs) for o in spec["stages"][stage]]
        seconds[stage] = round(run_stage(work, run_root, stage, overrides, spec["seeds"][stage]), 1)
    return run_root, seconds


def copy_bundle(work: Path, run_root: Path, dest: Path) -> None:
    """results/<ts> and wandb/offline-run-* (without logs/, tmp/ and the pip
    freeze in files/requirements.txt) into dest."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run_root, dest / "results" / run_root.name)
    for run_dir in sorted((work / "wandb").glob("offline-run-*")):
        target = dest / "wandb" / run_dir.name
        shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("logs", "tmp", "requirements.txt"))
        shutil.rmtree(run_dir)  # the next bundle's stages start a fresh set


def apply_damage(dest: Path, damage: list) -> list[str]:
    import torch
    done = []
    for stage, kind, count in damage:
        if kind != "empty_newest":
            raise ValueError(kind)
        for ck in sorted((next((dest / "results").iterdir()) / stage / "checkpoints").iterdir(),
                         key=lambda p: int(p.name.rsplit("_", 1)[1]))[-count:]:
            # What the FSDP multi-rank save bug leaves: rank > 0 saves {} over rank 0's files.
            torch.save({}, ck / "model_state_dict.pt")
            torch.save({}, ck / "optim_state_dict.pt")
            done.append(str(ck.relative_to(dest)))
    return done


MODEL_FACTS = """
import json, sys
from pathlib import Path
from utils.utils import (load_dynamics_from_checkpoint, load_latent_actions_from_checkpoint,
                         load_videotokenizer_from_checkpoint)
loaders = {"video_tokenizer": load_videotokenizer_from_checkpoint,
           "latent_actions": load_latent_actions_from_checkpoint, "dynamics": load_dynamics_from_checkpoint}
out = {}
for stage, ckpts in json.loads(sys.argv[1]).items():
    for ck in ckpts:  # newest first; one the {} overwrite emptied does not load
        try:
            model, _ = loaders[stage](ck, "cpu")
        except Exception:
            continue
        sd = model.state_dict()
        out[stage] = {"checkpoint": Path(ck).name, "tensors": len(sd),
                      "elements": sum(t.numel() for t in sd.values()),
                      "parameters": sum(p.numel() for p in model.parameters())}
        break
print(json.dumps(out))
"""


def model_facts(work: Path, dest: Path) -> dict:
    """What TinyWorlds' own loaders build from each stage's newest loadable
    checkpoint: state-dict tensors and elements, and parameters (the tests
    check our inert reading of the files against these)."""
    run_root = next((dest / "results").iterdir())
    ckpts = {stage: [str(c) for c in sorted((run_root / stage / "checkpoints").iterdir(),
                                            key=lambda p: -int(p.name.rsplit("_", 1)[1]))]
             for stage in STAGES}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(ENV_DIR)])}
    out = subprocess.run([sys.executable, "-c", MODEL_FACTS, json.dumps(ckpts)], cwd=work, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_model_facts(facts: dict) -> None:
    target = HERE / "models.json"
    doc = json.loads(target.read_text()) if target.exists() else {}
    doc.update(facts)
    target.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def diagnose_outputs(name: str) -> None:
    """Run diagnose.py exactly as a user would, into examples/outputs/<name>."""
    out = HERE / "outputs" / name
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(HERE.parent / "scripts" / "diagnose.py"), f"examples/{name}",
                    "--out-dir", f"examples/outputs/{name}", "--now", str(NOW)],
                   cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL)


def probe_outputs(name: str, tinyworlds: Path) -> None:
    """probe_models.py on the committed bundle, measured on the examples' own
    data set (regenerated: same generator, frames and seed), into
    examples/outputs/<name>/probe/."""
    sys.path.insert(0, str(ENV_DIR))
    import dataset
    # a fixed path, so the committed probe.json names the same file on every regeneration
    scratch = Path(tempfile.gettempdir()) / "twdiag-examples-data"
    scratch.mkdir(exist_ok=True)
    data = scratch / "pong_frames.h5"
    dataset.write(str(data), DATA_FRAMES, DATA_SEED)
    out = HERE / "outputs" / name / "probe"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(HERE.parent / "scripts" / "probe_models.py"), f"examples/{name}",
                    "--tinyworlds", str(tinyworlds), "--data", str(data), "--out-dir", f"examples/outputs/{name}/probe"],
                   cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tinyworlds", required=True, type=Path,
                    help="a git checkout (or git dir) of AlmondGod/tinyworlds holding the pinned commit")
    ap.add_argument("--only", action="append", choices=sorted(BUNDLES), help="build only these bundles")
    ap.add_argument("--keep-work", type=Path, help="keep the scratch work tree here (default: deleted)")
    ap.add_argument("--dest", type=Path, help="write the bundles here instead of examples/ "
                    "(for trying settings; no outputs are made)")
    ap.add_argument("--outputs-only", action="store_true",
                    help="do not train: only re-run diagnose.py on the committed bundles")
    ap.add_argument("--facts-only", action="store_true",
                    help="do not train: only record models.json from the committed bundles")
    args = ap.parse_args()
    names = args.only or list(BUNDLES)
    if args.outputs_only:
        for name in names:
            diagnose_outputs(name)
            probe_outputs(name, args.tinyworlds)
        return
    if args.facts_only:
        scratch = Path(tempfile.mkdtemp(prefix="tw-examples-"))
        export_tree(args.tinyworlds, scratch / "tinyworlds")
        write_model_facts({name: model_facts(scratch / "tinyworlds", HERE / name) for name in names})
        shutil.rmtree(scratch, ignore_errors=True)
        return
    scratch = Path(tempfile.mkdtemp(prefix="tw-examples-"))
    work = args.keep_work or scratch / "tinyworlds"
    commit = prepare_work_tree(args.tinyworlds, work)
    log(f"TinyWorlds {commit} exported to {work}")
    for name in names:
        spec = BUNDLES[name]
        log(f"{name}: {spec['story']}")
        run_root, seconds = train_bundle(work, name, spec)
        dest = (args.dest or HERE) / name
        copy_bundle(work, run_root, dest)
        damaged = apply_damage(dest, spec["damage"])
        # after the damage: the newest checkpoint TinyWorlds' loaders can still load
        facts = {name: model_facts(work, dest)} if args.dest is None else {}
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        log(f"{name}: trained in {seconds} s, {size / 1e6:.2f} MB, damage {damaged or 'none'}")
        if args.dest is None:
            write_model_facts(facts)
            diagnose_outputs(name)
            probe_outputs(name, args.tinyworlds)
    if not args.keep_work:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
