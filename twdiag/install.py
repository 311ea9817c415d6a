"""`twdiag install-skill DEST`: copy only the skill's own files into
DEST/tinyworlds-training-diagnostics/ (no .git, tests, examples, caches)."""
from __future__ import annotations

import shutil
from pathlib import Path

SKILL_NAME = "tinyworlds-training-diagnostics"
FILES = ("SKILL.md", "requirements.txt", "LICENSE")
DIRS = ("agents", "references", "scripts", "twdiag")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")


class InstallError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def skill_source() -> Path:
    """The folder holding SKILL.md: the checkout this library sits in, or the
    copy installed with the package (twdiag/_skill/)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent, here / "_skill"):
        if (cand / "SKILL.md").is_file() and (cand / "scripts").is_dir():
            return cand
    raise InstallError("cannot find the skill's files (SKILL.md, scripts/) beside the twdiag library", 3)


def install_skill(dest: Path, force: bool = False) -> dict:
    src = skill_source()
    target = Path(dest) / SKILL_NAME
    if target.exists() and not force:
        raise InstallError(f"{target} exists; pass --force to replace it", 5)
    try:
        Path(dest).mkdir(parents=True, exist_ok=True)
        staging = Path(dest) / f".{SKILL_NAME}.installing"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        copied = []
        for name in FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
                copied.append(name)
        lib = src / "twdiag" if (src / "twdiag").is_dir() else Path(__file__).resolve().parent
        for name in DIRS:
            origin = lib if name == "twdiag" else src / name
            if origin.is_dir():
                shutil.copytree(origin, staging / name, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc", "_skill"))
                copied.append(name + "/")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as exc:
        raise InstallError(f"cannot install into {dest}: {exc.strerror or exc}", 5) from exc
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return {"installed": str(target), "from": str(src), "copied": copied, "bytes": size,
            "next": f"python {target / 'scripts' / 'diagnose.py'} RUN_BUNDLE_ROOT"}
