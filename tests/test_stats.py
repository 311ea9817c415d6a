"""stage_stats on real .wandb files: the real incident and the failure shapes
of genuine runs (blow-ups, accumulation scale, narrowing, never-learned)."""
import pytest

from conftest import cli, now_after
from twdiag import bundle, logs, pipeline, rules, stats

T = rules.load_thresholds()
pytestmark = pytest.mark.fast


def analyse(path, stage=None):
    explicit = {path: stage} if stage else {}
    b = bundle.discover([] if stage else [path], explicit)
    (name, merged), = logs.load(b, progress=lambda m: None).items()
    metrics, findings = stats.analyse_stage(merged, T)
    return name, metrics, findings


def ids(findings, severity=None):
    return {f.rule_id for f in findings if severity is None or f.severity == severity}


def test_incident_verdicts(incident):
    _, tok, tok_f = analyse(incident["video_tokenizer"])
    assert tok["verdict"] == "normal", [f.message for f in tok_f]
    assert tok["loss"]["first"] == pytest.approx(0.1469) and tok["loss"]["final"] == pytest.approx(0.001531)
    assert tok["loss"]["median"] == pytest.approx(0.001753, rel=0.1)

    _, lam, lam_f = analyse(incident["latent_actions"])
    assert lam["verdict"] == "watch"
    assert "action_diversity_narrowing" in ids(lam_f, "watch") and "action_collapse" not in ids(lam_f)
    u, e = lam["actions"]["unique_actions"], lam["actions"]["entropy"]
    assert (u["early_mean"], u["mid_mean"], u["late_mean"]) == pytest.approx((3.50, 4.14, 2.57), abs=0.25)
    assert (e["early_mean"], e["mid_mean"], e["late_mean"]) == pytest.approx((0.927, 1.023, 0.744), abs=0.05)
    assert e["final"] == pytest.approx(0.483) and u["final"] == 2

    _, dyn, dyn_f = analyse(incident["dynamics"])
    assert dyn["verdict"] == "critical"
    assert {"loss_divergence", "loss_blowup"} <= ids(dyn_f, "critical")
    wins = [w["mean"] for w in dyn["loss"]["windows"]]
    assert wins == sorted(wins)  # rising windows
    assert dyn["loss"]["first"] == pytest.approx(1.7785) and dyn["loss"]["min"] == pytest.approx(1.4388, rel=0.05)
    # the incident's logged loss is / 4 (gradient accumulation): real ~24 nats by 50k, ~3.5x chance
    assert dyn["loss_scale"]["factor"] == 4
    assert dyn["scale"]["late_fraction_of_chance"] == pytest.approx(6.441 * 4 / 6.931, rel=0.08)
    frame = logs.load(bundle.discover([incident["dynamics"]]), progress=lambda m: None)["dynamics"].frame
    tenk = frame[frame["_step"] < 50000].groupby(frame["_step"] // 10000)["train/loss"].mean()
    assert tenk.tolist() == pytest.approx([3.866, 5.054, 5.730, 6.043, 6.423], rel=0.08)
    assert (dyn["loss"]["early_mean"], dyn["loss"]["mid_mean"], dyn["loss"]["late_mean"]) == \
        pytest.approx((4.547, 5.512, 6.441), rel=0.07)
    # the divergence began right after the best level (step ~600), long before any valid checkpoint
    assert 600 <= dyn["onsets"]["loss_divergence"] <= 6000
    div = next(f for f in dyn_f if f.rule_id == "loss_divergence")
    assert "1.7785" in div.message and str(wins[-1]) in div.message
    assert "tracks the learning rate" in dyn["correlations"]["reading"]


def test_healthy_and_nan_and_collapse(runs):
    _, m, f = analyse(runs["healthy"])
    assert m["verdict"] == "normal", [x.message for x in f]
    assert "loss_spike_recovered" in ids(f) and m["spikes"]["events"][0]["step"] == 300
    _, m, f = analyse(runs["nan"])
    assert m["verdict"] == "critical" and m["non_finite"]["first_step"] == 250
    assert m["onsets"]["non_finite_loss"] == 250
    _, m, f = analyse(runs["collapse"])
    assert "action_collapse" in ids(f, "critical") and {x.stage for x in f} == {"latent_actions"}
    _, m, f = analyse(runs["short"])
    assert m["verdict"] == "insufficient_data"


def test_blowup_that_came_back_is_critical_blowup_not_loss_rising(shapes):
    """The loss blew up to ~3x chance (real scale, 4 accumulation steps) and
    came back down as the cosine lr decayed: a blow-up finding with its onset;
    no `loss_rising` on a curve whose late trend falls."""
    _, m, f = analyse(shapes["dyn_blowup_back"])
    assert m["loss"]["late_trend"]["direction"] == "falling"
    assert "loss_blowup" in ids(f, "critical") and "loss_rising" not in ids(f)
    b = m["loss"]["blowup"]
    assert b["recovered"] is True and 300 <= b["onset_step"] <= 400 and 450 <= b["peak_step"] <= 560
    assert b["peak_over_reference"] == pytest.approx(21.2 / 6.931, rel=0.15)
    assert m["onsets"]["loss_blowup"] == b["onset_step"]
    msg = next(x.message for x in f if x.rule_id == "loss_blowup")
    assert "came back down" in msg and "real-scale" in msg


def test_chance_is_judged_on_the_real_scale(shapes):
    """Logged loss = real / 4: a run at ~3x chance is critical, not '0.79 of chance'."""
    _, m, f = analyse(shapes["dyn_3x_chance"])
    assert m["scale"]["late_fraction_of_chance"] == pytest.approx(3.0, rel=0.1)
    assert m["scale"]["chance_on_logged_scale"] == pytest.approx(6.931 / 4, rel=0.01)
    assert "critical" in {x.severity for x in f} and {"loss_blowup"} <= ids(f, "critical")


def test_narrowing_from_the_best_phase_is_watch(shapes):
    _, m, f = analyse(shapes["lam_narrowing"])
    e = m["actions"]["entropy"]
    assert 0.40 < e["late_normalized"] < 0.45  # above the level threshold: only the fall shows it
    assert e["late_over_best_phase"] < T["actions"]["entropy_drop_watch"]
    assert m["verdict"] == "watch" and "action_diversity_narrowing" in ids(f, "watch")
    assert "fell to" in next(x.message for x in f if x.rule_id == "action_diversity_narrowing")


def test_never_learned_action_model(shapes):
    _, m, f = analyse(shapes["lam_never_learned"])
    assert {"action_collapse", "lam_variance_penalty"} <= ids(f, "critical")
    v = m["actions"]["encoder_variance"]
    assert v["max"] < T["stages"]["latent_actions"]["encoder_variance_floor"]
    assert m["onsets"]["action_collapse"] == 0


def test_tokenizer_explosion_in_the_first_steps(shapes):
    _, m, f = analyse(shapes["tok_exploded"])
    assert "loss_blowup" in ids(f, "critical")
    assert m["onsets"]["loss_blowup"] <= 20


def test_frozen_action_stats_judge_latent_actions(tmp_path, runs):
    """dynamics logs the frozen action model's stats at every step; with a
    sparse own log, latent_actions is judged from them, and the finding is
    filed under latent_actions, never dynamics."""
    from twdiag import synth
    lam_cfg = synth.stage_config("latent_actions", n_updates=240, log_interval=120)
    synth.wandb_run(tmp_path, "latent_actions_2026_11_29_02_00_00", lam_cfg,
                    synth.curve_rows("latent_actions", 240, seed=1, log_interval=120,
                                     actions=synth.collapsed_actions))
    synth.wandb_run(tmp_path, "dynamics_2026_11_29_02_01_00", synth.stage_config("dynamics", n_updates=240),
                    synth.curve_rows("dynamics", 240, seed=2, start=6.9, end=0.5, n_updates=240,
                                     actions=synth.collapsed_actions))
    b = bundle.discover([tmp_path])
    a = pipeline.run(b, T, parts=("stats",), progress=lambda m: None)
    lam = [f for f in a.stage_findings("latent_actions") if f["severity"] != "info"]
    assert [f["rule_id"] for f in lam] == ["action_collapse"]
    assert lam[0]["evidence_path"].endswith(".wandb") and "frozen action model" in lam[0]["message"]
    dyn = {f["rule_id"] for f in a.stage_findings("dynamics")}
    assert "action_collapse" not in dyn and "upstream_latent_actions_critical" in dyn


def test_run_state_comes_from_records_not_mtimes(tmp_path, runs):
    """A run cut before its exit record: live just after its newest record,
    stalled_or_crashed hours later, whatever the file's mtime says."""
    import shutil
    src = runs["healthy"]
    cut = tmp_path / "wandb" / src.parent.name / src.name
    cut.parent.mkdir(parents=True)
    data = src.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.9)])
    code, doc, _ = cli("stats", tmp_path, "--now", now_after(cut, 60))
    st = doc["stages"]["dynamics"]["state"]
    assert code == 0 and st["state"] == "live" and st["basis"] == "records"
    code, doc, _ = cli("stats", tmp_path, "--now", now_after(cut, 3 * 86400))
    assert doc["stages"]["dynamics"]["state"]["state"] == "stalled_or_crashed"
    assert "run_stalled" in {f["rule_id"] for f in doc["stages"]["dynamics"]["findings"]}
    shutil.copy(src, cut)  # finished: the exit record decides
    code, doc, _ = cli("stats", tmp_path, "--now", now_after(cut, 30 * 86400))
    assert doc["stages"]["dynamics"]["state"]["state"] == "finished"


def test_throughput_comes_from_record_times(runs):
    _, m, _ = analyse(runs["healthy"])
    assert m["throughput"]["source"] == "history _timestamp"
    assert m["throughput"]["steps_per_s_overall"] == pytest.approx(5.0, rel=0.05)
