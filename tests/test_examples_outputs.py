"""A fresh diagnose of each example reproduces its committed diagnosis.json
(examples/outputs/, made by `make_examples.py --outputs-only` at a fixed
--now), minus what depends on the clock or the output folder: any change to
verdicts, fallbacks, numbers or wording shows up here, and the outputs are
re-made on purpose."""
from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, diagnose

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
NOW = "1796169600"
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


@pytest.mark.parametrize("name", ["bundle-unhealthy"])  # the richest; the others' verdicts are checked elsewhere
def test_fresh_diagnose_reproduces_the_committed_outputs(tmp_path, name, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the committed outputs name paths from the project root
    code, _, err = diagnose(f"examples/{name}", "--out-dir", str(tmp_path / "out"), "--now", NOW)
    assert code == 0, err
    fresh = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    committed = json.loads((EXAMPLES / "outputs" / name / "diagnosis.json").read_text())
    a = _strip(fresh, str(tmp_path / "out"), f"examples/outputs/{name}")
    b = _strip(committed, str(tmp_path / "out"), f"examples/outputs/{name}")
    for key in sorted(set(a) | set(b)):
        assert a.get(key) == b.get(key), key
