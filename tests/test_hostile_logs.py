"""Hostile `.wandb` logs forged from a genuine example's own records: one bad
record costs only itself, and memory stays bounded.

Each log is the example's records, re-framed by `synth.write_wandb_log`
after one change wandb itself would never write: a `_step` of NaN,
Infinity, a string or 1e300; a string in a float column; a config record
setting 60k keys and the next removing them; one history row of 60k keys;
console records of 17 MB and 1 MB (past the record and line caps)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, cli
from twdiag import history, synth

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
BUNDLE = EXAMPLES / "bundle-unhealthy"


def _dynamics_log() -> Path:
    return sorted(BUNDLE.glob("wandb/*/*.wandb"))[-1]


def _forged_bundle(tmp_path: Path, change) -> tuple[Path, Path]:
    """A copy of the unhealthy bundle whose dynamics log went through `change(records)`."""
    dst = tmp_path / "bundle"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("docs"))
    log = sorted(dst.glob("wandb/*/*.wandb"))[-1]
    records = synth.log_records(log)
    change(records)
    synth.write_wandb_log(log, [r.SerializeToString() for r in records])
    return dst, log


def _histories(records) -> list:
    return [r for r in records if r.WhichOneof("record_type") == "history"]


def _item(rec, key: str):
    return next(i for i in rec.history.item if (tuple(i.nested_key) or (i.key,)) == (key,))


@pytest.mark.parametrize("bad", ["Infinity", '"abc"', "1e300", "-3"])
def test_a_bad_step_is_dropped_by_the_decoder(tmp_path, bad):
    def change(records):
        _item(_histories(records)[37], "_step").value_json = bad
    _, log = _forged_bundle(tmp_path, change)
    decoded = history.decode(log)
    assert len(decoded.history) == 399 and decoded.dropped["bad_step_rows"]["count"] == 1
    assert bad.strip('"')[:3] in decoded.dropped["bad_step_rows"]["reason"]


def test_a_bad_step_drops_that_row_only(tmp_path, bad="NaN"):
    """The whole report still comes out, and skipped names the file and the value."""
    def change(records):
        _item(_histories(records)[37], "_step").value_json = bad
    dst, log = _forged_bundle(tmp_path, change)
    code, doc, _ = cli("diagnose", str(dst), "--out-dir", str(tmp_path / "out"))
    assert code == 0, doc
    full = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    for stage in ("video_tokenizer", "latent_actions", "dynamics"):
        assert full["stages"][stage]["stats"]["metrics"]["rows"] > 0, stage
    assert full["stages"]["dynamics"]["stats"]["metrics"]["rows"] == 399  # 400 logged, one dropped
    hit = [s for s in full["skipped"] if s["path"].endswith(log.name) and "_step" in s["reason"]]
    assert hit and bad.strip('"')[:3] in hit[0]["reason"], full["skipped"]


def test_a_string_in_a_float_column_is_exported_as_text(tmp_path):
    pytest.importorskip("pyarrow")

    def change(records):
        _item(_histories(records)[5], "train/loss").value_json = '"oops"'
    dst, _ = _forged_bundle(tmp_path, change)
    code, doc, _ = cli("export", str(dst), "--out-dir", str(tmp_path / "logs"), "--format", "csv,parquet")
    assert code == 0, doc
    assert any("mixes numbers and text" in s["reason"] and "train/loss" in s["reason"] for s in doc["skipped"])
    import pyarrow.parquet as pq
    table = pq.read_table(next((tmp_path / "logs").glob("dynamics_history_*.parquet")))
    assert table.column("train/loss").to_pylist()[5] == "oops"
    # the stats still judge the stage on the numeric rows
    code, doc, _ = cli("stats", str(dst))
    assert code == 0 and doc["stages"]["dynamics"]["verdict"] == "critical"


def test_config_set_then_removed_is_linear(tmp_path):
    def change(records):
        cfg = next(r for r in records if r.WhichOneof("record_type") == "config") if any(
            r.WhichOneof("record_type") == "config" for r in records) else None
        add, drop = type(records[0])(), type(records[0])()
        for i in range(60_000):
            item = add.config.update.add()
            item.key, item.value_json = f"k{i}", "1"
            drop.config.remove.add().key = f"k{i}"
        records[3:3] = [add, drop]
        assert cfg is None or cfg.config is not None
    _, log = _forged_bundle(tmp_path, change)
    t = time.perf_counter()
    decoded = history.decode(log)
    assert time.perf_counter() - t < 20
    assert not any(k.startswith("k") and k[1:].isdigit() for k in decoded.config)


def _rss_decode(log: Path) -> dict:
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from twdiag import history
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
log = history.decode(sys.argv[1])
print(json.dumps({{"rss_mb": peak_mb(), "dropped": log.dropped,
                   "rows": len(log.history), "cols": len(log.history.columns), "tail": log.console_tail[-3:]}}))
"""
    r = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_a_wide_row_and_huge_console_records_stay_bounded(tmp_path):
    def change(records):
        wide = _histories(records)[10]
        for i in range(60_000):
            item = wide.history.item.add()
            item.key, item.value_json = f"w{i}", "1"
        out = next(r for r in records if r.WhichOneof("record_type") == "output_raw")
        for size in (17 << 20, 1 << 20):
            big = type(out)()
            big.CopyFrom(out)
            big.output_raw.line = "x" * size + "\nRuntimeError: the end of a huge line\n"
            records.insert(-2, big)
    _, log = _forged_bundle(tmp_path, change)
    doc = _rss_decode(log)
    assert doc["rss_mb"] < 600, doc["rss_mb"]
    assert doc["dropped"]["history_items"]["count"] > 40_000
    assert doc["dropped"]["oversized_records"]["count"] == 1      # the 17 MB record: skipped unparsed
    assert doc["dropped"]["console_records_cut"]["count"] == 1    # the 1 MB one: its end kept
    assert any("RuntimeError: the end of a huge line" in line for line in doc["tail"])
    assert doc["rows"] == 400 and doc["cols"] < 20_100
