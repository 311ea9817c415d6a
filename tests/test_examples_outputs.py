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
