"""The drawer: loss figures drawn by a process forked when diagnose starts.

Run in fresh subprocesses: the drawer forks only from a single-threaded
process, which a pytest worker is not."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.fast

BUNDLE = EXAMPLES / "bundle-unhealthy"

_SCRIPT = """
import json, os, signal, sys, contextlib, io
sys.path.insert(0, {root!r})
from pathlib import Path
from twdiag import bundle, drawer, pipeline, report_files, rules
t = rules.load_thresholds()
mode = sys.argv[1]
d = drawer.Drawer.start()
started = d is not None
if mode == "killed":
    os.kill(d.pid, signal.SIGKILL)
a = pipeline.run(bundle.discover([Path({bundle!r})]), t, progress=lambda m: None)
doc = report_files.write_report(a, None, Path(sys.argv[2]), save_tables=False, drawer=d)
try:  # reaped: no child left behind
    os.waitpid(-1, os.WNOHANG)
    left = True
except ChildProcessError:
    left = False
print(json.dumps({{"started": started, "plots": doc["outputs"].get("loss_plots"), "errors": doc.get("errors", []),
                  "left": left}}))
"""


def _run(mode: str, out) -> dict:
    code = _SCRIPT.format(root=str(ROOT), bundle=str(BUNDLE))
    r = subprocess.run([sys.executable, "-c", code, mode, str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_drawn_by_the_drawer_equals_drawn_here(tmp_path):
    """The same PNG bytes whether the forked drawer or this process drew them."""
    with_drawer = _run("drawer", tmp_path / "a")
    assert with_drawer["started"] and not with_drawer["left"] and not with_drawer["errors"]
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from twdiag import bundle, pipeline, report_files, rules
a = pipeline.run(bundle.discover([Path({str(BUNDLE)!r})]), rules.load_thresholds(), progress=lambda m: None)
report_files.write_report(a, None, Path({str(tmp_path / 'b')!r}), save_tables=False)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=180)
    names = sorted(p.name for p in (tmp_path / "a").glob("loss_*.png"))
    assert names == ["loss_dynamics.png", "loss_latent_actions.png", "loss_video_tokenizer.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    html = (tmp_path / "a" / "diagnosis.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # the figures embedded from the drawer's bytes


def test_a_drawer_that_died_costs_nothing(tmp_path):
    """The drawer killed before it was sent anything: the figures are drawn
    here, nothing is reported as an error, and no child is left."""
    out = _run("killed", tmp_path / "k")
    assert out["started"] and not out["left"] and not out["errors"]
    assert sorted(out["plots"]) == ["dynamics", "latent_actions", "video_tokenizer"]
    assert all((tmp_path / "k" / f"loss_{s}.png").stat().st_size > 10_000 for s in out["plots"])


def test_a_missing_input_returns_before_the_heavy_imports(tmp_path):
    """A missing input is found before anything heavy is imported or forked:
    exit 3, no pandas, matplotlib or torch in the process, and no child."""
    code = f"""
import json, os, sys, contextlib, io
sys.path.insert(0, {str(ROOT)!r})
from twdiag import cli
with contextlib.redirect_stdout(io.StringIO()):
    rc = cli.main(["diagnose", {str(tmp_path / 'missing')!r}, "--out-dir", {str(tmp_path / 'o')!r}])
try:
    os.waitpid(-1, os.WNOHANG)
    child = True
except ChildProcessError:
    child = False
print(json.dumps({{"rc": rc, "child": child,
                  "heavy": sorted(m for m in ("pandas", "matplotlib", "torch") if m in sys.modules)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"rc": 3, "child": False, "heavy": []}, (out, r.stderr[-2000:])  # 3: the input does not exist


def test_command_line_keeps_blas_serial_and_the_probe_does_not_inherit_it():
    """OpenBLAS's spinning thread pool slowed forked work twofold: the command
    line keeps BLAS on one thread unless the user chose otherwise, and the
    probe's child gets the user's environment back."""
    code = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from twdiag import cli, forking
print(json.dumps({{"set": os.environ.get("OPENBLAS_NUM_THREADS"),
                  "child": forking.child_env().get("OPENBLAS_NUM_THREADS", "absent")}}))
"""
    import os
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert json.loads(r.stdout) == {"set": "1", "child": "absent"}, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**env, "OPENBLAS_NUM_THREADS": "3"})
    assert json.loads(r.stdout) == {"set": "3", "child": "3"}, r.stderr[-2000:]


def test_a_drawer_not_needed_is_stopped_not_waited_for():
    """Closed before anything was sent (the run failed on the way): the
    drawer is killed mid-import and reaped, and close() does not wait for
    matplotlib's import to finish."""
    code = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from twdiag import drawer
d = drawer.Drawer.start()
pid = d.pid
t = time.perf_counter()
d.close()
took = time.perf_counter() - t
try:
    os.kill(pid, 0)
    alive = True
except ProcessLookupError:
    alive = False
print(json.dumps({{"took": took, "alive": alive, "imported": "matplotlib" in sys.modules}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["alive"] and not out["imported"], out
    assert out["took"] < 0.2, out  # matplotlib's import alone takes longer
