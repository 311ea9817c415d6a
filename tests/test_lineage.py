"""Run lineage on real logs: the healthy example's own records, split and
re-framed into the attempts TinyWorlds leaves (a crash then a `checkpoint=`
resume with the counter reset, a fresh restart, an early exit, a crash at
start-up), and a stage known only from its checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, cli
from twdiag import synth

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
HEALTHY = EXAMPLES / "bundle-healthy"


def _copy(dst: Path) -> Path:
    shutil.copytree(HEALTHY, dst, ignore=shutil.ignore_patterns("docs"))
    return dst


def _log(bundle: Path, stage: str) -> Path:
    for f in sorted(bundle.glob("wandb/*/*.wandb")):
        recs = synth.log_records(f)
        run = next(r for r in recs if r.WhichOneof("record_type") == "run")
        if run.run.display_name.startswith(stage) or stage in run.run.display_name:
            return f
    raise AssertionError(stage)


def _set_config(recs, key: str, value) -> None:
    run = next(r for r in recs if r.WhichOneof("record_type") == "run")
    item = next((i for i in run.run.config.update if i.key == key), None)
    if item is None:
        item = run.run.config.update.add()
        item.key = key
    item.value_json = json.dumps(value)


def _kinds(recs, kind):
    return [r for r in recs if r.WhichOneof("record_type") == kind]


def _attempt(bundle: Path, recs, run_id: str, start_shift: float) -> Path:
    """Write `recs` as a new wandb run dir (a new run id, started later)."""
    run = next(r for r in recs if r.WhichOneof("record_type") == "run")
    run.run.run_id = run_id
    run.run.start_time.seconds += int(start_shift)
    for h in _kinds(recs, "history"):
        for item in h.history.item:
            if tuple(item.nested_key) == ("_timestamp",) or item.key == "_timestamp":
                item.value_json = str(float(item.value_json) + start_shift)
    d = bundle / "wandb" / f"offline-run-20261201_23{int(start_shift) // 60 % 60:02d}00-{run_id}"
    return synth.write_wandb_log(d / f"run-{run_id}.wandb", [r.SerializeToString() for r in recs])


def _split_dynamics(bundle: Path, keep_first: int, second_config: dict, crash_first: bool = True):
    """Replace dynamics' log by two attempts: its first `keep_first` rows
    (crashed: no exit record), then all rows again as a second run."""
    src = _log(bundle, "dynamics")
    recs = synth.log_records(src)
    shutil.rmtree(src.parent)
    hist = _kinds(recs, "history")
    cut = recs.index(hist[keep_first])
    first = recs[:cut] if crash_first else recs
    _attempt(bundle, first, "attempt1", 0)
    second = synth.log_records(src) if False else [type(r)() for r in recs]
    for new, old in zip(second, recs):
        new.CopyFrom(old)
    for key, value in second_config.items():
        _set_config(second, key, value)
    _attempt(bundle, second, "attempt2", 3600)


def _diagnose(bundle: Path, out: Path) -> tuple[dict, dict]:
    """diagnose's documents (compact, full) without the image grids or the
    report files: lineage reads the logs and checkpoints only, and this keeps
    the suite short (the CLI path is covered by the other test modules)."""
    from twdiag import bundle as bundle_mod, pipeline, report, rules
    t = rules.load_thresholds()
    b = bundle_mod.discover([bundle], {}, root=bundle)
    a = pipeline.run(b, t, parts=("stats", "checkpoints"), progress=lambda m: None)
    doc = json.loads(json.dumps(report.combine(a), default=str))
    return report.compact(doc), doc


def test_crash_then_checkpoint_resume_lists_both_attempts(tmp_path):
    b = _copy(tmp_path / "b")
    _split_dynamics(b, 200, {"checkpoint": "results/2026_12_01_22_22_11/dynamics/checkpoints/dynamics_step_140"})
    compact, doc = _diagnose(b, tmp_path / "out")
    lin = doc["stages"]["dynamics"]["lineage"]
    assert lin["count"] == 2
    a1, a2 = lin["attempts"]
    # on the global axis the resume (counter reset to 0) starts at 140: attempt 1's steps 140-199 were run again
    assert a1["state"] == "crashed" and a1["rows"] == 200 and a1["superseded_rows"] == 60
    assert "resumed from its checkpoint at step 140" in a1["why_superseded"]
    assert a2["relation"] == "resume" and a2["resumed_from"]["step"] == 140
    assert (a2["first_step"], a2["global_first_step"]) == (0, 140)
    assert a2["global_last_step"] == a2["last_step"] + 140
    assert "weights only" in a2["restored"] and lin["steps_axis"].startswith("global")
    assert doc["stages"]["dynamics"]["stats"]["metrics"]["step_max"] == a2["global_last_step"]
    lines = compact["stages"]["dynamics"]["attempts"]
    assert lines[0].startswith("attempt 1: first run; steps 0–199") and "superseded (60 rows)" in lines[0]
    assert "resume from step 140" in lines[1] and "global 140–" in lines[1]
    assert any(f["rule_id"] == "attempt_crashed" for f in doc["stages"]["dynamics"]["findings"])


def _resave_state(ck: Path, **config) -> None:
    """state.pt again, as the resumed run saves it: the same keys, its config
    holding `checkpoint=` (plain values: what our allowlist read of it gave)."""
    import torch
    from twdiag import checkpoints, ptfile, rules
    step = int(ck.name.rsplit("_", 1)[1])
    got = checkpoints.check_checkpoint("dynamics", step, ck, ptfile.Limits.from_thresholds(rules.load_thresholds()))
    torch.save({"scheduler_state_dict": {"last_epoch": step + 1, "_step_count": step + 2, "base_lrs": [0.01]},
                "config": {**checkpoints.config_of(got), **config}, "step": step,
                "timestamp": got.fact("state.pt", "timestamp")}, ck / "state.pt")


def test_a_resumed_runs_checkpoints_and_grids_sit_on_the_global_axis(tmp_path):
    b = _copy(tmp_path / "b")
    src = "results/2026_12_01_22_22_11/dynamics/checkpoints/dynamics_step_140"
    _split_dynamics(b, 200, {"checkpoint": src})
    for ck in sorted(b.glob("results/*/dynamics/checkpoints/dynamics_step_*")):
        _resave_state(ck, checkpoint=src)  # the folders are the resumed run's: named by its own steps
    # TinyWorlds saves step 0 after one update at lr 0 (the warm-up starts there): the source's weights
    shutil.copyfile(b / src / "model_state_dict.pt", b / src.replace("_140", "_0") / "model_state_dict.pt")
    compact, doc = _diagnose(b, tmp_path / "out")
    dyn = doc["stages"]["dynamics"]
    resumed = dyn["lineage"]["attempts"][1]
    assert resumed["weights_match"].startswith("confirmed") and "33 storages" in resumed["weights_match"]
    assert "warm-up again: " in resumed["restored"] and "at step 140" in resumed["restored"]
    assert [r["step"] for r in dyn["checkpoints"]["table"]] == [140, 280, 420]
    assert dyn["fallback"]["step"] == 420 and dyn["fallback"]["path"].endswith("dynamics_step_280")
    assert dyn["lineage"]["final_checkpoint_saved"] is True  # global 420 is the resumed run's last step
    assert any("resumed from step 140" in n for n in doc["notes"])
    assert compact["stages"]["dynamics"]["fallback"]["step"] == 420
    from twdiag import report
    md = report.markdown(doc)  # the report a person reads lists the attempts and the fallback's global step
    assert "Attempts of dynamics" in md and "(global 140–420)" in md and "step 420: `" in md


def test_a_fresh_restart_supersedes_the_abandoned_attempt(tmp_path):
    b = _copy(tmp_path / "b")
    _split_dynamics(b, 50, {})
    _, doc = _diagnose(b, tmp_path / "out")
    a1, a2 = doc["stages"]["dynamics"]["lineage"]["attempts"]
    assert a2["relation"] == "fresh_start" and a1["superseded_rows"] == 50
    assert "started again from step 0 without a checkpoint" in a1["why_superseded"]
    assert doc["stages"]["dynamics"]["verdict"] == "normal"
    assert doc["stages"]["dynamics"]["fallback"]["step"] == 280
    assert doc["stages"]["dynamics"]["lineage"]["final_checkpoint_saved"] is True  # step 280 is the last


def test_an_early_exit_is_a_finding_with_the_schedule_state(tmp_path):
    b = _copy(tmp_path / "b")
    log = _log(b, "video_tokenizer")
    recs = synth.log_records(log)
    _set_config(recs, "n_updates", 4010)
    synth.write_wandb_log(log, [r.SerializeToString() for r in recs])
    compact, doc = _diagnose(b, tmp_path / "out")
    f = next(f for f in doc["stages"]["video_tokenizer"]["findings"] if f["rule_id"] == "run_stopped_early")
    assert f["severity"] == "watch" and f["value"] == pytest.approx(401 / 4010, abs=1e-3)
    assert "exited 0 at step 400 of n_updates 4010 (10%" in f["message"]
    assert "learning rate had decayed" in f["message"]
    assert compact["stages"]["video_tokenizer"]["verdict"] == "watch"


def test_a_missing_final_checkpoint_says_how_many_steps(tmp_path):
    _, doc = _diagnose(EXAMPLES / "bundle-unhealthy", tmp_path / "out")
    lin = doc["stages"]["dynamics"]["lineage"]
    assert lin["final_checkpoint_saved"] is False and lin["steps_not_saved"] == 99
    f = next(f for f in doc["stages"]["dynamics"]["findings"] if f["rule_id"] == "final_checkpoint_missing")
    assert "301–399" in f["message"] and "log_interval" in f["message"]


def test_a_checkpoint_only_stage_is_unverified_and_the_overall_says_so(tmp_path):
    b = _copy(tmp_path / "b")
    shutil.rmtree(_log(b, "video_tokenizer").parent)
    shutil.rmtree(next(b.glob("results/*/video_tokenizer/visualizations")))
    compact, doc = _diagnose(b, tmp_path / "out")
    assert doc["stages"]["video_tokenizer"]["verdict"] == "unverified"
    assert any(f["rule_id"] == "stage_unverified" and "Bring its wandb run" in f["message"]
               for f in doc["stages"]["video_tokenizer"]["findings"])
    assert doc["overall"] == "normal" and compact["overall_rests_on_unverified"] == ["video_tokenizer"]
    assert doc["stages"]["video_tokenizer"]["fallback"]["step"] == 400


def test_a_crash_at_startup_is_critical_and_quotes_its_error(tmp_path):
    b = _copy(tmp_path / "b")
    src = _log(b, "dynamics")
    recs = synth.log_records(src)
    keep = [r for r in recs if r.WhichOneof("record_type") not in ("history", "summary", "exit")]
    out = next(r for r in keep if r.WhichOneof("record_type") == "output_raw")
    err = type(out)()
    err.CopyFrom(out)
    err.output_raw.line = ("RuntimeError: Error(s) in loading state_dict for VideoTokenizer:\n\tsize mismatch for "
                           "encoder.patch_embed.weight: copying a param with shape torch.Size([16, 192]) from "
                           "checkpoint, the shape in current model is torch.Size([32, 192]).\n")
    exit_rec = next(r for r in recs if r.WhichOneof("record_type") == "exit")
    exit_rec.exit.exit_code = 1
    synth.write_wandb_log(src, [r.SerializeToString() for r in keep + [err, exit_rec]])
    shutil.rmtree(next(b.glob("results/*/dynamics")))
    compact, doc = _diagnose(b, tmp_path / "out")
    dyn = doc["stages"]["dynamics"]
    assert dyn["verdict"] == "critical"
    f = next(f for f in dyn["findings"] if f["rule_id"] == "crashed_at_startup")
    assert "size mismatch for encoder.patch_embed.weight" in f["message"]
    assert "video_tokenizer_path" in f["message"]
    top = compact["stages"]["dynamics"]["findings"][0]
    assert top["rule_id"] == "crashed_at_startup"


def test_a_folder_named_for_another_day_gets_a_note(tmp_path):
    b = _copy(tmp_path / "20261122_101500")
    compact, _ = _diagnose(b, tmp_path / "out")
    assert any("folder's name says 2026-11-22" in n for n in compact.get("notes", [])), compact.get("notes")


def test_an_earlier_run_roots_checkpoints_are_listed_not_dropped(tmp_path):
    """A restart into a newer run root: the stage is judged from the newest
    root, and the older root's checkpoints and grids are named, with how to
    judge them."""
    b = _copy(tmp_path / "b")
    old = next(b.glob("results/*/dynamics"))
    new = b / "results" / "2026_12_02_08_00_00" / "dynamics"
    shutil.copytree(old, new)
    shutil.rmtree(new / "checkpoints" / "dynamics_step_280")
    _, doc = _diagnose(b, tmp_path / "out")
    lin = doc["stages"]["dynamics"]["lineage"]
    assert lin["earlier_run_roots"] == [{"run_root": str(old.parent), "checkpoint_steps": [0, 140, 280],
                                         "checkpoints": 3, "images": 3}]
    assert [r["step"] for r in doc["stages"]["dynamics"]["checkpoints"]["table"]] == [0, 140]
    note = next(n for n in doc["notes"] if n.startswith("dynamics: "))
    assert "3 checkpoints (steps 0, 140, 280)" in note and f"--results {old.parent}" in note

    # the newest root's only trained checkpoint broken: no fallback there, the earlier attempt's is offered
    (new / "checkpoints" / "dynamics_step_140" / "model_state_dict.pt").write_bytes(b"")
    compact, doc = _diagnose(b, tmp_path / "out2")
    fb = compact["stages"]["dynamics"]["fallback"]
    assert fb["step"] is None and fb["restart"] is True
    assert fb["earlier_attempt"]["step"] == 280 and fb["earlier_attempt"]["path"] == str(old / "checkpoints" / "dynamics_step_280")
    assert "offered" in fb["reason"]
