"""scan, query and records on real bundles: the three examples (copied into
a backup root with timestamped folders) plus a broken one.

- scan results equal per-bundle diagnose results (examples/expected.json);
- a broken bundle is one error row;
- a second scan reuses unchanged bundles and re-diagnoses a changed one;
- --shard shares cover every bundle exactly once;
- a query reproduces diagnosis.json's numbers; writing or escaping queries are refused;
- records round-trips a log's history rows;
- index.html renders in headless Chromium with its plot."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CORPUS, EXAMPLES, cli
from test_html import BROWSER, FLAGS
from twdiag import history, scan

pytestmark = pytest.mark.slow  # diagnoses whole bundles: outside the fast subset
EXPECTED = json.loads((EXAMPLES / "expected.json").read_text())
FOLDERS = {"bundle-healthy": "20261122_101500", "bundle-unhealthy": "20261123_101500",
           "bundle-weak-tokenizer": "20261124_101500"}


@pytest.fixture(scope="module")
def backups(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backups")
    for name, folder in FOLDERS.items():
        shutil.copytree(EXAMPLES / name, root / folder, ignore=shutil.ignore_patterns("docs"))
    broken = root / "20261125_000000"
    (broken / "wandb" / "offline-run-20261125_000000-zzzz").mkdir(parents=True)
    (broken / "wandb" / "offline-run-20261125_000000-zzzz" / "run-zzzz.wandb").write_bytes(b"junk")
    return root


@pytest.fixture(scope="module")
def scanned(backups, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scan") / "out"
    code, doc, err = cli("scan", str(backups), "--out", str(out), "--workers", "2")
    assert code == 0, (doc, err)
    return out, doc


def _q(target, sql) -> list[dict]:
    code, doc, err = cli("query", str(target), sql)
    assert code == 0, (doc, err)
    return doc["rows"]


def test_scan_equals_diagnose_per_bundle_and_a_broken_bundle_is_one_row(backups, scanned):
    out, doc = scanned
    assert doc["bundles_found"] == 4 and len(doc["diagnosed"]) == 4
    rows = _q(out, "SELECT bundle, overall, error FROM bundles ORDER BY bundle")
    assert len(rows) == 4
    assert rows[-1]["overall"] is None and "images could be read" in rows[-1]["error"]
    for name, folder in FOLDERS.items():
        want = EXPECTED[name]
        got = _q(out, f"SELECT stage, verdict, fallback_step FROM stages WHERE bundle LIKE '%{folder}'")
        assert {r["stage"]: r["verdict"] for r in got} == want["stages"], name
        assert {r["stage"]: r["fallback_step"] for r in got} == want["fallback"], name
        assert (out / "bundles" / scan.bundle_id(backups / folder) / "diagnosis.html").is_file()


def test_a_second_scan_reuses_and_rediagnoses_only_a_changed_bundle(backups, scanned, tmp_path):
    out, _ = scanned
    code, doc, _ = cli("scan", str(backups), "--out", str(out))
    assert code == 0 and len(doc["reused"]) == 4 and doc["diagnosed"] == []
    # change one bundle's contents (same size and name; times untouched would not matter either)
    changed = backups / FOLDERS["bundle-healthy"]
    png = sorted(changed.glob("results/*/dynamics/visualizations/*.png"))[-1]
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF
    png.write_bytes(bytes(data))
    code, doc, _ = cli("scan", str(backups), "--out", str(out))
    assert [d["bundle"] for d in doc["diagnosed"]] == [str(changed)] and len(doc["reused"]) == 3


def test_shards_cover_every_bundle_exactly_once(tmp_path):
    root = tmp_path / "root"  # one real bundle and five broken ones: quick to diagnose, same sharding
    shutil.copytree(EXAMPLES / "bundle-weak-tokenizer", root / "20261124_101500", ignore=shutil.ignore_patterns("docs"))
    for k in range(5):
        log = root / f"2026112{5 + k}_000000" / "wandb" / "offline-run-x-zz" / "run-zz.wandb"
        log.parent.mkdir(parents=True)
        log.write_bytes(b"junk")
    out = tmp_path / "sharded"
    seen = []
    for i in range(3):
        code, doc, _ = cli("scan", str(root), "--out", str(out), "--shard", f"{i}/3", "--workers", "1")
        assert code == 0
        seen += [d["bundle"] for d in doc["diagnosed"]]
    assert sorted(seen) == sorted(str(p) for p in scan.find_bundles([root], 1000)) and len(seen) == 6
    assert len(_q(out, "SELECT bundle FROM bundles")) == 6  # the shards' partitions read as one dataset


def test_a_query_reproduces_the_diagnosis_numbers(unhealthy):
    bundle = EXAMPLES / "bundle-unhealthy"
    full = unhealthy["full"]
    dyn = full["stages"]["dynamics"]
    rows = _q(bundle, "SELECT loss_final, fallback_step, verdict FROM stages WHERE stage='dynamics'")
    assert rows == [{"loss_final": dyn["numbers"]["loss_final"], "fallback_step": dyn["fallback"]["step"],
                     "verdict": "critical"}]
    peak = _q(bundle, "SELECT max(\"train/loss\") AS peak, arg_max(step, \"train/loss\") AS at FROM history "
                      "WHERE stage='dynamics'")[0]
    assert peak["peak"] == pytest.approx(dyn["stats"]["metrics"]["loss"]["max"])
    table = {r["step"]: r for r in dyn["checkpoints"]["table"]}
    for r in _q(bundle, "SELECT step, status, loss FROM checkpoints WHERE stage='dynamics'"):
        assert r["status"] == table[r["step"]]["status"] and r["loss"] == table[r["step"]]["loss"]


@pytest.mark.parametrize("sql", ["COPY (SELECT 1) TO '/tmp/twdiag-escape.csv'", "ATTACH '/tmp/x.db'",
                                 "SELECT * FROM read_csv('/etc/passwd')", "SELECT 1; SELECT 2",
                                 "CREATE TABLE t AS SELECT 1", "INSTALL httpfs"])
def test_writing_or_escaping_queries_are_refused(sql):
    code, doc, _ = cli("query", str(EXAMPLES / "bundle-healthy"), sql)
    assert code == 2 and doc["error"]
    assert not Path("/tmp/twdiag-escape.csv").exists()


def test_records_round_trip_a_logs_history_rows(tmp_path):
    logs = sorted(CORPUS.glob("*.wandb"))[:40] if CORPUS.is_dir() else []
    logs = [f for f in logs if f.stat().st_size < 2_000_000][:3] or sorted(EXAMPLES.glob("*/wandb/*/*.wandb"))[:2]
    for log in logs:
        r = subprocess.run(["python", str(Path(__file__).parent.parent / "scripts" / "dump_records.py"), str(log),
                            "--type", "history", "--limit", "100000"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert lines[-1]["type"] == "scan_report"
        rows = lines[:-1]
        decoded = history.decode(log)
        assert len(rows) == len(decoded.history) + (decoded.dropped.get("bad_step_rows") or {}).get("count", 0)
        if rows and "_step" in decoded.history.columns:
            assert [int(x["step"]) for x in rows[:50]] == [int(s) for s in decoded.history["_step"][:50]]
        offsets = [x["offset"] for x in rows]
        assert offsets == sorted(offsets)


def test_index_html_renders_with_its_plot(scanned, tmp_path):
    out, _ = scanned
    page = (out / "index.html").read_text()
    assert "http" not in re.sub(r"<!doctype[^>]*>", "", page, flags=re.I) and "<script" not in page
    assert page.count('class="chip"') >= 4 * 3 and "data:image/png;base64," in page
    if BROWSER is None:
        pytest.skip("no chromium here")
    shot = tmp_path / "index.png"
    subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1400",
                    f"--screenshot={shot}", (out / "index.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_a_query_answers_from_the_tables_diagnose_saved_until_the_bundle_changes(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(EXAMPLES / "bundle-unhealthy", b, ignore=shutil.ignore_patterns("docs"))
    code, _, _ = cli("diagnose", str(b))  # default out dir: b/docs/action, tables saved there
    assert code == 0 and (b / "docs" / "action" / "tables" / "history.parquet").is_file()
    code, doc, _ = cli("query", str(b), "SELECT count(*) AS n FROM history")
    assert doc["source"].startswith("the tables its last diagnose saved") and doc["rows"] == [{"n": 1402}]
    log = sorted(b.glob("wandb/*/*.wandb"))[-1]
    log.write_bytes(log.read_bytes()[:-100])  # the bundle changed: decode again
    code, doc, _ = cli("query", str(b), "SELECT count(*) AS n FROM history")
    assert doc["source"] == "bundle, diagnosed on the fly"


def test_records_of_a_file_that_is_not_a_log_is_exit_4(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"# not a log\n" * 10)
    r = subprocess.run(["python", str(Path(__file__).parent.parent / "scripts" / "dump_records.py"), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["type"] == "scan_report" and last["header_ok"] is False
