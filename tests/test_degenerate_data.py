"""A broken data pipeline (every training frame the same picture) is its own
finding: the grids' original cells do not vary, no stage trained on the data
is a fallback, and no learning-rate advice is given."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import EXAMPLES
from twdiag import synth

pytestmark = pytest.mark.slow


def test_one_picture_for_every_input_is_a_data_finding(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(EXAMPLES / "bundle-healthy", b, ignore=shutil.ignore_patterns("docs"))
    one = np.repeat(synth.pong_frames(1, seed=3), 16, axis=0)  # the same frame in every cell
    for stage in ("video_tokenizer", "latent_actions"):
        for png in sorted(b.glob(f"results/*/{stage}/visualizations/*.png")):
            synth.write_grid_png(png, one, one * 0.9)  # TinyWorlds' layout, its own file name
    from twdiag import bundle as bundle_mod, pipeline, report, rules
    found = bundle_mod.discover([b], {}, root=b)  # diagnose's analysis and document, without its files
    doc = report.combine(pipeline.run(found, rules.load_thresholds(), progress=lambda m: None))
    tok = doc["stages"]["video_tokenizer"]
    f = next(f for f in tok["findings"] if f["rule_id"] == "data_degenerate")
    assert f["severity"] == "critical" and "the same picture" in f["message"]
    assert doc["overall"] == "critical"
    assert all(e["fallback"]["step"] is None for e in doc["stages"].values() if e.get("fallback"))
    first = doc["next_actions"][0]
    assert first["rule_id"] == "data_degenerate" and "consecutive frames" in first["action"]
    assert not any("learning rate" in a["action"] and a["rule_id"] != "data_degenerate"
                   for a in doc["next_actions"])
