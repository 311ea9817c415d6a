"""Visual diagnostics on grids drawn in TinyWorlds' real figure layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, ROOT, tree_fingerprint
from twdiag import bundle, rules, synth, visuals

TS = synth.TS
TH = rules.load_thresholds()
T = TH["visuals"]
LAM_TITLE = "Reconstructed Sequences (4 sequences × 4 frames)"
pytestmark = pytest.mark.fast


def analyse_dir(path, count=None):
    return visuals.analyse(bundle.discover([path]), TH, count)


@pytest.fixture(scope="session")
def grids(tmp_path_factory) -> dict:
    """Real matplotlib figures: one per grid kind, plus improving and
    degrading sequences in a bundle layout."""
    root = tmp_path_factory.mktemp("grids")
    orig = synth.pong_frames(16, seed=3)
    jobs = []  # (path, original, prediction[, title]): drawn below, in forked workers when possible
    kinds = {}
    for kind in ("good", "flat", "texture", "stripes", "blurry"):
        kinds[kind] = root / f"{kind}_step_0.png"
        jobs.append((kinds[kind], orig, synth.predictions(kind, orig, seed=1)))
    bundle = root / "bundle"
    run = bundle / "results" / TS
    steps = [0, 100, 200, 300, 400, 500]
    for i, step in enumerate(steps):  # tokenizer: noise shrinking -> improving
        o = synth.pong_frames(16, seed=10 + i)
        jobs.append((run / "video_tokenizer" / "visualizations" / f"video_tokenizer_recon_step_{step}.png",
                     o, synth.predictions("good", o, seed=i, amount=0.5 * (1 - i / 5))))
    for i, step in enumerate(steps):  # dynamics: good, then one texture for every input
        o = synth.pong_frames(16, seed=20 + i)
        pred = synth.predictions("good", o, seed=i) if i < 3 else synth.predictions("texture", o, seed=7)
        jobs.append((run / "dynamics" / "visualizations" / f"dynamics_prediction_step_{step}.png",
                     synth.masked(o, seed=i), pred))
    for i, step in enumerate(steps[:3]):  # latent actions: 12 predictions in 3 rows
        o = synth.pong_frames(16, seed=30 + i)
        jobs.append((run / "latent_actions" / "visualizations" / f"reconstructions_latent_actions_step_{step}.png",
                     o, synth.predictions("good", synth.lam_targets(o), seed=i), LAM_TITLE))
    from twdiag import forking
    forking.starmap(synth.write_grid_png, jobs)
    return {"kinds": kinds, "bundle": bundle, "run": run}


def _analyse(path: Path, stage: str = "video_tokenizer") -> visuals.ImageResult:
    return visuals.analyse_image(bundle.ImageFile(stage, 0, path), T)


def test_figure_matches_tinyworlds_layout(grids):
    with Image.open(grids["kinds"]["good"]) as im:
        w, h = im.size
    assert abs(w - 2373) < 40 and abs(h - 1216) < 40  # 16x8 in at 150 dpi, tight bbox
    r = _analyse(grids["kinds"]["good"])
    assert r.layout == "two_panel" and r.metrics["grid"] == {
        "frame": 64, "original_cells": 16, "output_cells": 16, "exact": True}


@pytest.mark.parametrize("kind,required,forbidden", [
    ("good", set(), set(visuals.FLAGS)),
    ("flat", {"flat_color"}, set()),
    ("texture", {"input_independent_output", "striping"}, set()),
    ("stripes", {"striping"}, set()),
    ("blurry", set(), {"flat_color", "striping", "input_independent_output"}),
])
def test_grid_kinds(grids, kind, required, forbidden):
    r = _analyse(grids["kinds"][kind])
    assert required <= set(r.flags), r.metrics
    assert not (forbidden & set(r.flags)), (r.flags, r.metrics)


def test_good_beats_blurry_on_fidelity(grids):
    good = _analyse(grids["kinds"]["good"]).metrics["fidelity"]
    blurry = _analyse(grids["kinds"]["blurry"]).metrics["fidelity"]
    assert good["psnr_db"] > blurry["psnr_db"] + 5 and good["ssim"] > blurry["ssim"]
    assert good["input_dependence"] > 0.3 and blurry["input_dependence"] > T["min_input_dependence"]


def test_sequences_trend_and_findings(grids):
    res = analyse_dir(grids["bundle"], count=3)
    st = res["doc"]["stages"]
    tok, dyn, lam = st["video_tokenizer"], st["dynamics"], st["latent_actions"]
    assert tok["trend"]["trend"] == "improving" and tok["trend"]["psnr_delta_db"] > 3
    assert len(tok["trend"]["psnr_db"]) == 6  # every image, not just first and last
    assert dyn["trend"]["trend"] == "degrading"
    ids = {f["rule_id"]: f for f in dyn["findings"]}
    assert ids["input_independent_output"]["severity"] == "critical"
    assert ids["input_independent_output"]["steps"] == [300, 400, 500]
    assert ids["input_independent_output"]["evidence_path"].endswith("dynamics_prediction_step_500.png")
    assert dyn["onsets"] == {"input_independent_output": 300}
    assert dyn["verdict"] == "critical" and tok["verdict"] == "normal"
    # dynamics input has grey masked patches: PSNR skips them, good steps are high
    assert dyn["latest"]["metrics"]["fidelity"]["psnr_db"] < 10
    assert lam["latest"]["metrics"]["grid"]["output_cells"] == 12 and not lam["findings"]


def test_bad_images_are_reported_and_the_run_goes_on(tmp_path, grids):
    vis = tmp_path / "results" / TS / "dynamics" / "visualizations"
    vis.mkdir(parents=True)
    good = grids["kinds"]["good"].read_bytes()
    (vis / "dynamics_prediction_step_0.png").write_bytes(good)
    (vis / "dynamics_prediction_step_1.png").write_bytes(good[: len(good) // 2])
    (vis / "dynamics_prediction_step_2.png").write_bytes(b"this is not an image")
    (vis / "dynamics_prediction_step_3.png").write_bytes(b"")
    Image.new("L", (8000, 8000)).save(vis / "dynamics_prediction_step_4.png")
    res = analyse_dir(tmp_path)
    st = res["doc"]["stages"]["dynamics"]
    assert st["images"] == 5 and st["analysed"] == 1 and st["errors"] == 4
    reasons = {Path(s["path"]).name: s["reason"] for s in res["doc"]["skipped"]}
    assert "cannot decode" in reasons["dynamics_prediction_step_1.png"]
    assert "identify" in reasons["dynamics_prediction_step_2.png"]
    assert "identify" in reasons["dynamics_prediction_step_3.png"]
    assert "decompression bomb" in reasons["dynamics_prediction_step_4.png"]


def test_unknown_layout_gets_whole_image_metrics(tmp_path):
    p = tmp_path / "inference_results_step_3.png"
    Image.fromarray((np.random.default_rng(0).uniform(size=(300, 500, 3)) * 255).astype(np.uint8)).save(p)
    r = _analyse(p, "dynamics")
    assert r.layout == "unknown" and "image" in r.metrics and r.metrics["image"]["distinct_colors"] > 1000


def test_cli_contact_sheet_read_only_bundle(tmp_path, grids):
    before = tree_fingerprint(grids["bundle"])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "contact_sheet.py"), str(grids["bundle"]),
                        "--out-dir", str(out), "--count", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["overall"] == "critical"
    with Image.open(doc["contact_sheet"]) as sheet:
        assert max(sheet.size) <= T["sheet_max_side"]
    details = json.loads((out / "visuals.json").read_text())
    assert [i["step"] for i in details["images"]["dynamics"]] == [0, 100, 200, 300, 400, 500]
    assert tree_fingerprint(grids["bundle"]) == before
    inside = subprocess.run([sys.executable, str(ROOT / "scripts" / "contact_sheet.py"), str(grids["bundle"]),
                             "--out-dir", str(grids["run"] / "x")], capture_output=True, text=True)
    assert inside.returncode == 5 and "refusing" in json.loads(inside.stdout)["error"]


def test_contact_sheet_rows_show_severity_and_psnr(grids):
    res = analyse_dir(grids["bundle"], count=3)
    sheet = visuals.sheet(res, TH).convert("RGB")
    arr = np.asarray(sheet)
    crit = np.array(visuals.SEVERITY_COLOURS["critical"])
    ok = np.array(visuals.SEVERITY_COLOURS[None])
    rows_crit = np.flatnonzero((np.abs(arr - crit).sum(axis=2) < 30).mean(axis=1) > 0.5)
    rows_ok = np.flatnonzero((np.abs(arr - ok).sum(axis=2) < 30).mean(axis=1) > 0.5)
    assert len(rows_crit) and len(rows_ok)  # one header band in each colour
    assert rows_ok.min() < rows_crit.min()  # tokenizer (fine) above dynamics (critical)
    # drawn from the findings as they stand: once diagnose folds them to info
    # (a weak tokenizer bounds dynamics' images), no band or frame is red
    for st in res["doc"]["stages"].values():
        for f in st["findings"]:
            f["severity"] = "info"
    arr = np.asarray(visuals.sheet(res, TH).convert("RGB"))
    assert not ((np.abs(arr - crit).sum(axis=2) < 30).mean(axis=1) > 0.5).any()


def test_trend_reads_every_image_not_first_and_last(tmp_path):
    """PSNR rises at the second image, then stays flat: a plateau since that
    step, not 'improving'."""
    vis = tmp_path / "results" / TS / "video_tokenizer" / "visualizations"
    for i, step in enumerate([0, 100, 200, 300, 400]):
        o = synth.pong_frames(16, seed=40 + i)
        amount = 0.45 if i == 0 else 0.12
        synth.write_grid_png(vis / f"video_tokenizer_recon_step_{step}.png", o,
                             synth.predictions("good", o, seed=i, amount=amount))
    tr = analyse_dir(tmp_path)["doc"]["stages"]["video_tokenizer"]["trend"]
    assert tr["trend"] == "plateau" and tr["plateau_since_step"] == 100, tr
    assert tr["psnr_db"][1] - tr["psnr_db"][0] > 3


def test_input_independence_message_says_which_test_fired(grids):
    r = _analyse(grids["kinds"]["texture"], "dynamics")
    assert "near-identical" in r.why["input_independent_output"]
    o = synth.pong_frames(16, seed=3)
    shuffled = synth.write_grid_png(grids["bundle"].parent / "shuffled_step_0.png", o,
                                    np.roll(synth.predictions("good", o, seed=1), 5, axis=0))
    r = _analyse(shuffled, "dynamics")
    assert "input_independent_output" in r.flags
    assert "no better than the others" in r.why["input_independent_output"]
    assert "near-identical" not in r.why["input_independent_output"]


def test_sheet_steps_always_first_middle_latest():
    assert visuals.sheet_steps(200, 3) == [0, 100, 199]
    assert visuals.sheet_steps(2, 4) == [0, 1]
    assert visuals.sheet_steps(10, 4)[0] == 0 and visuals.sheet_steps(10, 4)[-1] == 9


def test_sample_bundle_images(sample_bundle, tmp_path):
    res = analyse_dir(sample_bundle)
    st = res["doc"]["stages"]
    assert set(st) == {"video_tokenizer", "latent_actions", "dynamics"}
    for stage, v in st.items():
        assert v["analysed"] == 4 and v["layouts"] == ["two_panel"], stage
        assert v["trend"]["trend"] == "improving" and v["verdict"] == "normal", stage
    assert st["latent_actions"]["latest"]["metrics"]["grid"]["output_cells"] == 12


def test_128px_frames_and_smoothed_drawings(tmp_path):
    """Real runs use 128 px frames (the Zelda run): drawn only ~2.2x enlarged,
    matplotlib smooths them, so the lattice is found but cells are averaged.
    Smoothing asked for explicitly at 64 px (~4x) leaves block centres intact."""
    o = synth.pong_frames(16, size=128, seed=5)
    big = synth.write_grid_png(tmp_path / "big_step_0.png", o, synth.predictions("texture", o, seed=2))
    r = _analyse(big)
    assert r.layout == "two_panel_approx" and r.metrics["grid"]["frame"] == 128
    assert "input_independent_output" in r.flags
    good = synth.write_grid_png(tmp_path / "big_good_step_0.png", o, synth.predictions("good", o, seed=2))
    assert not _analyse(good).flags
    o = synth.pong_frames(16, seed=6)
    smooth = synth.write_grid_png(tmp_path / "smooth_step_0.png", o, synth.predictions("good", o, seed=3),
                                  interpolation="bilinear")
    r = _analyse(smooth)
    # block centres survive bilinear smoothing at ~4x: still sampled exactly
    assert r.layout == "two_panel" and r.metrics["grid"]["frame"] == 64
    assert not {"flat_color", "input_independent_output", "striping"} & set(r.flags)


def test_visuals_json_has_one_shape_from_diagnose_and_contact_sheet(tmp_path):
    bundle = EXAMPLES / "bundle-weak-tokenizer"
    from conftest import cli
    code, _, _ = cli("visuals", str(bundle), "--out-dir", str(tmp_path / "v"))  # contact_sheet.py's command
    assert code == 0
    from twdiag import bundle as bundle_mod, outputs, pipeline, report_files
    found = bundle_mod.discover([bundle], {}, root=bundle)
    analysis = pipeline.run(found, TH, parts=("visuals",), progress=lambda m: None)
    a = json.loads((tmp_path / "v" / "visuals.json").read_text())
    b = json.loads(outputs.dumps(report_files.visuals_document(analysis)))  # what diagnose writes
    assert {"stages", "images", "skipped"} <= set(a) and {"stages", "images", "skipped"} <= set(b)
    assert a["images"] == b["images"]
    assert set(a["stages"]) == set(b["stages"]) and a["stages"]["dynamics"]["images"] == b["stages"]["dynamics"]["images"]


@pytest.mark.fast
def test_low_fidelity_is_a_gain_below_the_grids_own_references():
    """Outputs are judged against painting the same grid's mean frame,
    background or black: a noisy copy well below them is low_fidelity (value
    = the gain, threshold = min_gain_db); a faithful one is not, whatever its
    absolute PSNR on dark Pong frames."""
    import numpy as np
    orig = (synth.pong_frames(16, seed=5) * 255).astype(np.float32)  # cells as the grid sampler gives them
    rng = np.random.default_rng(0)
    noisy = np.clip(orig + rng.normal(0, 60, orig.shape), 0, 255)
    close = np.clip(orig + rng.normal(0, 4, orig.shape), 0, 255)
    m_in = visuals.panel_metrics(orig)
    for pred, expect in ((noisy, True), (close, False)):
        fid = visuals.fidelity(orig, pred, mask_grey=False)
        flags, why = visuals.image_flags(m_in, visuals.panel_metrics(pred), fid, T)
        assert ("low_fidelity" in flags) is expect, (fid, flags)
        if expect:
            assert fid["gain_over_best_reference_db"] < T["min_gain_db"]
            assert f"gain {fid['gain_over_best_reference_db']:+.1f} dB" in why["low_fidelity"]
