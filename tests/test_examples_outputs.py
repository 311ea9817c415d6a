"""A fresh diagnose of each example reproduces its committed diagnosis.json
(examples/outputs/, made by `make_examples.py --outputs-only` at a fixed
--now), minus what depends on the clock or the output folder: any change to
verdicts, fallbacks, numbers or wording shows up here, and the outputs are
re-made on purpose."""
from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
# what depends on the clock, the output folder or the files' mtimes (a clone's are new)
VOLATILE = {"timings", "generated_at", "outputs", "seconds", "mtime_minus_last_record_s"}


def _strip(obj, out_dir: str, committed_dir: str):
    if isinstance(obj, dict):
        return {k: _strip(v, out_dir, committed_dir) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v, out_dir, committed_dir) for v in obj]
    if isinstance(obj, str):
        return obj.replace(out_dir, "OUT").replace(committed_dir, "OUT")
    return obj


def test_fresh_diagnose_reproduces_the_committed_outputs(unhealthy):
    """The unhealthy example (the richest); the others' verdicts and fallbacks are checked elsewhere."""
    name, out = "bundle-unhealthy", str(unhealthy["out"])
    committed = json.loads((EXAMPLES / "outputs" / name / "diagnosis.json").read_text())
    a = _strip(unhealthy["full"], out, f"examples/outputs/{name}")
    b = _strip(committed, out, f"examples/outputs/{name}")
    for key in sorted(set(a) | set(b)):
        assert a.get(key) == b.get(key), key


def test_a_fresh_process_with_its_background_children_gives_the_same(unhealthy, tmp_path):
    """scripts/diagnose.py in a fresh process forks the images' analysis at
    discovery and the drawer (a pytest worker has threads, so the fixture's
    in-process run forks neither): the documents must be the same, and the
    drawer's loss figures the same bytes, embedded in the HTML."""
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/diagnose.py", "examples/bundle-unhealthy", "--out-dir", str(out),
                        "--now", "1796169600"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    fresh = json.loads((out / "diagnosis.json").read_text())
    a = _strip(fresh, str(out), "examples/outputs/bundle-unhealthy")
    b = _strip(unhealthy["full"], str(unhealthy["out"]), "examples/outputs/bundle-unhealthy")
    for key in sorted(set(a) | set(b)):
        assert a.get(key) == b.get(key), key
    assert json.loads((out / "visuals.json").read_text()) == \
        json.loads((unhealthy["out"] / "visuals.json").read_text())
    assert sorted(fresh["outputs"]["loss_plots"]) == ["dynamics", "latent_actions", "video_tokenizer"]
    for stage in fresh["outputs"]["loss_plots"]:
        name = f"loss_{stage}.png"
        assert (out / name).read_bytes() == (unhealthy["out"] / name).read_bytes(), name
    assert (out / "diagnosis.html").read_text().count("data:image/png;base64,") >= 3
