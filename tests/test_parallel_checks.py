"""Structural checks and `--deep all` scans spread over forked workers.

Run in fresh subprocesses: work is forked only from a single-threaded
process, which a pytest worker is not (see conftest)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.fast

_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from twdiag import bundle, checkpoints, forking, ptfile, rules
t = rules.load_thresholds()
root = Path(sys.argv[1])
stage = bundle.discover([root]).stages["dynamics"]

real = checkpoints.check_checkpoint
def marked(*args):  # which process checked it (inherited by the workers)
    ck = real(*args)
    ck.extra_files = [str(os.getpid())]
    return ck
checkpoints.check_checkpoint = marked

# every data.pkl counts as large, and the run's budget holds 10 model pickles
limits = ptfile.Limits.from_thresholds(t)
limits.large_pickle_bytes = int(sys.argv[2])
limits.run_large_pickle_bytes = int(sys.argv[3])
limits.fork_checks_seconds = 0.0  # forked after the first whatever their pace
if sys.argv[4] == "fused":  # --deep all: each checkpoint checked and scanned by a worker
    res = checkpoints.check_stage(stage, limits, scan_chunk=int(t["checkpoints"]["deep_chunk_elements"]))
else:  # structural checks alone
    res = checkpoints.check_stage(stage, limits)
refused = [f"{{c.step}}/{{p.file}}" for c in res.checkpoints for p in c.problems if "already read" in p.detail]
read = sum(fc.layout[fc.prefix + "data.pkl"].size for c in res.checkpoints for fc in c.files.values()
           if fc.layout and fc.crc_checked != "none")
pids = {{c.extra_files[0] for c in res.checkpoints}}

# --deep all in one pass against structure first, then the scans
fused = checkpoints.check_all(bundle.discover([root]), t, deep="all")["dynamics"]
plain = checkpoints.check_all(bundle.discover([root]), t)["dynamics"]
checkpoints.deep_scan_all([c for c in plain.checkpoints if c.usable], ptfile.Limits.from_thresholds(t),
                          int(t["checkpoints"]["deep_chunk_elements"]))
same = [(a.status, a.deep, a.deep_files, a.weights, {{n: f.facts for n, f in a.files.items()}})
        == (b.status, b.deep, b.deep_files, b.weights, {{n: f.facts for n, f in b.files.items()}})
        for a, b in zip(fused.checkpoints, plain.checkpoints)]
print(json.dumps({{"cpus": forking.cpus(), "pids": len(pids - {{str(os.getpid())}}), "refused": refused,
                  "read": read, "spent": limits.spent.value, "same": same,
                  "deep": [c.deep for c in fused.checkpoints],
                  "statuses": [c.status for c in fused.checkpoints]}}))
"""

N = 20


def _bundle(tmp_path):
    ckdir = tmp_path / "results" / "2026_11_28_06_35_02" / "dynamics" / "checkpoints"
    model = {f"blocks.{i}.weight": torch.randn(16, 16) for i in range(80)}  # the largest pickle
    optim = {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 64),
                           "exp_avg_sq": torch.rand(64, 64)} for i in range(12)},
             "param_groups": [{"lr": 1e-3, "params": list(range(12))}]}
    for k in range(N):
        d = ckdir / f"dynamics_step_{k * 100}"
        d.mkdir(parents=True)
        torch.save(model, d / "model_state_dict.pt")
        torch.save(optim, d / "optim_state_dict.pt")
        torch.save({"step": k * 100, "timestamp": f"2026_11_28_07_{k:02d}_00", "config": {}}, d / "state.pt")
    bad = ckdir / "dynamics_step_700" / "optim_state_dict.pt"  # a NaN the fused scan must find
    optim["state"][3]["exp_avg"][5, 5] = float("nan")
    torch.save(optim, bad)
    return tmp_path


def _pickle_size(path) -> int:
    import zipfile
    with zipfile.ZipFile(path) as z:
        return next(i.file_size for i in z.infolist() if i.filename.endswith("/data.pkl"))


@pytest.mark.parametrize("mode", ["fused", "checks"])
def test_forked_structural_checks_share_one_large_pickle_budget(tmp_path, mode):
    """20 checkpoints checked by two workers (with their deep scans, or
    structural checks alone), every model pickle counted as large and the
    run's budget holding ten of them: ten are read in all, not ten per
    worker; and `--deep all`'s one-pass scan gives what structure first,
    then the scans, gives (the planted NaN included)."""
    root = _bundle(tmp_path)
    ck0 = root / "results" / "2026_11_28_06_35_02" / "dynamics" / "checkpoints" / "dynamics_step_0"
    model_pkl = _pickle_size(ck0 / "model_state_dict.pt")
    others = max(_pickle_size(ck0 / "optim_state_dict.pt"), _pickle_size(ck0 / "state.pt"))
    assert others < model_pkl, "the test needs the model's pickle to be the largest"
    budget = 10 * model_pkl + model_pkl // 2
    code = _SCRIPT.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(root), str(others), str(budget), mode],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["cpus"] >= 2:
        assert out["pids"] == 2, out  # both workers checked some, none was checked here
    assert len(out["refused"]) == N - 10, out["refused"]
    assert all(x.endswith("model_state_dict.pt") for x in out["refused"])
    assert out["spent"] == 10 * model_pkl
    assert all(out["same"]), out["same"]
    assert out["deep"].count("failed") == 1 and out["statuses"].count("non_finite") == 1
    assert out["deep"].count("passed") == N - 1


_DIES = """
import json, os, sys
MAIN = os.getpid()
sys.path.insert(0, {root!r})
from pathlib import Path
from twdiag import bundle, checkpoints, rules
t = rules.load_thresholds()
t["checkpoints"]["fork_checks_seconds"] = 0.0  # forked after the first whatever their pace
real = checkpoints.check_checkpoint
def killer(stage, step, path, limits):
    if step == 700 and os.getpid() != MAIN:  # the kernel's OOM kill, in a worker
        os._exit(137)
    return real(stage, step, path, limits)
checkpoints.check_checkpoint = killer
res = checkpoints.check_all(bundle.discover([Path(sys.argv[1])]), t, deep="all")["dynamics"]
lost = [c for c in res.checkpoints if c.step == 700][0]
print(json.dumps({{"steps": [c.step for c in res.checkpoints],
                  "statuses": {{c.step: c.status for c in res.checkpoints}},
                  "detail": lost.problems[0].detail if lost.problems else None}}))
"""


def test_a_worker_killed_during_a_check_marks_that_checkpoint_and_the_rest_go_on(tmp_path):
    """`--deep all` when the kernel kills the worker checking one checkpoint
    (out of memory): that checkpoint is unsafe to resume from, with the
    reason, and every other is checked by a worker forked in its place; no
    checkpoint is lost, and nothing waits forever."""
    root = _bundle(tmp_path)
    code = _DIES.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == [k * 100 for k in range(N)], out
    statuses = {int(k): v for k, v in out["statuses"].items()}
    assert statuses[700] == "unsafe_pickle" and "ended the worker process" in out["detail"], out
    assert all(s == "valid" for k, s in statuses.items() if k != 700), statuses  # 700's NaN file went with it


def test_a_worker_killed_holding_the_shared_budget_lock_does_not_hang_the_pass():
    """A worker killed while it holds the shared large-pickle count's lock
    (SIGKILL on an interrupt, or the kernel's OOM kill): another worker's
    next large pickle counts as over budget instead of waiting forever, and
    the count still comes back when the pass ends."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from twdiag import forking, ptfile, rules
limits = ptfile.Limits.from_thresholds(rules.load_thresholds())
limits.spent.value = 7
with ptfile.shared_spending(limits):
    ptfile._charge(limits, limits.large_pickle_bytes + 1)
    pid = os.fork()
    if pid == 0:
        limits.spent._shared.get_lock().acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    forking.LOCK_WAIT_SECONDS = 0.5
    refused = ptfile._charge(limits, 1)  # the lock's holder is dead: counted as spent, at once
print(limits.spent.value - 7 - limits.large_pickle_bytes - 1, limits.spent.shared, refused)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["0", "False", "False"], r.stderr[-2000:]
