"""The model probe, with TinyWorlds' own classes from ../shared/tinyworlds-upstream
on the example bundles, measured on frames from examples/tinyworlds_env/dataset.py.

Each probe is a real child process (torch + upstream models/), so the
bundle-level runs are shared per module."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import EXAMPLES, SHARED, cli, copy_fresh

UPSTREAM = SHARED / "tinyworlds-upstream"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (UPSTREAM / "models" / "dynamics.py").is_file(), reason="../shared/tinyworlds-upstream absent"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "einops", "h5py")),
                       reason="the probe needs torch, einops and h5py"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """TinyWorlds' PONG-format frames with the true actions beside them."""
    sys.path.insert(0, str(EXAMPLES / "tinyworlds_env"))
    try:
        import dataset
    finally:
        sys.path.pop(0)
    path = tmp_path_factory.mktemp("data") / "pong_frames.h5"
    dataset.write(str(path), frames=600, seed=3)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A smaller sample than the default (suite time); every assertion below
    is a relation that holds at any sample size."""
    path = tmp_path_factory.mktemp("thr") / "probe.yaml"
    # and a grid rule made strict enough to fire on the healthy tokenizer's grids, for the probe to overrule
    path.write_text("probe:\n  sequences: 8\n  maskgit_steps: 2\n"
                    "visuals:\n  min_gain_db: 5.0\n  improving_downgrades: []\n")
    return path


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, data, small) -> dict:
    out = tmp_path_factory.mktemp("probe-healthy")
    code, doc, err = cli("diagnose", EXAMPLES / "bundle-healthy", "--out-dir", out, "--now", "1796169600",
                         "--tinyworlds", UPSTREAM, "--data", data, "--thresholds", small)
    assert code == 0, err
    return {"compact": doc, "full": json.loads((out / "diagnosis.json").read_text()), "out": out}


@pytest.fixture(scope="module")
def unhealthy(tmp_path_factory, data, small) -> dict:
    out = tmp_path_factory.mktemp("probe-unhealthy")
    code, doc, err = cli("probe", EXAMPLES / "bundle-unhealthy", "--tinyworlds", UPSTREAM, "--data", data,
                         "--out-dir", out, "--thresholds", small)
    assert code == 0, err
    return doc


def test_resumable_checkpoints_verify_and_are_measured(healthy):
    full = healthy["full"]
    assert full["probe"]["ran"] and full["probe"]["torch"]
    for stage in ("video_tokenizer", "latent_actions", "dynamics"):
        p = full["stages"][stage]["probe"]
        assert p["checkpoints"] and all(c["resumable"] == "verified" for c in p["checkpoints"]), p["checkpoints"]
        c = p["checkpoints"][0]
        assert c["weights"]["counts"] == {"missing": 0, "unexpected": 0, "mis_shaped": 0}
        assert c["optimizer"]["optimizer"] == "AdamW" and c["optimizer"]["adam_step"] == c["step"] + 1
        assert full["stages"][stage]["fallback"]["resumable"] == {"status": "verified", "by": "probe"}
        assert p["frames"]["true_actions"] and p["frames"]["frame_skip"] == 4  # 60 // 15 fps, as the loader
    tok = full["stages"]["video_tokenizer"]["probe"]["measures"]
    assert tok["gain_over_mean_frame_db"] == pytest.approx(tok["psnr_db"] - tok["reference_mean_frame_psnr_db"], abs=1e-3)
    assert 1 <= tok["codes"]["used"] <= tok["codes"]["of"] == 4 ** 5
    dyn = full["stages"]["dynamics"]["probe"]["measures"]
    assert [r["t"] for r in dyn["delta_t_psnr"]] == [1, 2, 3]  # context_length 4: t = 1..3
    lam = full["stages"]["latent_actions"]["probe"]["measures"]
    assert lam["true_actions"]["mi_nats"] >= 0 and lam["true_actions"]["true_entropy_nats"] > 1.0  # 4 actions


def test_measured_fidelity_overrules_the_grid_heuristic(healthy):
    """The (made strict) grid rule flags the tokenizer; measured on real frames
    it beats the mean frame, so the grid finding is info and says why."""
    tok = healthy["full"]["stages"]["video_tokenizer"]
    grid = [f for f in tok["findings"] if f["rule_id"] == "low_fidelity"]
    assert grid and all(f["severity"] == "info" for f in grid)
    assert any("overruled by the probe" in f["message"] for f in grid)
    assert tok["verdict"] == "normal"


def test_the_healthy_examples_actions_do_not_control_and_it_says_so(healthy):
    """The example's action model is tiny and short-trained: the probe shows
    its actions barely matter, and the report says so in numbers."""
    stages = healthy["compact"]["stages"]
    rules = {s: [f["rule_id"] for f in e["findings"]] for s, e in stages.items()}
    assert "probe_actions_uninformative" in rules["latent_actions"]
    assert "probe_not_controllable" in rules["dynamics"]
    assert "ΔtPSNR t1" in stages["dynamics"]["probe"] and "MI with true actions" in stages["latent_actions"]["probe"]
    sheet = Image.open(healthy["out"] / "probe_sheet.png")
    assert sheet.width > 500 and sheet.height > 400
    assert healthy["compact"]["probe"]["ran"] is True


def test_a_collapsed_action_model_carries_nothing(unhealthy):
    lam = unhealthy["stages"]["latent_actions"]
    m = lam["probe"]["measures"]
    assert m["usage"]["used"] == 1 and m["dead_bits"] == [0, 1]
    assert abs(m["action_gain_db"]) < 0.01 and m["true_actions"]["mi_nats"] < 0.01
    f = next(f for f in lam["findings"] if f["rule_id"] == "probe_actions_uninformative")
    assert f["severity"] == "critical" and "same action" in f["message"]
    deltas = [r["delta_db"] for r in unhealthy["stages"]["dynamics"]["probe"]["measures"]["delta_t_psnr"]]
    assert all(abs(d) < 0.1 for d in deltas)
    # dynamics' newest intact checkpoint (its 200 and 300 are damaged) is what was probed
    assert [c["step"] for c in unhealthy["stages"]["dynamics"]["probe"]["checkpoints"]] == [100]


def test_renamed_key_and_wrong_shape_do_not_load(tmp_path):
    """The child's strict fit, on a real checkpoint re-saved with one key
    renamed and one tensor of the wrong shape; neither is certified by the
    parent either (the architecture check), so it never reaches the probe."""
    import torch
    from twdiag import checkpoints, probe_worker, ptfile, rules
    probe_worker.torch = torch
    models = probe_worker.import_models(str(UPSTREAM))
    src = next((EXAMPLES / "bundle-healthy" / "results").glob("*/video_tokenizer/checkpoints/video_tokenizer_step_400"))
    t = rules.load_thresholds()
    cfg = checkpoints.config_of(checkpoints.check_checkpoint("video_tokenizer", 400, src, ptfile.Limits.from_thresholds(t)))
    sd = torch.load(src / "model_state_dict.pt", weights_only=True)
    for name, change in (("renamed", lambda d: d.__setitem__("encoder.renamed.weight", d.pop("encoder.latent_head.1.weight"))),
                         ("reshaped", lambda d: d.__setitem__("decoder.latent_embed.weight", torch.zeros(3, 3)))):
        ck = tmp_path / name / "video_tokenizer_step_400"
        shutil.copytree(src, ck)
        bad = dict(sd)
        change(bad)
        torch.save(bad, ck / "model_state_dict.pt")
        r = probe_worker.check_resumable("video_tokenizer", {"step": 400, "path": str(ck), "role": "newest"}, cfg, models)
        assert r["resumable"] == "no" and "do not fit" in r["reason"], r
        counts = r["weights"]["counts"]
        assert (counts["missing"], counts["unexpected"]) == ((1, 1) if name == "renamed" else (0, 0))
        assert counts["mis_shaped"] == (name == "reshaped")
        parent = checkpoints.check_checkpoint("video_tokenizer", 400, ck, ptfile.Limits.from_thresholds(t))
        assert not parent.intact  # the parent's own architecture check refuses it too


def test_a_hostile_state_pt_is_never_unpickled_and_never_probed(tmp_path):
    stage = next((EXAMPLES / "bundle-healthy" / "results").glob("*/video_tokenizer"))
    bundle = tmp_path / "b"
    copy_fresh(stage, bundle / "results" / stage.parent.name / "video_tokenizer")  # one stage: one short probe
    marker = tmp_path / "PWNED"
    ck = next(bundle.glob("results/*/video_tokenizer/checkpoints/video_tokenizer_step_400"))

    class Payload:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').write('x')",))

    import torch
    torch.save({"step": 400, "config": Payload(), "timestamp": "x", "scheduler_state_dict": None}, ck / "state.pt")
    import h5py
    import numpy as np
    bad = tmp_path / "bad.h5"  # channels first and float: not what TinyWorlds' loaders read
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("frames", data=np.zeros((20, 3, 64, 64), np.float32))
    code, doc, err = cli("probe", bundle, "--tinyworlds", UPSTREAM, "--probe-seconds", "120", "--data", bad)
    assert code == 0, err
    tok = doc["stages"]["video_tokenizer"]
    probed = [(c["step"], c["resumable"]) for c in tok["probe"]["checkpoints"]]
    assert probed == [(200, "verified")]  # 400 never reaches the probe: the fallback is the older, certified one
    assert not marker.exists()
    # bad frames cost the measures only, with the reason; resumability stands
    assert "N x H x W x 3 uint8" in tok["probe"]["measure_error"] and "not measured" in tok["summary"]


def test_a_hang_in_model_code_is_cut_by_the_budget(tmp_path):
    fake = tmp_path / "tinyworlds"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "__init__.py").write_text("")
    for name in ("video_tokenizer", "latent_actions", "dynamics"):
        (fake / "models" / f"{name}.py").write_text("import time\ntime.sleep(600)\n")
    started = time.monotonic()
    code, doc, err = cli("ckpts", EXAMPLES / "bundle-healthy", "--tinyworlds", fake, "--probe-seconds", "1")
    assert time.monotonic() - started < 30
    assert code == 0, err  # the checks stand; the probe is one failed part
    assert doc["probe"]["ran"] is False and "budget of 1 s" in doc["probe"]["reason"]
    assert doc["resumable_means"].startswith("without the probe")
    assert {s: e["fallback"]["step"] for s, e in doc["stages"].items()} == \
        {"video_tokenizer": 400, "latent_actions": 600, "dynamics": 280}  # the examples' expected fallbacks


def test_no_checkout_named_means_nothing_imported_but_a_note(tmp_path, monkeypatch):
    from twdiag import probe
    assert probe.find_checkout(tmp_path, UPSTREAM) == UPSTREAM
    assert probe.find_checkout(tmp_path, tmp_path) is None
    code, doc, _ = cli("diagnose", EXAMPLES / "bundle-healthy", "--tinyworlds", tmp_path, "--out-dir", tmp_path / "o")
    assert code == 2 and "not a TinyWorlds checkout" in doc["error"]
    code, doc, _ = cli("diagnose", EXAMPLES / "bundle-healthy", "--follow", "--tinyworlds", UPSTREAM,
                       "--out-dir", tmp_path / "o")
    assert code == 2 and "without --follow" in doc["error"]
    monkeypatch.chdir(UPSTREAM)  # a checkout in the current directory: named in a note, not imported
    from twdiag import bundle, pipeline, rules
    t = rules.load_thresholds()
    a = pipeline.run(bundle.discover([EXAMPLES / "bundle-healthy"], t), t, ("checkpoints",))
    assert a.probe is None and any(f"--tinyworlds {UPSTREAM}" in n for n in a.bundle.notes)


def test_dynamics_trained_without_actions_gets_no_delta_t(data):
    """use_actions: false means no conditioning in training: the next frame is
    measured without actions, and ΔtPSNR is said not to apply (no finding)."""
    import numpy as np
    import torch
    from twdiag import checkpoints, probe, probe_worker, ptfile, rules
    probe_worker.torch = torch
    models = probe_worker.import_models(str(UPSTREAM))
    t = rules.load_thresholds()
    lim = ptfile.Limits.from_thresholds(t)
    refs = {}
    for stage, step in (("video_tokenizer", 400), ("latent_actions", 600), ("dynamics", 280)):
        path = next((EXAMPLES / "bundle-healthy" / "results").glob(f"*/{stage}/checkpoints/{stage}_step_{step}"))
        refs[stage] = {"path": str(path), "config": checkpoints.config_of(checkpoints.check_checkpoint(stage, step, path, lim))}
    cache = {}
    vt, lam, dyn = (probe_worker._model(s, refs[s], models, cache) for s in refs)
    src = {"kind": "h5", "path": str(data), "fps_default": 15, "fps_by_dataset": {}}
    frames, _, _ = probe_worker.sample_frames(src, refs["dynamics"]["config"], 4, np.random.default_rng(0))
    x = probe_worker.to_tensor(frames, refs["dynamics"]["config"])
    with torch.no_grad():
        m, pics = probe_worker.measure_dynamics(dyn, vt, lam, x, 2, torch.Generator().manual_seed(0), use_actions=False)
    assert m["delta_t_psnr"] == [] and "use_actions: false" in m["delta_t_psnr_not_applicable"]
    assert m["next_frame"]["psnr_db"] > 0 and pics == {}
    assert probe._dynamics_findings(m, "p", 280, t["probe"], {}) == []


def test_a_forged_config_asking_for_gigabytes_is_not_probed(tmp_path):
    """Positional encodings are built from frame_size and patch_size alone
    (no saved tensor depends on frame_size): a state.pt asking for 100,000 px
    frames (156M patches) is refused before any model code runs, with the
    reason in the notes."""
    import torch
    from twdiag import checkpoints, ptfile, rules
    stage = next((EXAMPLES / "bundle-healthy" / "results").glob("*/video_tokenizer"))
    bundle = tmp_path / "b"
    copy_fresh(stage, bundle / "results" / stage.parent.name / "video_tokenizer")
    t = rules.load_thresholds()
    for ck in bundle.glob("results/*/video_tokenizer/checkpoints/video_tokenizer_step_*"):
        step = int(ck.name.rsplit("_", 1)[1])
        got = checkpoints.check_checkpoint("video_tokenizer", step, ck, ptfile.Limits.from_thresholds(t))
        torch.save({"scheduler_state_dict": None, "step": step, "timestamp": "2026_12_01_22_22_45",
                    "config": {**checkpoints.config_of(got), "frame_size": 100000}}, ck / "state.pt")
        # the saved tensors do not depend on frame_size: the architecture check passes it
        assert checkpoints.check_checkpoint("video_tokenizer", step, ck, ptfile.Limits.from_thresholds(t)).intact
    code, doc, err = cli("probe", bundle, "--tinyworlds", UPSTREAM)
    assert code == 4 and doc["ran"] is False, err  # nothing was left to probe
    assert doc["stages"] == {} and any("not probed: its config says frame_size 100000" in n for n in doc["notes"])


def test_probe_beside_the_drawer_in_a_fresh_process(tmp_path, data, small):
    """A fresh diagnose forks its drawer after the probe's child started:
    the drawer must not keep the probe's stdin open (the probe reads its job
    to end of file, and waited out its whole budget before this was fixed)."""
    import subprocess
    out = tmp_path / "out"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "diagnose.py"),
                        str(EXAMPLES / "bundle-healthy"), "--out-dir", str(out), "--tinyworlds", str(UPSTREAM),
                        "--data", str(data), "--thresholds", str(small), "--probe-seconds", "120"],
                       capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    full = json.loads((out / "diagnosis.json").read_text())
    assert r.returncode == 0, r.stderr[-2000:]
    assert full["probe"]["ran"], full["probe"]
    assert took < 100, took
    assert sorted(full["outputs"]["loss_plots"]) == ["dynamics", "latent_actions", "video_tokenizer"]
