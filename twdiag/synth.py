"""Build TinyWorlds-shaped artifacts with the real tools, for tests, examples
and benchmarks: `.wandb` logs written by wandb in offline mode, checkpoints
written by `torch.save`, and image grids drawn by matplotlib in TinyWorlds'
figure layout. Anomalies are injected into these real artifacts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

TS = "2026_11_28_06_35_02"
STAGE_NAMES = ("video_tokenizer", "latent_actions", "dynamics")


# --- W&B ---------------------------------------------------------------------

def wandb_run(root: Path, name: str, config: dict, rows: Iterable[dict],
              console: Callable[[int], str | None] | None = None,
              project: str = "tinyworlds-synth", run_id: str | None = None) -> Path:
    """Log `rows` (each with a "_step") through a real offline wandb run.

    Returns the `.wandb` file. `console(step)` may return a line to print.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, config=config, mode="offline",
                     dir=str(root), id=run_id, tags=[project, "training"],
                     settings=wandb.Settings(x_disable_stats=True, console="wrap"))
    for row in rows:
        row = dict(row)
        step = row.pop("_step")
        if console is not None:
            line = console(step)
            if line:
                print(line)
        run.log(row, step=step)
    rid = run.id
    run.finish()
    found = sorted((root / "wandb").glob(f"*run-*-{rid}/run-{rid}.wandb"))
    return found[-1]


def stage_config(stage: str, **over) -> dict:
    cfg = {"batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "n_updates": 240,
           "learning_rate": 1e-3, "log_interval": 60, "latent_dim": 5, "num_bins": 4,
           "n_actions": 4, "embed_dim": 16, "num_blocks": 1, "frame_size": 64,
           "context_length": 4, "dataset": "PONG"}
    if stage == "dynamics":
        cfg.update(use_actions=True, learning_rate=1e-2,
                   video_tokenizer_path=f"/old/host/results/{TS}/video_tokenizer/checkpoints/video_tokenizer_step_180",
                   latent_actions_path=f"/old/host/results/{TS}/latent_actions/checkpoints/latent_actions_step_180")
    cfg.update(over)
    return cfg


def cosine_lr(step: int, n_updates: int, base: float) -> float:
    """TinyWorlds' schedule: 5% linear warmup, cosine to a 1% floor."""
    warm = max(1, int(0.05 * n_updates))
    if step < warm:
        return base * (step + 1) / warm
    p = (step - warm) / max(1, n_updates - warm)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def curve_rows(stage: str, n: int, seed: int = 0, start: float = 1.0, end: float = 0.05,
               noise: float = 0.05, n_updates: int | None = None, base_lr: float = 1e-3,
               stride: int = 1, loss_fn: Callable[[int], float] | None = None,
               actions: Callable[[int, np.random.Generator], tuple[int, float]] | None = None,
               log_interval: int = 60, spike_at: int | None = None, nan_from: int | None = None,
               encoder_variance: Callable[[int], float] | None = None, gas: int = 1,
               t0: float | None = None, steps_per_s: float = 5.0) -> list[dict]:
    """History rows shaped like the stage's real logging. `loss_fn` gives the
    real loss; what is logged is divided by `gas` (gradient accumulation), as
    TinyWorlds does. `_timestamp` advances at `steps_per_s`, ending now
    unless `t0` (the time of step 0) is given."""
    import time
    rng = np.random.default_rng(seed)
    n_updates = n_updates or n
    t0 = time.time() - n / steps_per_s if t0 is None else t0
    rows = []
    for step in range(0, n, stride):
        frac = step / max(1, n - 1)
        loss = loss_fn(step) if loss_fn else end + (start - end) * math.exp(-6 * frac)
        loss *= math.exp(rng.normal(0, noise))
        if spike_at is not None and spike_at <= step < spike_at + 3 * stride:
            loss *= 20
        if nan_from is not None and step >= nan_from:
            loss = float("nan")
        lr = cosine_lr(step, n_updates, base_lr)
        row = {"_step": step, "train/loss": loss / gas, "learning_rate/group_0": lr,
               "learning_rate/group_1": lr, "_timestamp": t0 + step / steps_per_s}
        if stage == "video_tokenizer":
            row["train/learning_rate"] = lr
            if step % log_interval == 0:
                row["train/codebook_usage"] = float(np.clip(0.05 + 0.01 * frac + rng.normal(0, 0.002), 0, 1))
        if stage == "latent_actions" and step % log_interval == 0 and actions:
            u, e = actions(step, rng)
            row.update({"unique_actions": u, "action_entropy": e,
                        "latent_actions/codebook_usage": u / 8,
                        "latent_actions/encoder_variance": encoder_variance(step) if encoder_variance
                        else 0.03 + rng.normal(0, 0.002),
                        "latent_actions/decoder_variance": 0.002})
        if stage == "dynamics" and actions:
            u, e = actions(step, rng)
            row.update({"unique_actions": u, "action_entropy": e})
        rows.append(row)
    return rows


def healthy_actions(n_actions: int = 4) -> Callable:
    def f(step, rng):
        u = int(rng.integers(max(2, n_actions - 1), n_actions + 1))
        return u, float(math.log(u) * rng.uniform(0.85, 0.98))
    return f


def collapsed_actions(step, rng):
    return 1, 0.0


# --- the real incident (../shared/spec/real-incidents.md) --------------------

def incident_rows(stage: str, stride: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Rebuild the February 2026 three-stage history, with the windows and
    finals the incident report gives (every `stride`-th step is logged)."""
    if stage == "video_tokenizer":
        n = 40000
        cfg = stage_config(stage, n_updates=n, log_interval=2500, learning_rate=1e-3)

        def loss(step):  # 0.1469 -> ~0.0017 median, a few lows near 0.00043
            return 0.0015 + 0.1454 * math.exp(-step / 1500)
        rows = curve_rows(stage, n, seed, noise=0.12, n_updates=n, stride=stride,
                          loss_fn=loss, log_interval=2500)
        rows[0]["train/loss"] = 0.1469
        rows[-1]["train/loss"] = 0.001531
        return cfg, rows
    if stage == "latent_actions":
        n = 10000
        cfg = stage_config(stage, n_updates=n, n_actions=8, log_interval=100, learning_rate=1e-4)
        plan = [(3.50, 0.927), (4.14, 1.023), (2.57, 0.744)]

        def acts(step, r):
            u_mean, e_mean = plan[min(2, step * 3 // n)]
            u = int(np.clip(round(u_mean + r.normal(0, 0.6)), 2, 5))
            e = float(np.clip(e_mean + r.normal(0, 0.12), 0.377, 1.243))
            return u, e
        rows = curve_rows(stage, n, seed, noise=0.08, n_updates=n, stride=stride,
                          loss_fn=lambda s: 0.025 + 1.02 * math.exp(-s / 300),
                          actions=acts, log_interval=100)
        rows[0]["train/loss"] = 1.0465
        rows[-1]["train/loss"] = 0.02886
        acted = [r for r in rows if "unique_actions" in r]
        acted[-1]["unique_actions"], acted[-1]["action_entropy"] = 2, 0.483
        return cfg, rows
    n = 54113
    cfg = stage_config(stage, n_updates=300000, learning_rate=0.01, n_actions=8,
                       gradient_accumulation_steps=4, log_interval=2000)
    curve = _incident_dynamics_curve(n)

    def loss(step):
        return float(curve[step])

    def acts(step, r):
        u = int(r.integers(2, 6))
        return u, float(np.clip(r.normal(1.0, 0.15), 0.3, 1.6))
    rows = curve_rows(stage, n, seed, noise=0.04, n_updates=300000, base_lr=0.01,
                      stride=stride, loss_fn=loss, actions=acts, steps_per_s=0.37)
    for r in rows:  # the reported minimum is 1.4388, reached near step 600
        r["train/loss"] = max(r["train/loss"], 1.4388)
    rows[600 // stride]["train/loss"] = 1.4388
    rows[0]["train/loss"] = 1.7785
    rows[-1]["train/loss"] = 7.426
    return cfg, rows


def _incident_dynamics_curve(n: int) -> np.ndarray:
    """A rising curve with the incident's 10k-step window means 3.866, 5.054,
    5.730, 6.043, 6.423: 1.7785 at step 0, the 1.4388 minimum at step 600,
    a plateau per window joined by short ramps, then ~6.6-6.9 after 50k.
    (Its thirds come out near the reported 4.547 / 5.512 / 6.441; the report's
    windows and thirds come from two snapshots and cannot both be exact.)"""
    means = [3.866, 5.054, 5.730, 6.043, 6.423]
    steps = np.arange(n)

    def build(first_level: float) -> np.ndarray:
        knots = [(0, 1.7785), (600, 1.4388), (3000, first_level), (9000, first_level)]
        for k, m in enumerate(means[1:], start=1):
            knots += [(k * 10000 + 1000, m), ((k + 1) * 10000 - 1000, m)]
        knots += [(51000, 6.6), (n - 1, 6.9)]
        xs, ys = zip(*knots)
        return np.interp(steps, xs, ys)

    # The first window's mean is linear in its plateau level: solve for it.
    lo, hi = build(0.0)[:10000].mean(), build(1.0)[:10000].mean()
    return build((means[0] - lo) / (hi - lo))


# --- checkpoints ----------------------------------------------------------------

class _Config:
    """Stands in for TinyWorlds' utils.config classes in state.pt."""


def _custom_config_class(module: str, name: str):
    cls = type(name, (_Config,), {"__module__": module, "__qualname__": name})
    import sys
    import types
    mod = sys.modules.get(module) or types.ModuleType(module)
    setattr(mod, name, cls)
    sys.modules[module] = mod
    parent = module.rpartition(".")[0]
    if parent and parent not in sys.modules:  # pickle imports the package first
        sys.modules[parent] = types.ModuleType(parent)
    return cls


def write_checkpoint(stage_dir: Path, stage: str, step: int, seed: int = 0, width: int = 16,
                     config: dict | None = None, nan: bool = False, scale: float = 1.0) -> Path:
    """A checkpoint dir in TinyWorlds' layout, written with torch.save.

    state.pt pickles a class from `utils.config`, as TinyWorlds does; the
    module is registered only while saving, so readers cannot import it.
    """
    import sys

    import torch
    g = torch.Generator().manual_seed(seed + step)
    cfg = dict(config or stage_config(stage))
    if width != 16:
        cfg["embed_dim"] = width
    model = {f"encoder.layers.{i}.weight": torch.randn(width, width, generator=g) * 0.1 * scale
             for i in range(3)}
    model.update({f"encoder.layers.{i}.bias": torch.zeros(width) for i in range(3)})
    model.update(_tinyworlds_tensors(stage, cfg, width, g, scale))
    if nan:
        model["encoder.layers.0.weight"][0, 0] = float("nan")
    names = list(model)
    optim = {"state": {i: {"step": torch.tensor(float(step + 1)),
                           "exp_avg": torch.zeros_like(model[k]),
                           "exp_avg_sq": torch.zeros_like(model[k])} for i, k in enumerate(names)},
             "param_groups": [{"lr": 1e-3, "weight_decay": 0.01, "params": list(range(0, len(names) // 2))},
                              {"lr": 1e-3, "weight_decay": 0.0, "params": list(range(len(names) // 2, len(names)))}]}
    device_cls = _custom_config_class("utils.config", "DeviceType")
    try:
        state = {"scheduler_state_dict": None if stage == "latent_actions" else
                 {"last_epoch": step + 1, "base_lrs": [1e-3, 1e-3]},
                 "config": dict(cfg, device=device_cls()),
                 "step": step, "timestamp": f"2026_11_28_06_{35 + step // 60:02d}_00"}
        d = stage_dir / "checkpoints" / f"{stage}_step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model, d / "model_state_dict.pt")
        torch.save(optim, d / "optim_state_dict.pt")
        torch.save(state, d / "state.pt")
    finally:
        sys.modules.pop("utils.config", None)
        sys.modules.pop("utils", None)
    return d


def _tinyworlds_tensors(stage: str, cfg: dict, width: int, g, scale: float) -> dict:
    """The keys and shapes a TinyWorlds model of this stage registers for this
    config (architectures.yaml), so the checkpoint passes the architecture
    check; dimensions the config does not give get `width`."""
    import torch

    from . import architecture
    spec = architecture.spec().get(stage) or {"keys": {}}
    fields = architecture._fields(cfg)
    blocks = int(cfg.get("num_blocks") or 1)
    out = {}
    for pattern, shape in spec["keys"].items():
        dims = [architecture._eval(d, fields) for d in shape]
        dims = [d if d is not None else width for d in dims]
        for key in ([pattern.replace("{i}", str(i)) for i in range(blocks)] if "{i}" in pattern else [pattern]):
            out[key] = torch.randn(*dims, generator=g) * 0.1 * scale
    return out


# --- image grids ----------------------------------------------------------------

def make_grid(frames: np.ndarray, ncols: int = 4, pad: int = 2) -> np.ndarray:
    """torchvision.utils.make_grid in numpy: HxWx3 cells, `pad` px, one
    min-max normalisation for the whole grid."""
    n, h, w, c = frames.shape
    rows = math.ceil(n / ncols)
    grid = np.zeros((pad + rows * (h + pad), pad + ncols * (w + pad), c), dtype=float)
    for i, f in enumerate(frames):
        r, k = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = f
    lo, hi = grid.min(), grid.max()
    return (grid - lo) / (hi - lo) if hi > lo else grid


def pong_frames(n: int = 16, size: int = 64, seed: int = 0) -> np.ndarray:
    """Dark frames with a dashed centre line, two paddles and a ball."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, size, size, 3)) + 0.05
    for i in range(n):
        f = frames[i]
        f[::8, size // 2 - 1:size // 2 + 1] = 0.6
        y1, y2 = rng.integers(4, size - 16, 2)
        f[y1:y1 + 12, 2:5] = (0.9, 0.9, 0.1)
        f[y2:y2 + 12, size - 5:size - 2] = (0.1, 0.9, 0.9)
        by, bx = rng.integers(6, size - 6, 2)
        f[by:by + 3, bx:bx + 3] = 1.0
    return frames


def write_grid_png(path: Path, original: np.ndarray, reconstructed: np.ndarray,
                   right_title: str = "Reconstructed Sequences (4 sequences × 4 frames)",
                   interpolation: str | None = None) -> Path:
    """TinyWorlds' figure: 16x8 in at 150 dpi, two titled image panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(16, 8), dpi=150)
    axes[0].imshow(make_grid(original), interpolation=interpolation)
    axes[0].set_title("Original Sequences (4 sequences × 4 frames)")
    axes[1].imshow(make_grid(reconstructed), interpolation=interpolation)
    axes[1].set_title(right_title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def predictions(kind: str, original: np.ndarray, seed: int = 0, amount: float = 0.0) -> np.ndarray:
    """Right-panel content: good, flat, repeated texture, stripes, blurry."""
    rng = np.random.default_rng(seed)
    n, h, w, c = original.shape
    if kind == "good":
        return np.clip(original + rng.normal(0, 0.03 + amount, original.shape), 0, 1)
    if kind == "flat":
        colors = rng.uniform(0.2, 0.8, (n, 1, 1, 3))
        return np.broadcast_to(colors, original.shape).copy()
    if kind == "texture":
        tex = rng.uniform(0, 1, (h, w, 3))
        tex[::4] = 0.9
        return np.broadcast_to(tex, original.shape).copy()
    if kind == "stripes":
        stripes = (np.arange(h) // 2 % 2).astype(float)[None, :, None, None]
        return np.broadcast_to(0.2 + 0.6 * stripes, original.shape).copy() + \
            rng.normal(0, 0.01, original.shape)
    if kind == "noise":
        return rng.uniform(0, 1, original.shape)
    if kind == "blurry":
        k = 5
        pad = np.pad(original, ((0, 0), (k, k), (k, k), (0, 0)), mode="edge")
        out = np.zeros_like(original)
        for dy in range(-k, k + 1, 2):
            for dx in range(-k, k + 1, 2):
                out += pad[:, k + dy:k + dy + h, k + dx:k + dx + w]
        return out / ((2 * k) // 2 + 1) ** 2
    raise ValueError(kind)


def masked(frames: np.ndarray, share: float = 0.5, patch: int = 4, seed: int = 0) -> np.ndarray:
    """Dynamics' left panel: ground truth with masked patches set to mid-grey."""
    rng = np.random.default_rng(seed)
    out = frames.copy()
    n, h, w, _ = frames.shape
    keep = rng.uniform(size=(n, h // patch, w // patch)) >= share
    mask = np.repeat(np.repeat(keep, patch, axis=1), patch, axis=2)
    out[~mask] = 0.5
    return out


def lam_targets(frames: np.ndarray) -> np.ndarray:
    """The 12 frames the latent-action decoder predicts: frames 1..3 of each
    4-frame sequence, in the order TinyWorlds lays them out."""
    return frames.reshape(4, 4, *frames.shape[1:])[:, 1:].reshape(12, *frames.shape[1:])


def write_wandb_log(path: Path, payloads: Iterable[bytes]) -> Path:
    """A `.wandb` file in the standard layout holding these record payloads
    (serialised `wandb_internal_pb2.Record`s), framed as wandb frames them:
    for forging records wandb itself would never write (a NaN `_step`, a
    120 MB console line) from a genuine log's records."""
    import zlib

    from . import wandb_log as wl
    out = bytearray(wl.HEADER.pack(wl.IDENT, wl.MAGIC, wl.VERSION))

    def room() -> int:
        return wl.BLOCK - len(out) % wl.BLOCK

    for payload in payloads:
        first = True
        while True:
            if room() < wl.CHUNK.size:
                out += b"\0" * room()
            take = min(len(payload), room() - wl.CHUNK.size)
            piece, payload = payload[:take], payload[take:]
            last = not payload
            kind = wl.FULL if first and last else wl.FIRST if first else wl.LAST if last else wl.MIDDLE
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += wl.CHUNK.pack(crc, len(piece), kind) + piece
            first = False
            if last:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def log_records(path: Path) -> list:
    """The parsed Record messages of a `.wandb` file, in order."""
    from . import history, wandb_log
    _, payloads = wandb_log.scan(path)
    record = history._proto().Record
    return [record.FromString(p) for p in payloads]
