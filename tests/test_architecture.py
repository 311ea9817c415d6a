"""A checkpoint must hold its stage's TinyWorlds model as its own config
describes it (architectures.yaml): toy networks are never valid, never the
fallback; every genuine checkpoint fits."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, SAMPLE, cli
from twdiag import architecture, checkpoints, ptfile, rules

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.fast
LIMITS = ptfile.Limits.from_thresholds(rules.load_thresholds())


def test_every_genuine_checkpoint_fits_its_config():
    dirs = sorted(EXAMPLES.glob("*/results/*/*/checkpoints/*"))
    if SAMPLE.is_dir():
        dirs += sorted(SAMPLE.glob("results/*/*/checkpoints/*"))
    checked = 0
    for d in dirs:
        ck = checkpoints.check_checkpoint(d.parent.parent.name, int(d.name.rsplit("_", 1)[1]), d, LIMITS)
        assert not any("config describes" in p.detail for p in ck.problems), (d, ck.problems)
        checked += bool(ck.fact("model_state_dict.pt", "shapes"))
    assert checked >= 20


def test_a_wrong_width_and_a_toy_network_are_caught():
    shapes = {"encoder.patch_embed.proj.weight": [32, 192, 1, 1]}
    cfg = {"embed_dim": 16, "patch_size": 8, "num_blocks": 1, "latent_dim": 5}
    wrong = architecture.check("video_tokenizer", shapes, cfg)
    assert any("missing" in w for w in wrong)
    assert any("encoder.patch_embed.proj.weight is [32, 192, 1, 1], its config implies [16, 192, 1, 1]" in w
               for w in wrong)


def test_toy_checkpoints_are_not_valid_and_never_the_fallback(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(EXAMPLES / "bundle-healthy", b, ignore=shutil.ignore_patterns("docs"))
    toy = {"net.0.weight": torch.randn(64, 16), "net.0.bias": torch.zeros(64),
           "net.2.weight": torch.randn(16, 64), "net.2.bias": torch.zeros(16)}
    for stage in ("video_tokenizer", "latent_actions", "dynamics"):
        newest = sorted(b.glob(f"results/*/{stage}/checkpoints/*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))[-1]
        torch.save(toy, newest / "model_state_dict.pt")
    code, doc, _ = cli("ckpts", str(b))
    assert code == 0
    fb = {s: e["fallback"]["step"] for s, e in doc["stages"].items()}
    assert fb == {"video_tokenizer": 200, "latent_actions": 300, "dynamics": 140}, fb  # the one before each toy
    for stage, e in doc["stages"].items():
        latest = e["latest"]
        assert latest["status"] == "inconsistent" and "config describes" in latest["evidence"][0]["detail"]
