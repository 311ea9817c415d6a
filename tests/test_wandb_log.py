"""Framing and record decoding against real files (corpus) and real wandb output."""
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest

from twdiag import history, wandb_log

pytestmark = pytest.mark.fast

SCAN_KEYS = ["header_ok", "header_error", "layout", "records_total", "chunks", "corrupt_chunks",
             "corrupt_detail", "zeroed_blocks_skipped", "orphan_chunks_skipped",
             "partial_records_dropped", "nonzero_padding", "truncated_tail", "truncation",
             "scan_end_offset"]


def _entries(corpus):
    m = json.loads((corpus / "MANIFEST.json").read_text())
    return m["files"] + m["damaged"] + m["synthetic"]


def _norm(v):
    if isinstance(v, float) and not math.isfinite(v):
        return history.nf_text(v)
    return v


def test_corpus_decodes_to_manifest(corpus):
    entries = _entries(corpus)
    assert len(entries) >= 17
    for e in entries:
        x = e["expected"]
        log = history.decode(corpus / e["file"])
        scan = log.scan.to_dict()
        for k in SCAN_KEYS:
            assert scan[k] == x[k], (e["file"], k)
        assert log.record_types == x["record_types"], e["file"]
        h = log.history
        assert len(h) == x["history_rows"], e["file"]
        assert len(set(log.history_keys)) == x["history_keys"], e["file"]
        assert (int(h["_step"].iloc[0]) if len(h) else None) == x["first_step"]
        assert (int(h["_step"].iloc[-1]) if len(h) else None) == x["last_step"]
        assert len(log.config) == x["config_keys"] and len(log.summary) == x["summary_keys"]
        assert log.meta.get("exit_code") == x["exit_code"] and ("exit_code" in log.meta) == x["has_exit"]
        assert log.meta.get("cli_version") == x["cli_version"]
        assert log.meta.get("name") == x["display_name_last_run"]
        assert log.value_json_errors == x["value_json_errors"]
        for key, value in x["summary_scalars"].items():
            got = _norm(log.summary.get(key))
            assert got == value or (isinstance(value, float) and abs(got - value) < 1e-12), (e["file"], key)


def test_block_parallel_decode_equals_serial(corpus):
    for e in _entries(corpus):
        a = history.decode(corpus / e["file"], workers=1)
        b = history.decode(corpus / e["file"], workers=3)
        assert a.scan.to_dict() == b.scan.to_dict(), e["file"]
        assert a.history.equals(b.history) and a.summary == b.summary and a.meta == b.meta
        c = history.decode(corpus / e["file"], workers=3, summary=False)  # as diagnose decodes
        assert c.summary is None and c.history.equals(a.history) and c.record_types == a.record_types


def test_shifted_layout_misread_without_detection(corpus):
    e = next(x for x in _entries(corpus) if "shifted" in x["file"])
    report, fh, _ = wandb_log.open_log(corpus / e["file"])
    report.layout = "standard"
    n = sum(1 for _ in wandb_log.iter_payloads(fh, report, 0))
    fh.close()
    wrong = e["expected_if_read_with_standard_layout"]
    assert n == wrong["records_total"] and report.corrupt_chunks == wrong["corrupt_chunks"]


def test_damage_is_reported_not_raised(tmp_path, runs):
    src = runs["healthy"]
    data = src.read_bytes()
    cases = {
        "empty.wandb": b"",
        "magic.wandb": data[:4] + b"\xef\xbe" + data[6:],
        "notwandb.wandb": b"hello world, not a log",
        "cut.wandb": data[: len(data) // 2 + 3],
        "flip.wandb": data[:40000] + bytes([data[40000] ^ 0xFF]) + data[40001:],
        "zeros.wandb": data[:32768] + b"\0" * 32768 + data[65536:],
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        log = history.decode(p)
        if name in ("empty.wandb", "magic.wandb", "notwandb.wandb"):
            assert not log.scan.header_ok and log.error and log.status == "unreadable"
        else:
            assert log.scan.header_ok and len(log.history) > 0
    assert history.decode(tmp_path / "cut.wandb").scan.truncated_tail
    assert history.decode(tmp_path / "flip.wandb").scan.corrupt_chunks == 1
    assert history.decode(tmp_path / "zeros.wandb").scan.zeroed_blocks_skipped == 1


def test_truncation_keeps_a_prefix_of_records(runs):
    data = runs["healthy"].read_bytes()
    full = list(wandb_log.scan(runs["healthy"])[1])
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for cut in (7, 100, 32768, 32770, 50000, len(data) - 1):
            p = os.path.join(d, "x.wandb")
            with open(p, "wb") as fh:
                fh.write(data[:cut])
            report, it = wandb_log.scan(p)
            got = list(it)
            assert got == full[:len(got)]
            assert report.corrupt_chunks == 0


def test_read_only_file(tmp_path, runs):
    p = tmp_path / "ro.wandb"
    shutil.copy(runs["healthy"], p)
    p.chmod(stat.S_IRUSR)
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        log = history.decode(p)
        assert len(log.history) == 600
    finally:
        tmp_path.chmod(stat.S_IRWXU)


def test_round_trip_values(runs):
    log = history.decode(runs["odd"])
    h = log.history
    assert len(h) == 30 and h["_step"].tolist() == list(range(30))
    assert log.non_finite["train/loss"] == {"rows": [5, 6, 7], "values": ["-Infinity", "NaN", "Infinity"]}
    assert h.loc[10, "train/loss"] == pytest.approx(1 / 11)
    assert h.loc[3, "nested"] == {"a": 3, "b": {"c": 6}}
    hist = h.loc[10, "action_distribution"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 14
    assert h.loc[20, "frame"]["_type"] == "image-file"
    assert log.meta["console_lines"] and any("Step 29 Loss" in line for line in log.console_tail)


def test_empty_run_and_metadata(runs):
    log = history.decode(runs["empty"])
    assert len(log.history) == 0 and log.status == "finished" and log.meta["exit_code"] == 0
    assert log.config["n_updates"] == 600 and log.meta["name"] == "dynamics_2026_11_28_07_05_00"
    assert log.meta["tags"] == ["tinyworlds-synth", "training"]


def test_healthy_run_matches_logged_values(runs):
    from twdiag import synth
    rows = synth.curve_rows("dynamics", 600, seed=1, start=6.9, end=0.4, noise=0.04, n_updates=600,
                            base_lr=0.01, spike_at=300, actions=synth.healthy_actions())
    log = history.decode(runs["healthy"])
    assert log.history["train/loss"].tolist() == [r["train/loss"] for r in rows]
    assert log.history["unique_actions"].tolist() == [r["unique_actions"] for r in rows]
    assert log.summary["train/loss"] == rows[-1]["train/loss"]


def test_record_classes_load_without_wandbs_package_and_leave_it_importable(runs, tmp_path):
    """history._proto() skips wandb's heavy package init; a later
    `import wandb` must still give the real package, sharing the classes."""
    import subprocess
    import sys
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from twdiag import history
pb = history._proto()
assert "wandb" not in sys.modules and "wandb.sdk" not in sys.modules, sorted(m for m in sys.modules if m.startswith("wandb"))
log = history.decode({str(runs["healthy"])!r})
assert len(log.history) > 0
import wandb
assert callable(wandb.init) and wandb.__version__
from wandb.proto import wandb_internal_pb2
assert wandb_internal_pb2 is pb
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_decode_workers_are_not_forked_beside_live_threads(corpus, monkeypatch):
    """Forking beside live threads (wandb's, once a run was started in the
    process) can hang a worker: the ranges are decoded here instead, with
    the same result; a process without other threads forks its workers."""
    import subprocess
    import sys
    import threading
    e = max(_entries(corpus), key=lambda x: (corpus / x["file"]).stat().st_size)  # several blocks
    serial = history.decode(corpus / e["file"], workers=1)
    done = threading.Event()
    t = threading.Thread(target=done.wait, args=(60,), daemon=True)
    t.start()
    try:
        def no_fork(*a, **k):
            raise AssertionError("a worker was forked beside a live thread")
        monkeypatch.setattr(os, "fork", no_fork)
        ranged = history.decode(corpus / e["file"], workers=3)
    finally:
        done.set()
        t.join()
    assert ranged.history.equals(serial.history) and ranged.meta == serial.meta
    code = f"""
import os, sys
from unittest import mock
from twdiag import history
path = {str(corpus / e["file"])!r}
started = []
real = os.fork
def counted():
    pid = real()
    if pid:
        started.append(pid)
    return pid
with mock.patch.object(os, "fork", counted):
    forked = history.decode(path, workers=3)
assert len(started) >= 2, started
assert forked.history.equals(history.decode(path, workers=1).history)
print("ok")
"""
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent)
    assert alone.stdout.strip() == "ok", alone.stderr[-1000:]  # a script's process: no other thread


def _summary_payloads(seed: int, n: int, layouts: int) -> list[bytes]:
    """Summary records drawn from a few key layouts, with nested paths that
    turn values into dicts and back, removals, and repeated keys."""
    import random

    pb = history._proto()
    rng = random.Random(seed)
    paths = [("loss",), ("lr",), ("a",), ("a", "b"), ("a", "c"), ("a", "b", "d"), ("x",), ("_wandb", "runtime")]
    shapes = []
    for _ in range(layouts):
        ups = [(rng.choice(paths), rng.random() < 0.5) for _ in range(rng.randint(1, 4))]
        rms = [rng.choice(paths) for _ in range(rng.randint(0, 1))]
        shapes.append((ups, rms))
    out = []
    for i in range(n):
        ups, rms = rng.choice(shapes)
        rec = pb.Record(num=i)
        for path, plain in ups:  # a one-part path as `key` or as `nested_key`: two layouts
            item = rec.summary.update.add(value_json=json.dumps(rng.choice([i, f"s{i}", {"k": i}, [i, 1.5]])))
            if len(path) == 1 and plain:
                item.key = path[0]
            else:
                item.nested_key.extend(path)
        for path in rms:
            rec.summary.remove.add().nested_key.extend(path)
        out.append(rec.SerializeToString())
    return out


@pytest.mark.parametrize("seed,layouts", [(1, 3), (2, 8), (3, 40), (4, 300)])
def test_shadowed_summary_records_skipped_give_the_replay_of_every_record(seed, layouts, monkeypatch):
    """Summary records a later one with the same paths shadows are not
    replayed; the summary must be the replay of every record, whatever the
    layouts, nested paths, removals and order (300 layouts: more than are
    ever held back, so they are flushed on the way)."""
    payloads = _summary_payloads(seed, 2000, layouts)
    every = history._Decoder()
    for p in payloads:
        every._on_summary(history._proto().Record.FromString(p).summary)
    replayed = []
    dec = history._Decoder()
    real = dec._on_summary
    dec._on_summary = lambda s: (replayed.append(1), real(s))
    history._feed(dec, wandb_log.ScanReport(path="synthetic"), payloads)
    assert dec.summary.build() == every.summary.build()
    assert dec.summary.build()[0]  # not empty
    if layouts <= 8:
        assert len(replayed) <= layouts  # the rest were shadowed
    else:
        assert len(replayed) < len(payloads)
