"""Text and writes where they may not go, and many empty folders.

- a run-root name carrying newlines, a fake verdict, raw HTML and terminal
  escapes cannot forge a section in diagnosis.md or reach the terminal;
- a symlinked docs/action is never written through;
- --out-dir inside a --baseline bundle is refused like one inside the bundle;
- 10,000 empty checkpoint folders take seconds, not minutes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, cli

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
HOSTILE = "run\n\nOverall: **normal**\n\n`<img src=x onerror=alert(1)>`\x1b[2J\x1b]0;pwned\x07"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("docs"))
    return dst


def test_a_hostile_run_root_name_forges_nothing(tmp_path):
    b = _copy(EXAMPLES / "bundle-unhealthy", tmp_path / "b")
    run = next((b / "results").iterdir())
    run.rename(run.parent / HOSTILE)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose.py"), str(b), "--out-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    md = (tmp_path / "out" / "diagnosis.md").read_text()
    assert HOSTILE.splitlines()[0] in md  # the name is still shown ...
    assert "onerror" in md and "<img" not in md and "\x1b" not in md  # ... as text
    assert [line for line in md.splitlines() if line.startswith("Overall")] == ["Overall: **critical**"]
    assert "**normal**" not in md
    doc = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert doc["overall"] == "critical"
    assert json.dumps(HOSTILE)[1:-1] in json.dumps(doc)  # the JSON keeps it exactly


def test_a_symlinked_docs_action_is_not_written_through(tmp_path):
    b = _copy(EXAMPLES / "bundle-healthy", tmp_path / "b")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "diagnosis.json").write_text("precious")
    (b / "docs").mkdir()
    os.symlink(outside, b / "docs" / "action")
    work = tmp_path / "cwd"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code, doc, _ = cli("diagnose", str(b))
    finally:
        os.chdir(cwd)
    assert code == 0, doc
    assert (outside / "diagnosis.json").read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["diagnosis.json"]
    assert (work / "twdiag-b" / "diagnosis.json").is_file()
    assert any("symlink" in n for n in doc["notes"]), doc["notes"]


def test_out_dir_inside_a_baseline_is_refused(tmp_path):
    b = _copy(EXAMPLES / "bundle-unhealthy", tmp_path / "b")
    base = _copy(EXAMPLES / "bundle-healthy", tmp_path / "base")
    before = sorted(str(p) for p in base.rglob("*"))
    code, doc, _ = cli("diagnose", str(b), "--baseline", str(base), "--out-dir", str(base / "results" / "x"))
    assert code == 5 and "refusing" in doc["error"]
    code, doc, _ = cli("diagnose", str(b), "--results", str(next((base / "results").iterdir())),
                       "--out-dir", str(base / "results" / "x"))
    assert code == 5
    assert sorted(str(p) for p in base.rglob("*")) == before


def test_ten_thousand_empty_checkpoint_folders_take_seconds(tmp_path):
    b = _copy(EXAMPLES / "bundle-healthy", tmp_path / "b")
    ckdir = next(b.glob("results/*/dynamics/checkpoints"))
    for i in range(10_000):
        (ckdir / f"dynamics_step_{1001 + 2 * i}").mkdir()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose.py"), str(b), "--out-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-2000:]
    assert took < 30, took
    doc = json.loads(r.stdout)
    dyn = doc["stages"]["dynamics"]
    assert dyn["verdict"] == "critical"  # 10,000 of 10,003 checkpoints missing their files
    assert dyn["fallback"]["step"] == 280
