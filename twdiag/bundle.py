"""Find a TinyWorlds run bundle's artifacts once: W&B logs, checkpoints and
image grids per stage. Every analysis gets this one `Bundle`.

A bundle root holds `results/` and/or `wandb/`:

    wandb/(offline-)run-<ts>-<id>/run-<id>.wandb
    results/<run>/<stage>/checkpoints/<stage>_step_<N>/{model_state_dict.pt, optim_state_dict.pt, state.pt}
    results/<run>/<stage>/visualizations/*_step_<N>.png

Narrower inputs work too (a `wandb/` dir, a run dir, one `.wandb` file, an
exported history table, a run root, a stage dir, a checkpoints or
visualizations dir, one checkpoint, one PNG), so the step scripts can be
pointed at just what they check. With several run roots, each stage's
checkpoints and images come from the newest run root that has any.

Which stage a `.wandb` file belongs to is only known once it is decoded
(its run name), so `logs.load` fills `StageArtifacts.logs` later. Nothing
here writes or opens a file's contents; entries that are not regular files
(FIFOs, devices, dangling links, loops) are listed in `skipped`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import safefs

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
_CKPT_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<kind>step|checkpoint)_(?P<step>\d+)"
                        r"(?P<ext>\.(?:pt|pth|ckpt))?$")
CKPT_SUFFIXES = (".pt", ".pth", ".ckpt")
TABLE_SUFFIXES = (".csv", ".json", ".parquet")
_IMAGE_STEP = re.compile(r"_step_(\d+)\.png$", re.IGNORECASE)
# File-name stems of each stage's grids (TinyWorlds' own names).
IMAGE_STEMS = (("video_tokenizer_recon", "video_tokenizer"),
               ("reconstructions_latent_actions", "latent_actions"),
               ("dynamics_prediction", "dynamics"))
DEFAULT_MAX_ENTRIES = 100_000
# An explicit log whose stage its own run name decides (diagnose given one .wandb file).
ANY_STAGE = "*"


def canonical_stage(name: str | None) -> str | None:
    return ALIASES.get((name or "").strip().lower())


def stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


# --- records -----------------------------------------------------------------------

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
class ImageFile:
    stage: str
    step: int          # on the stage's global axis once lineage.place_resumed ran (a resume's offset added)
    path: Path
    local_step: int | None = None  # the step in the file's name, when it differs


@dataclass
class CheckpointRef:
    step: int
    path: Path  # a <stage>_step_<N>/ dir, or one <name>_checkpoint_<N>.pt file


@dataclass
class EarlierRoot:
    """A stage's checkpoints and grids in an older run root that a newer one replaced."""

    run_root: Path | None
    checkpoints: list[CheckpointRef]
    images: int

    def summary(self) -> dict:
        return {"run_root": str(self.run_root), "checkpoint_steps": [c.step for c in self.checkpoints][:50],
                "checkpoints": len(self.checkpoints), "images": self.images}


@dataclass
class StageArtifacts:
    """What the bundle holds for one stage."""

    stage: str
    run_root: Path | None = None
    stage_dir: Path | None = None
    checkpoints_dir: Path | None = None
    checkpoints: list[CheckpointRef] = field(default_factory=list)
    images: list[ImageFile] = field(default_factory=list)
    logs: list = field(default_factory=list)  # history.RunLog, filled by logs.load
    # older run roots' artifacts of this stage that a newer run root replaced
    # (an earlier attempt's): listed, never silently dropped
    earlier: list[EarlierRoot] = field(default_factory=list)


@dataclass
class Bundle:
    root: Path                      # where outputs and recorded paths are judged from
    wandb_files: list[WandbFile] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)  # exported {stage}_history_* files
    explicit: dict[Path, str] = field(default_factory=dict)  # --run: resolved path -> stage
    stages: dict[str, StageArtifacts] = field(default_factory=dict)
    run_roots: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageArtifacts:
        if name not in self.stages:
            self.stages[name] = StageArtifacts(name)
        return self.stages[name]

    def ordered_stages(self) -> list[str]:
        return sorted(self.stages, key=stage_order)

    def skip(self, path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    @property
    def empty(self) -> bool:
        return not (self.wandb_files or self.tables or any(
            a.checkpoints or a.images for a in self.stages.values()))


# --- names --------------------------------------------------------------------------

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


def parse_checkpoint_name(name: str) -> tuple[str | None, int] | None:
    """`dynamics_step_1200` -> ('dynamics', 1200); aliases map to their stage."""
    m = _CKPT_NAME.match(name)
    if not m:
        return None
    return canonical_stage(m.group("prefix")), int(m.group("step"))


def stage_of_image(name: str) -> str | None:
    low = name.lower()
    return next((stage for stem, stage in IMAGE_STEMS if low.startswith(stem)), None)


def image_step(name: str) -> int | None:
    m = _IMAGE_STEP.search(name)
    return int(m.group(1)) if m else None


# --- discovery ------------------------------------------------------------------------

class _Walker:
    """Directory listings with a size cap; unreadable entries go to skipped."""

    def __init__(self, b: Bundle, max_entries: int) -> None:
        self.b, self.max = b, max_entries

    def ls(self, folder: Path) -> list[Path]:
        found, cut = safefs.entries(folder, self.max)
        if cut:
            self.b.skip(folder, f"more than {self.max} entries: only the first {self.max} were read")
        return found

    def dirs(self, folder: Path) -> list[Path]:
        return [p for p in self.ls(folder) if safefs.is_dir(p)]

    def regular(self, path: Path) -> bool:
        try:
            safefs.check_regular(path)
            return True
        except safefs.Unreadable as exc:
            self.b.skip(path, str(exc))
            return False


def _is_stage_dir(p: Path) -> bool:
    return canonical_stage(p.name) is not None and safefs.is_dir(p) and (
        safefs.is_dir(p / "checkpoints") or safefs.is_dir(p / "visualizations"))


def is_run_root(p: Path, w: _Walker | None = None) -> bool:
    entries = w.ls(p) if w else safefs.entries(p, DEFAULT_MAX_ENTRIES)[0]
    return any(_is_stage_dir(c) for c in entries)


def bundle_root_of(path: Path) -> Path:
    """The bundle root at or above a path: the nearest dir holding results/ or wandb/."""
    path = safefs.resolve(path)
    for p in (path, *path.parents):
        if safefs.is_dir(p / "results") or safefs.is_dir(p / "wandb"):
            return p
    return path if safefs.is_dir(path) else path.parent


def locate_stage(path: Path) -> tuple[str | None, Path | None]:
    """For a narrow input inside a stage dir, (stage, stage dir)."""
    path = Path(path)
    for p in (path, *path.parents):
        stage = canonical_stage(p.name)
        if stage and safefs.is_dir(p):
            return stage, p
    return None, None


def _wandb_files(w: _Walker, path: Path) -> list[Path]:
    out = []
    for base in (path, path / "wandb"):
        if not safefs.is_dir(base):
            continue
        children = w.ls(base)
        out += [c for c in children if c.suffix == ".wandb"]
        for run_dir in children:
            if run_dir.name.startswith(("run-", "offline-run-")) and safefs.is_dir(run_dir):
                out += [c for c in w.ls(run_dir) if c.suffix == ".wandb"]
    return out


def _add_wandb(w: _Walker, b: Bundle, files: list[Path], seen: set) -> None:
    for f in files:
        try:
            safefs.check_regular(f)
        except safefs.Unreadable as exc:  # a stage may have lost its only log: say so
            b.skipped.append({"path": str(f), "reason": str(exc), "kind": "wandb_log"})
            continue
        real = safefs.resolve(f)
        if real in seen:  # wandb's latest-run link points at a run dir already listed
            continue
        seen.add(real)
        b.wandb_files.append(WandbFile.from_path(f))


def _checkpoints_in(w: _Walker, ckpt_dir: Path) -> list[CheckpointRef]:
    out = []
    for child in w.ls(ckpt_dir):
        parsed = parse_checkpoint_name(child.name)
        if not parsed:
            continue
        if safefs.is_dir(child) or (child.suffix in CKPT_SUFFIXES and w.regular(child)):
            out.append(CheckpointRef(parsed[1], child))
    return sorted(out, key=lambda c: c.step)


def _images_in(w: _Walker, folder: Path, stage: str | None) -> list[ImageFile]:
    out = []
    for p in w.ls(folder):
        step = image_step(p.name)
        if step is not None and w.regular(p):
            out.append(ImageFile(stage or stage_of_image(p.name) or "unknown", step, p))
    return sorted(out, key=lambda i: i.step)


def _use_stage_dir(w: _Walker, b: Bundle, stage: str, sdir: Path, run_root: Path | None) -> bool:
    """Fill a stage from its dir; False when the dir holds nothing."""
    cdir, vdir = sdir / "checkpoints", sdir / "visualizations"
    ckpts = _checkpoints_in(w, cdir) if safefs.is_dir(cdir) else []
    images = _images_in(w, vdir, stage) if safefs.is_dir(vdir) else []
    if not ckpts and not images and stage in b.stages and b.stages[stage].stage_dir:
        return False
    a = b.stage(stage)
    if a.checkpoints or a.images:
        a.earlier.append(EarlierRoot(a.run_root, a.checkpoints, len(a.images)))
    a.run_root, a.stage_dir = run_root, sdir
    a.checkpoints_dir = cdir if safefs.is_dir(cdir) else None
    a.checkpoints, a.images = ckpts, images
    return bool(ckpts or images)


def _run_roots(w: _Walker, path: Path) -> list[Path]:
    """Run roots at or under path (or path/results), oldest name first."""
    if is_run_root(path, w):
        return [path]
    roots = set()
    for base in (path, path / "results"):
        if safefs.is_dir(base):
            roots |= {c for c in w.dirs(base) if is_run_root(c, w)}
    return sorted(roots, key=lambda p: p.name)


def _add_results(w: _Walker, b: Bundle, path: Path) -> None:
    """Stages from the run roots under path; newer run roots replace older ones
    for every stage they hold checkpoints or images of."""
    for root in _run_roots(w, path):
        b.run_roots.append(root)
        for child in w.ls(root):
            stage = canonical_stage(child.name)
            if stage and safefs.is_dir(child):
                _use_stage_dir(w, b, stage, child, root)


def _add_narrow(w: _Walker, b: Bundle, path: Path) -> bool:
    """A path naming one checkpoint, a checkpoints or visualizations dir, a
    stage dir, one image or one table. False when it is none of those."""
    name = path.name
    parsed = parse_checkpoint_name(name)
    if parsed and (safefs.is_dir(path) or path.suffix in CKPT_SUFFIXES):
        if not safefs.is_dir(path) and not w.regular(path):
            return True
        stage = parsed[0] or locate_stage(path.parent)[0] or "unknown"
        a = b.stage(stage)
        a.checkpoints_dir, a.checkpoints = path.parent, [CheckpointRef(parsed[1], path)]
        a.stage_dir = a.stage_dir or locate_stage(path.parent)[1]
        a.run_root = a.run_root or (a.stage_dir.parent if a.stage_dir else None)
        return True
    if path.suffix.lower() == ".png":
        if w.regular(path):
            stage = stage_of_image(name) or locate_stage(path)[0] or "unknown"
            b.stage(stage).images.append(ImageFile(stage, image_step(name) or 0, path))
        return True
    if path.suffix in TABLE_SUFFIXES:
        if w.regular(path):
            b.tables.append(path)
        return True
    if name in ("checkpoints", "visualizations") and safefs.is_dir(path):
        stage, sdir = locate_stage(path.parent)
        stage = stage or "unknown"
        a = b.stage(stage)
        a.stage_dir, a.run_root = sdir, sdir.parent if sdir else None
        if name == "checkpoints":
            a.checkpoints_dir, a.checkpoints = path, _checkpoints_in(w, path)
        else:
            a.images = _images_in(w, path, stage)
        return True
    stage = canonical_stage(name)
    if stage and _is_stage_dir(path):
        _use_stage_dir(w, b, stage, path, path.parent)
        return True
    return False


def discover(paths: list[Path] | Path, explicit: dict[Path, str] | None = None,
             results: Path | None = None, root: Path | None = None,
             max_entries: int = DEFAULT_MAX_ENTRIES) -> Bundle:
    """Everything under `paths`. `explicit` maps .wandb files to stages
    (--run); `results` names the run root (or stage dir) to read checkpoints
    and images from instead of the newest one per stage."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    b = Bundle(root=Path(root) if root else (bundle_root_of(paths[0]) if paths else Path(".")))
    w = _Walker(b, max_entries)
    seen: set = set()
    for p in paths:
        if not p.exists() and not p.is_symlink():
            b.skip(p, "does not exist")
        elif p.suffix == ".wandb":
            _add_wandb(w, b, [p], seen)
        elif _add_narrow(w, b, p):
            pass
        elif not safefs.is_dir(p):
            if w.regular(p):
                b.skip(p, "not a TinyWorlds artifact (.wandb, checkpoint, PNG or history table)")
        else:
            _add_wandb(w, b, _wandb_files(w, p), seen)
            if results is None:
                _add_results(w, b, p)
    for f, stage in (explicit or {}).items():
        b.explicit[safefs.resolve(f)] = stage
        _add_wandb(w, b, [Path(f)], seen)
    if results is not None:
        if not _add_narrow(w, b, Path(results)):
            _add_results(w, b, Path(results))
    return b


def parse_run_args(values: list[str]) -> dict[Path, str]:
    """`--run stage=path` pairs -> {path: canonical stage}; unknown stage names
    raise ValueError listing the valid ones."""
    out = {}
    for v in values or []:
        stage, sep, path = v.partition("=")
        if not sep or not path:
            raise ValueError(f"--run expects STAGE=PATH, got {v!r}")
        canon = canonical_stage(stage)
        if canon is None:
            raise ValueError(f"--run {v!r}: unknown stage {stage!r}; valid stages are "
                             f"{', '.join(STAGES)} (aliases: "
                             f"{', '.join(a for a in ALIASES if a not in STAGES)})")
        out[Path(path)] = canon
    return out
