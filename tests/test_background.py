"""Work forked into the background when diagnose starts: the drawer (loss
figures) and `forking.Pending` (the images' analysis); and `forking.imap`,
which spreads jobs over forked workers.

Run in fresh subprocesses: they fork only from a single-threaded process,
which a pytest worker is not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    drawer is killed and reaped, not waited for. Its preparation is made to
    take 30 s here, so waiting would show."""
    code = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from twdiag import drawer, plots
plots.prepare = lambda: time.sleep(30)  # the child inherits this
d = drawer.Drawer.start()
pid = d.pid
time.sleep(0.2)  # the child is inside prepare() now
t = time.perf_counter()
d.close()
took = time.perf_counter() - t
try:
    os.kill(pid, 0)
    alive = True
except ProcessLookupError:
    alive = False
print(json.dumps({{"took": took, "alive": alive}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["alive"] and out["took"] < 10, out


def test_pending_computes_in_a_child_or_here():
    """The result comes from a forked child (not this process); a child
    that fails is replaced by computing here; cancel() stops one unread; and
    with another thread alive nothing is forked."""
    code = f"""
import json, os, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from twdiag import forking

def whose(x):
    return [x * 2, os.getpid()]

def fails_there(parent):
    if os.getpid() != parent:
        os._exit(7)  # the child dies without answering
    return "here"

def slow():
    time.sleep(30)

me = os.getpid()
p = forking.Pending(whose, 21)
child = p.pid
value, pid = p.result()
failed = forking.Pending(fails_there, me).result()
s = forking.Pending(slow)
t = time.perf_counter(); s.cancel(); took = time.perf_counter() - t
ev = threading.Event(); th = threading.Thread(target=ev.wait); th.start()
q = forking.Pending(whose, 1)
threaded = [q.pid, q.result()[1]]
ev.set(); th.join()
try:
    os.waitpid(-1, os.WNOHANG); left = True
except ChildProcessError:
    left = False
print(json.dumps({{"value": value, "in_child": pid == child and pid != me, "failed": failed,
                  "cancel_s": took, "threaded": threaded == [0, me], "left": left}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["value"] == 42 and out["in_child"] and out["failed"] == "here", (out, r.stderr[-2000:])
    assert out["cancel_s"] < 10 and out["threaded"] and not out["left"], out  # slow() sleeps 30 s


def test_imap_spreads_jobs_over_workers_in_order_and_never_hangs():
    """forking.imap: results in order from forked workers (several jobs a
    chunk); a job's exception is raised where its result would have come,
    after the results before it; a worker that dies raises WorkerDied
    instead of waiting forever (multiprocessing.Pool's imap waited), or with
    on_death its job gets a stand-in and a new worker takes the rest; an
    early close stops busy workers at once; workers never fork in turn; no
    child is left behind; and garbage collection, paused only while an
    answer is unpickled, is on in the workers (a hostile pickle's cycles),
    between results and after, a raise included."""
    code = f"""
import gc, json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from twdiag import forking

me = os.getpid()
def square(x):
    return x * x, os.getpid(), forking.can_fork(), gc.isenabled()
def fails_at_5(x):
    if x == 5:
        raise ValueError("five")
    return x
def dies_at_3(x):
    if x == 3:
        os._exit(9)
    return x
def slow(x):
    if x:
        time.sleep(30)
    return x

got, gc_between = [], []
for v in forking.imap(square, [(i,) for i in range(23)], workers=2, chunksize=3):
    got.append(v), gc_between.append(gc.isenabled())
before, raised = [], None
try:
    for v in forking.imap(fails_at_5, [(i,) for i in range(12)], workers=2):
        before.append(v)
except ValueError as exc:
    raised = str(exc)
t = time.perf_counter()
try:
    list(forking.imap(dies_at_3, [(i,) for i in range(8)], workers=2))
    died = None
except forking.WorkerDied as exc:
    died = str(exc)
died_s = time.perf_counter() - t
replaced = list(forking.imap(dies_at_3, [(i,) for i in range(8)], workers=2, on_death=lambda x: -x))
gen = forking.imap(slow, [(i,) for i in range(4)], workers=2)
first = next(gen)  # the others sleep 30 s in their workers
t = time.perf_counter()
gen.close()
closed_s = time.perf_counter() - t
try:
    os.waitpid(-1, os.WNOHANG); left = True
except ChildProcessError:
    left = False
print(json.dumps({{"values": [v for v, _, _, _ in got], "pids": sorted({{p for _, p, _, _ in got}} - {{me}}),
                  "in_parent": sum(p == me for _, p, _, _ in got), "nested": any(f for _, _, f, _ in got),
                  "gc_workers": all(g for _, _, _, g in got), "gc_between": all(gc_between), "gc_after": gc.isenabled(),
                  "before": before, "raised": raised, "died": died, "died_s": died_s, "replaced": replaced,
                  "first": first, "closed_s": closed_s, "left": left}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["values"] == [i * i for i in range(23)], (out, r.stderr[-2000:])
    assert len(out["pids"]) == 2 and out["in_parent"] == 0 and not out["nested"], out
    assert out["before"] == [0, 1, 2, 3, 4] and out["raised"] == "five", out
    assert out["died"] and "without answering" in out["died"] and out["died_s"] < 10, out
    assert out["replaced"] == [0, 1, 2, -3, 4, 5, 6, 7], out  # on_death: that job's stand-in, a new worker for the rest
    assert out["first"] == 0 and out["closed_s"] < 10 and not out["left"], out
    assert out["gc_workers"] and out["gc_between"] and out["gc_after"], out


def test_images_analysed_elsewhere_are_judged_on_this_bundles_steps(tmp_path):
    """Results computed in another process are attached to this process's
    image records, so a step placed since (a resumed run's global axis) is
    the one reported; results for other files are not attached."""
    import copy
    sys.path.insert(0, str(ROOT))
    from twdiag import bundle, rules, visuals
    t = rules.load_thresholds()
    b = bundle.discover([BUNDLE])
    analysed = visuals.SharedImages(copy.deepcopy(b), t, None).result()
    shifted = b.stages["dynamics"].images
    for img in shifted:
        img.step += 1000  # as lineage.place_resumed would
    doc = visuals.analyse(b, t, analysed=analysed)
    steps = [d["step"] for d in doc["details"]["dynamics"]]
    assert steps == [img.step for img in shifted] and min(steps) >= 1000
    assert doc == visuals.analyse(b, t)  # the same as analysed here
    other = bundle.discover([EXAMPLES / "bundle-healthy"])
    assert not visuals._attach(other, visuals.SharedImages(b, t, None).result())


def test_images_are_shared_between_the_child_and_this_process_each_once():
    """diagnose's images: a child forked at discovery and this process, once
    its own work is done, take images from one counter, so each is analysed
    once and neither waits while images are left; the result equals an
    analysis done here alone. A child that dies (killed) leaves its images
    to this process."""
    code = f"""
import json, os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from twdiag import bundle, rules, visuals
t = rules.load_thresholds()
log = sys.argv[1]
real = visuals._guarded
def logged(img, th, keep, cache):
    with open(log, "a") as fh:
        fh.write(f"{{os.getpid()}} {{img.path.name}}\\n")
    return real(img, th, keep, cache)
visuals._guarded = logged
def details(analysed):
    return visuals.analyse(bundle.discover([{str(BUNDLE)!r}]), t, analysed=analysed)["details"]
b = bundle.discover([{str(BUNDLE)!r}])
shared = visuals.SharedImages(b, t, None)
child = shared.child.pid
time.sleep(0.15)  # the child takes some first
shared_details = details(shared.result())
lines = [l.split() for l in open(log)]
killed = visuals.SharedImages(bundle.discover([{str(BUNDLE)!r}]), t, None)
time.sleep(0.1)
os.kill(killed.child.pid, signal.SIGKILL)
killed_details = details(killed.result())
alone = details(visuals._analysed(bundle.discover([{str(BUNDLE)!r}]), t["visuals"], t["visuals"]["sheet_count"],
                                  None, None, parallel=False))
print(json.dumps({{"n": len(shared.jobs), "names": [n for _, n in lines],
                  "by_child": sum(p == str(child) for p, _ in lines), "here": sum(p == str(os.getpid()) for p, _ in lines),
                  "same": shared_details == alone, "killed_same": killed_details == alone}}))
"""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, str(Path(d) / "log")], capture_output=True, text=True,
                           timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] >= 4 and sorted(out["names"]) == sorted(set(out["names"])) and len(out["names"]) == out["n"], out
    assert out["by_child"] >= 1 and out["here"] >= 1 and out["by_child"] + out["here"] == out["n"], out
    assert out["same"] and out["killed_same"], out
