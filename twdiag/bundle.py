"""Find a TinyWorlds run bundle's artifacts: `.wandb` logs, run roots, stages.

A bundle root holds `results/` and/or `wandb/`; any narrower path (a `wandb/`
dir, one run dir, one `.wandb` file, a run root, a stage dir, a checkpoints
dir) is accepted too. Nothing here writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("video_tokenizer", "latent_actions", "dynamics")
# Forks name the latent-action stage differently; all mean the same stage.
ALIASES = {
    "video_tokenizer": "video_tokenizer", "tokenizer": "video_tokenizer",
    "latent_actions": "latent_actions", "lam": "latent_actions",
    "actions": "latent_actions", "action_tokenizer": "latent_actions",
    "dynamics": "dynamics",
}
_RUN_DIR = re.compile(r"^(offline-)?run-(\d{8}_\d{6})-([a-z0-9]+)$")
_NAME = re.compile(r"^(?P<stage>[a-z_]+?)_(?P<ts>\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2})$")


def canonical_stage(name: str | None) -> str | None:
    return ALIASES.get((name or "").strip().lower())


@dataclass
class WandbFile:
    path: Path
    run_id: str | None = None
    dir_time: str | None = None  # YYYYMMDD_HHMMSS from the run dir name
    offline: bool = False

    @classmethod
    def from_path(cls, path: Path) -> "WandbFile":
        m = _RUN_DIR.match(path.parent.name)
        if m:
            return cls(path, m.group(3), m.group(2), bool(m.group(1)))
        rid = path.stem[4:] if path.stem.startswith("run-") else None
        return cls(path, rid)


@dataclass
class Bundle:
    """What was found under the paths given."""

    root: Path
    wandb_files: list[WandbFile] = field(default_factory=list)
    run_roots: list[Path] = field(default_factory=list)  # results/<ts>/
    notes: list[str] = field(default_factory=list)


def stage_from_run_name(name: str | None) -> str | None:
    """TinyWorlds names runs `{stage}_{YYYY_MM_DD_HH_MM_SS}`."""
    m = _NAME.match(name or "")
    if m:
        return canonical_stage(m.group("stage"))
    for alias in sorted(ALIASES, key=len, reverse=True):
        if (name or "").lower().startswith(alias + "_"):
            return ALIASES[alias]
    return None


def stage_from_config(config: dict, history_keys: list[str] | None = None) -> str | None:
    """Fallback when the run name says nothing: config and logged keys."""
    for key in ("stage", "model_type", "train_stage"):
        stage = canonical_stage(str(config.get(key, "")))
        if stage:
            return stage
    keys = set(history_keys or [])
    if "video_tokenizer_path" in config or "latent_actions_path" in config:
        return "dynamics"
    if any(k.startswith("latent_actions/") for k in keys):
        return "latent_actions"
    if "train/codebook_usage" in keys:
        return "video_tokenizer"
    return None


def find_wandb_files(path: Path) -> list[WandbFile]:
    """Every `.wandb` file at or under `path`, deduplicated (latest-run links)."""
    path = Path(path)
    if path.is_file():
        return [WandbFile.from_path(path)] if path.suffix == ".wandb" else []
    candidates = []
    for base in (path, path / "wandb"):
        if base.is_dir():
            candidates += sorted(base.glob("*.wandb"))
            candidates += sorted(base.glob("*run-*/*.wandb"))
    seen, out = set(), []
    for c in candidates:
        real = c.resolve()
        if real in seen:
            continue
        seen.add(real)
        out.append(WandbFile.from_path(c))
    return out


def _is_stage_dir(p: Path) -> bool:
    return p.is_dir() and canonical_stage(p.name) is not None and (
        (p / "checkpoints").is_dir() or (p / "visualizations").is_dir())


def find_run_roots(path: Path) -> list[Path]:
    """Run roots (dirs holding stage dirs), newest name last."""
    path = Path(path)
    if not path.is_dir():
        return []
    if any(_is_stage_dir(c) for c in path.iterdir()):
        return [path]
    roots = []
    for base in (path, path / "results"):
        if base.is_dir():
            roots += [c for c in sorted(base.iterdir())
                      if c.is_dir() and any(_is_stage_dir(s) for s in c.iterdir())]
    return sorted(set(roots), key=lambda p: p.name)


def stage_dirs(run_root: Path) -> dict[str, Path]:
    """Map canonical stage -> its dir under a run root (aliases resolved)."""
    out: dict[str, Path] = {}
    for child in sorted(Path(run_root).iterdir()):
        stage = canonical_stage(child.name)
        if stage and child.is_dir() and stage not in out:
            out[stage] = child
    return out


def locate_stage(path: Path) -> tuple[str | None, Path | None]:
    """For a narrow input (stage dir, checkpoints dir, one checkpoint, a
    visualizations dir), return (stage, stage dir)."""
    path = Path(path)
    for p in (path, *path.parents):
        stage = canonical_stage(p.name)
        if stage and p.is_dir():
            return stage, p
        if p.name in ("checkpoints", "visualizations"):
            continue
    return None, None


def discover(path: str | Path) -> Bundle:
    path = Path(path)
    b = Bundle(root=path)
    if not path.exists():
        b.notes.append(f"{path}: does not exist")
        return b
    b.wandb_files = find_wandb_files(path)
    b.run_roots = find_run_roots(path)
    return b


def bundle_root_of(path: Path) -> Path:
    """The bundle root above a narrower path: the dir holding results/ or wandb/."""
    path = Path(path).resolve()
    for p in (path, *path.parents):
        if (p / "results").is_dir() or (p / "wandb").is_dir():
            return p
    return path if path.is_dir() else path.parent
