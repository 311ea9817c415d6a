"""diagnose --follow on a real live file: a child process runs a real wandb
offline run, the follower reads it while it grows, a checkpoint is emptied
mid-run, then the child is SIGKILLed. The follower's NDJSON must say live,
then report the emptied checkpoint, then crashed or stalled, and stop."""
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import SCRIPTS

CHILD = """
import math, os, sys, time
os.environ["WANDB_SILENT"] = "true"
import wandb
run = wandb.init(project="follow", name="dynamics_2026_12_01_12_00_00", mode="offline", dir=sys.argv[1],
                 config={"n_updates": 100000, "gradient_accumulation_steps": 1, "num_bins": 4, "latent_dim": 5,
                         "learning_rate": 0.01, "n_actions": 4, "log_interval": 1000},
                 settings=wandb.Settings(console="off", x_disable_stats=True))
print("started", flush=True)
for step in range(100000):
    run.log({"train/loss": 6.9 * math.exp(-step / 300) + 0.5, "learning_rate/group_0": 0.01,
             "learning_rate/group_1": 0.01, "unique_actions": 3, "action_entropy": 1.0}, step=step)
    time.sleep(0.002)
"""


def _lines(proc, until, timeout):
    """NDJSON lines from the follower until `until(line)` is true."""
    out, end = [], time.time() + timeout
    while time.time() < end:
        raw = proc.stdout.readline()
        if not raw:
            if proc.poll() is not None:
                break
            continue
        line = json.loads(raw)
        out.append(line)
        if until(line):
            return out
    raise AssertionError(f"timed out; lines so far: {[(x['event'], x['stages']) for x in out]}")


def test_follow_a_live_run_then_a_killed_one(tmp_path):
    torch = pytest.importorskip("torch")
    from twdiag import synth
    bundle = tmp_path / "bundle"
    (bundle / "wandb").mkdir(parents=True)
    stage = bundle / "results" / "2026_12_01_12_00_00" / "dynamics"
    for step in (0, 1000, 2000):
        synth.write_checkpoint(stage, "dynamics", step)
    (tmp_path / "t.yaml").write_text("liveness:\n  stale_seconds: 6\n")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(bundle)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        for _ in range(100):  # wait for the first block on disk
            if list((bundle / "wandb").glob("offline-run-*/*.wandb")):
                break
            time.sleep(0.1)
        follower = subprocess.Popen([sys.executable, str(SCRIPTS / "diagnose.py"), str(bundle), "--follow",
                                     "--interval", "0.5", "--out-dir", str(tmp_path / "out"),
                                     "--thresholds", str(tmp_path / "t.yaml"), "--max-polls", "400"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = _lines(follower, lambda x: True, 120)
        assert first[0]["event"] == "change" and first[0]["stages"]["dynamics"]["state"] == "live"
        assert first[0]["stages"]["dynamics"]["fallback"] == 2000
        newest = stage / "checkpoints" / "dynamics_step_2000"
        torch.save({}, newest / "model_state_dict.pt")  # the multi-rank overwrite, mid-run
        emptied = _lines(follower, lambda x: x["stages"]["dynamics"]["fallback"] == 1000, 60)
        assert any("dynamics.fallback" in x["changed"] for x in emptied)
        assert emptied[-1]["stages"]["dynamics"]["newest_finding"]["rule_id"] in (
            "ckpt_latest_unusable", "ckpt_invalid_ratio")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        rest = _lines(follower, lambda x: x["event"] == "stop", 120)
        states = [x["stages"]["dynamics"]["state"] for x in first + emptied + rest]
        assert states[0] == "live" and states[-1] in ("crashed", "stalled_or_crashed")
        assert "judged" in rest[-1]["reason"]
        follower.wait(30)
        assert follower.returncode == 0
        assert (tmp_path / "out" / "diagnosis.json").is_file()
        assert not list((tmp_path / "out").glob(".twdiag-tmp-*"))
    finally:
        for p in (child,):
            if p.poll() is None:
                p.kill()


@pytest.mark.fast
def test_follow_holds_a_bounded_window_of_rows(tmp_path):
    """The live decoder thins what it holds: the newest rows whole, older rows
    halved, every sparse-column row and every non-finite value kept, and the
    values of the rows it keeps unchanged. The follower says so in notes."""
    import argparse
    import shutil

    import numpy as np
    from conftest import EXAMPLES
    from twdiag import follow, history, rules
    src = next(EXAMPLES.glob("bundle-healthy/wandb/*njp60fno/*.wandb"))  # dynamics, 281 rows
    full = history.decode(src).history
    live = history.LiveLog(src, summary=False)
    dropped = live.bound(120, 50)
    got = live.runlog().history
    assert dropped == len(full) - len(got) > 0 and live.thinned == dropped
    sparse = [c for c in full.columns if c != "_step" and full[c].notna().sum() < len(full) / 2]
    allowed = 120 + sum(int(full[c].notna().sum()) for c in sparse)
    assert len(got) <= allowed
    assert got["_step"].tail(50).tolist() == full["_step"].tail(50).tolist()  # the window is whole
    merged = got.merge(full, on="_step", suffixes=("", "_full"))
    assert len(merged) == len(got)  # every kept row is a real row ...
    for c in full.columns:
        if c != "_step" and full[c].dtype.kind == "f":  # ... with its values unchanged
            assert np.allclose(merged[c], merged[c + "_full"], equal_nan=True), c
    for c in sparse:
        assert got[c].notna().sum() == full[c].notna().sum(), c

    bundle = tmp_path / "b"
    shutil.copytree(EXAMPLES / "bundle-healthy", bundle)
    t = rules.load_thresholds()
    t["limits"].update(follow_max_rows=120, follow_window_rows=50)
    args = argparse.Namespace(deep="auto", now=1796169600, count=None, read_outside_bundle=False)
    a, doc = follow.Follower(bundle, {}, None, t, args, tmp_path / "out").poll()
    assert any("--follow holds at most 120 history rows" in n for n in doc["notes"])
    assert doc["stages"]["dynamics"]["verdict"] == "normal"
