"""The example bundles give the verdicts the README documents."""
import json
import subprocess
import sys

from conftest import ROOT, tree_fingerprint


def test_example_verdicts():
    expected = {"bundle-healthy": ("normal", {"video_tokenizer": "normal", "latent_actions": "normal",
                                              "dynamics": "normal"}),
                "bundle-unhealthy": ("critical", {"video_tokenizer": "normal", "latent_actions": "critical",
                                                  "dynamics": "critical"})}
    for name, (overall, stages) in expected.items():
        bundle = ROOT / "examples" / name
        before = tree_fingerprint(bundle)
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "stage_stats.py"), str(bundle)],
                             capture_output=True, text=True)
        doc = json.loads(out.stdout)
        assert out.returncode == 0 and doc["overall"] == overall
        assert {s: v["verdict"] for s, v in doc["stages"].items()} == stages
        for stage in doc["stages"].values():
            for f in stage["findings"]:
                assert f["evidence_path"] is None or (ROOT / f["evidence_path"]).exists() or \
                    __import__("os").path.exists(f["evidence_path"])
        assert tree_fingerprint(bundle) == before
