"""Archives every reader reads alike, the numpy deep scan against torch's
loader, and the second attack round's memory and hash bombs.

Hostile files are built here at test time: a differential zip that Python's
zipfile and torch's reader (miniz) read differently, two zip64 end records,
a 2**40 entry count, a legacy-format payload; each must be refused without
torch, and torch's own reader (`torch._C.PyTorchFileReader`, what
torch.load uses) confirms the differential is real. Every accepted archive
of the examples and the sample must be read by torch as we read it."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, ROOT, SAMPLE

torch = pytest.importorskip("torch")

from twdiag import checkpoints, ptfile, rules, synth, tensors, ziparchive  # noqa: E402

T = rules.load_thresholds()
LIMITS = ptfile.Limits.from_thresholds(T)
pytestmark = pytest.mark.fast


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def _split(z: bytes) -> tuple[bytes, bytes, int]:
    """(entries, central directory, entry count) of a small zip without zip64."""
    sig, _, _, _, n, cd_size, cd_off, _ = struct.unpack("<4sHHHHIIH", z[-22:])
    assert sig == b"PK\x05\x06"
    return z[:cd_off], z[cd_off:cd_off + cd_size], n


def differential_zip(path: Path, marker: Path) -> Path:
    """Evil zip A, then the real entries as zip B, then an end record whose
    directory offset points at A by absolute offset: zipfile (which allows for
    prepended bytes) reads B, miniz reads A."""
    real = {"archive/data.pkl": pickle.dumps({"step": 5}, protocol=2), "archive/byteorder": b"little",
            "archive/version": b"3\n", "archive/data/0": b"\0" * 4096}
    b_entries, b_cd, _ = _split(_zip(real))
    evil = {"archive/data.pkl": pickle.dumps(_Evil(marker), protocol=2), "archive/byteorder": b"little",
            "archive/version": b"3\n"}
    a0, _, _ = _split(_zip({**evil, "archive/data/p": b""}))
    pad = len(b_entries) - len(a0)  # A's directory must sit at B's directory offset within B
    a_entries, a_cd, a_n = _split(_zip({**evil, "archive/data/p": b"\0" * pad}))
    assert len(a_entries) == len(b_entries) and len(b_cd) >= len(a_cd)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, a_n, a_n, len(b_cd), len(a_entries), 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(a_entries + a_cd + b_entries + b_cd + eocd)
    return path


def _genuine(tmp: Path, name: str = "model_state_dict.pt") -> Path:
    p = tmp / name
    torch.save({"w": torch.randn(8, 4), "b": torch.zeros(4)}, p)
    return p


def _records(data: bytes) -> tuple[int, int, int, int]:
    """(z64 record offset, z64 locator offset, end record offset, z64 record size) of a torch file."""
    eocd = len(data) - 22
    loc = eocd - 20
    _, _, z_off, _ = struct.unpack("<4sIQI", data[loc:loc + 20])
    return z_off, loc, eocd, 56


def test_differential_zip_is_refused_and_real(tmp_path):
    marker = tmp_path / "ran"
    path = differential_zip(tmp_path / "diff" / "state.pt", marker)
    # the differential is real: zipfile and torch's reader see different pickles
    with zipfile.ZipFile(path) as zf:
        python_sees = zf.read("archive/data.pkl")
    torch_sees = bytes(torch._C.PyTorchFileReader(str(path)).get_record("data.pkl"))
    assert python_sees != torch_sees and b"system" in torch_sees and b"system" not in python_sees
    fc = ptfile.check_file(path, LIMITS, allow_config=True)
    assert [p.status for p in fc.problems] == ["unsafe_pickle"]
    assert "readers would disagree" in fc.problems[0].detail
    assert not marker.exists()


def test_two_zip64_end_records_are_refused(tmp_path):
    data = _genuine(tmp_path).read_bytes()
    z_off, loc, eocd, n = _records(data)
    record = data[z_off:z_off + n]
    # a second zip64 record just before the locator: zipfile reads that one, miniz the one pointed to
    forged = data[:loc] + record + data[loc:]
    path = tmp_path / "z64" / "model_state_dict.pt"
    path.parent.mkdir()
    path.write_bytes(forged)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    assert fc.problems and fc.problems[0].status == "unsafe_pickle"
    assert "locator" in fc.problems[0].detail


def test_a_2_to_the_40_entry_count_is_refused_and_torch_refuses_it_too(tmp_path):
    data = bytearray(_genuine(tmp_path).read_bytes())
    z_off, loc, eocd, n = _records(bytes(data))
    struct.pack_into("<QQ", data, z_off + 24, 1 << 40, 1 << 40)   # entries on this disk, in all
    struct.pack_into("<HH", data, eocd + 8, 0xFFFF, 0xFFFF)
    path = tmp_path / "count" / "model_state_dict.pt"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    assert fc.problems and fc.problems[0].status in ("corrupt", "unsafe_pickle")
    assert "1,099,511,627,776" in fc.problems[0].detail
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def test_legacy_format_payload_is_unsafe_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "legacy" / "state.pt"
    path.parent.mkdir()
    # what torch.load(weights_only=False) of a legacy file unpickles first
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2) + pickle.dumps(1001, protocol=2))
    fc = ptfile.check_file(path, LIMITS, allow_config=True)
    assert fc.format == "legacy"
    assert [p.status for p in fc.problems] == ["unsafe_pickle"]
    assert "posix.system" in fc.problems[0].detail or "os.system" in fc.problems[0].detail
    assert not marker.exists()
    # a clean legacy file is never valid either
    clean = tmp_path / "legacy" / "model_state_dict.pt"
    torch.save({"w": torch.ones(3)}, clean, _use_new_zipfile_serialization=False)
    fc = ptfile.check_file(clean, LIMITS, allow_config=False)
    assert fc.format == "legacy" and [p.status for p in fc.problems] == ["inconsistent"]


def _genuine_files() -> list[Path]:
    files = sorted(EXAMPLES.glob("*/results/*/*/checkpoints/*/*.pt"))
    if SAMPLE.is_dir():  # the shared sample, when present
        files += sorted(SAMPLE.glob("results/*/*/checkpoints/*/*.pt"))
    return files


def test_every_genuine_archive_is_read_by_torch_as_we_read_it():
    files = _genuine_files()
    assert len(files) >= 27
    for path in files:
        fc = ptfile.check_file(path, LIMITS, allow_config=path.name == "state.pt")
        if fc.problems and fc.problems[0].status in ("empty",):
            continue
        assert fc.format == "zip" and fc.layout, (path, fc.problems)
        reader = torch._C.PyTorchFileReader(str(path))
        assert set(reader.get_all_records()) == {n[len(fc.prefix):] for n in fc.layout}
        with open(path, "rb") as fh:
            e = fc.layout[fc.prefix + "data.pkl"]
            fh.seek(e.data_offset)
            assert bytes(reader.get_record("data.pkl")) == fh.read(e.size)


def test_numpy_scan_equals_torch_on_every_genuine_weight_file():
    checked = 0
    for path in _genuine_files():
        if path.name == "state.pt":
            continue
        fc = ptfile.check_file(path, LIMITS, allow_config=False)
        if fc.problems:
            continue
        ours, problem = ptfile.scan(path, fc, LIMITS, 1 << 20)
        theirs, their_problem = ptfile.load_and_scan(path, LIMITS.max_nodes, 1 << 20)
        assert (problem is None) == (their_problem is None)
        assert ours["non_finite_tensors"] == theirs["non_finite_tensors"]
        assert ours["float_elements"] == theirs["float_elements"]
        assert math.isclose(ours["weight_norm"], theirs["weight_norm"], rel_tol=1e-12)
        assert ours["max_abs_weight"] == theirs["max_abs_weight"]
        checked += 1
    assert checked >= 18


@pytest.fixture(params=["in runs", "alone"])
def measuring(request, monkeypatch):
    """Small float32 storages are measured in runs (tensors.measure_small),
    others one by one (tensors.read_chunks): tests of what a scan finds run
    on both paths."""
    if request.param == "alone":
        monkeypatch.setattr(tensors, "SMALL_ENTRY", -1)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_numpy_scan_flags_planted_nan_and_inf(tmp_path, dtype, measuring):
    w = torch.randn(64, 33).to(dtype)
    w[3, 7], w[10, 0] = float("nan"), float("inf")
    sd = {"a": w, "b": torch.randn(5).to(dtype), "t": w.t(), "i": torch.arange(6)}  # t: non-contiguous
    path = tmp_path / "model_state_dict.pt"
    torch.save(sd, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    assert not fc.problems
    facts, problem = ptfile.scan(path, fc, LIMITS, 100)  # small chunks: many per tensor
    assert problem is not None and problem.status == "non_finite"
    assert "a (2)" in problem.detail and "t (2)" in problem.detail
    theirs, _ = ptfile.load_and_scan(path, LIMITS.max_nodes, 100)
    assert facts["non_finite_tensors"] == theirs["non_finite_tensors"] == 2
    assert math.isclose(facts["weight_norm"], theirs["weight_norm"], rel_tol=1e-9)


def test_a_file_swapped_or_rewritten_since_its_check_is_not_scanned_as_checked(tmp_path, monkeypatch):
    """The scan reads the archive layout its structural check certified.
    The same file, unchanged, is scanned without reading its directory
    again; a file swapped in since (another inode) or rewritten (its change
    time moves) has its directory read again: another layout is refused,
    and the same layout with other bytes fails on a CRC."""
    path = tmp_path / "model_state_dict.pt"
    torch.save({"a": torch.randn(64, 33), "b": torch.randn(5)}, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    reads = []
    real = ziparchive.read_directory
    monkeypatch.setattr(ziparchive, "read_directory", lambda *a: reads.append(1) or real(*a))
    facts, problem = ptfile.scan(path, fc, LIMITS, 100)
    assert problem is None and facts["float_elements"] == 64 * 33 + 5 and reads == []

    other = tmp_path / "other.pt"  # swapped in: another layout
    torch.save({"a": torch.randn(64, 33), "c": torch.randn(7), "d": torch.randn(2)}, other)
    os.replace(other, path)
    facts, problem = ptfile.scan(path, fc, LIMITS, 100)
    assert problem is not None and "changed since its structural check" in problem.detail and reads == [1]

    torch.save({"a": torch.randn(64, 33), "b": torch.randn(5)}, path)  # same layout, other bytes
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    data = bytearray(path.read_bytes())
    at = fc.layout[f"{fc.prefix}data/0"].data_offset
    data[at] ^= 0xFF
    with open(path, "r+b") as fh:  # in place: the same inode
        fh.write(data)
    reads.clear()
    facts, problem = ptfile.scan(path, fc, LIMITS, 100)
    assert problem is not None and "bad CRC" in problem.detail and reads == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_optimizer_scan_without_norms_still_finds_every_non_finite(tmp_path, dtype, bad, measuring):
    """An optimizer file is scanned without norms (its max and min stand for
    the finiteness test): NaN, +Inf and -Inf are each counted as torch
    counts them, in a contiguous view, a strided one and a chunk boundary."""
    m = torch.rand(64, 33).to(dtype)
    m[10, 0] = bad
    v = torch.rand(200).to(dtype)
    v[100] = bad  # 100 elements a chunk: the first element of the second
    state = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": m, "exp_avg_sq": v, "t": m.t()}},
             "param_groups": [{"lr": 1e-3, "params": [0]}]}
    path = tmp_path / "optim_state_dict.pt"
    torch.save(state, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    facts, problem = ptfile.scan(path, fc, LIMITS, 100, norms=False)
    theirs, _ = ptfile.load_and_scan(path, LIMITS.max_nodes, 100)
    assert problem is not None and problem.status == "non_finite"
    assert facts["non_finite_tensors"] == theirs["non_finite_tensors"] == 3
    assert facts["float_elements"] == theirs["float_elements"]
    assert "weight_norm" not in facts and "max_abs_weight" not in facts
    clean = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.rand(64, 33).to(dtype)}},
             "param_groups": [{"lr": 1e-3, "params": [0]}]}
    torch.save(clean, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    facts, problem = ptfile.scan(path, fc, LIMITS, 100, norms=False)
    assert problem is None and facts["non_finite_tensors"] == 0


@pytest.mark.parametrize("where", ["sole", "before_offset", "after_view", "shared"])
def test_one_flipped_byte_in_any_storage_is_a_bad_crc(tmp_path, where, measuring):
    """Storages viewed by one contiguous tensor are CRC-checked while the
    tensor is measured (one pass); bytes of the storage outside the view,
    and storages shared by several views, must be checked all the same."""
    base = torch.randn(400)
    shared = torch.randn(20, 30)
    sd = {"sole": torch.randn(300), "tail": base[100:300],  # a view: bytes before and after it are stored too
          "shared": shared, "shared_t": shared.t()}
    path = tmp_path / "model_state_dict.pt"
    torch.save(sd, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    clean, problem = ptfile.scan(path, fc, LIMITS, 1 << 20)
    assert problem is None
    theirs, _ = ptfile.load_and_scan(path, LIMITS.max_nodes, 1 << 20)
    assert math.isclose(clean["weight_norm"], theirs["weight_norm"], rel_tol=1e-12)
    keys = {r.key: r.storage_key for r in fc.tensors}
    entry = {"sole": keys["sole"], "before_offset": keys["tail"], "after_view": keys["tail"],
             "shared": keys["shared"]}[where]
    e = fc.layout[f"{fc.prefix}data/{entry}"]
    at = {"sole": 4 * 150, "before_offset": 4 * 50, "after_view": 4 * 350, "shared": 4 * 333}[where]
    data = bytearray(path.read_bytes())
    data[e.data_offset + at] ^= 0x01  # a low mantissa bit: the value stays finite and plausible
    path.write_bytes(bytes(data))
    facts, problem = ptfile.scan(path, fc, LIMITS, 1 << 20)
    assert problem is not None and problem.status == "corrupt", (where, problem)
    assert "bad CRC" in problem.detail and f"data/{entry}" in problem.detail
    assert facts == {}  # measures of bytes that failed their CRC are not reported


@pytest.mark.parametrize("norms", [True, False])
def test_runs_of_small_tensors_measure_as_torch_and_name_a_bad_crc(tmp_path, norms):
    """Hundreds of small tensors, as in a genuine model, in runs that span
    several read blocks, with NaN/Inf planted in a few and large tensors
    between: the same counts, elements and norms as torch; then one flipped
    byte in a small entry mid-run names that entry."""
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 40_000, (300,), generator=gen).tolist()
    sd = {f"p{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    sd["big"] = torch.randn(300_000, generator=gen)  # past SMALL_ENTRY: measured alone
    sd["p10"][5], sd["p150"][0], sd["p299"][-1] = float("nan"), float("inf"), -float("inf")
    path = tmp_path / "model_state_dict.pt"
    torch.save(sd, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    assert sum(1 for e in fc.layout.values() if e.size <= tensors.SMALL_ENTRY) > 250
    facts, problem = ptfile.scan(path, fc, LIMITS, 1 << 20, norms=norms)
    theirs, _ = ptfile.load_and_scan(path, LIMITS.max_nodes, 1 << 20)
    assert problem is not None and problem.status == "non_finite"
    assert problem.detail.index("p10 (1)") < problem.detail.index("p150 (1)") < problem.detail.index("p299 (1)")
    assert facts["non_finite_tensors"] == theirs["non_finite_tensors"] == 3
    assert facts["float_elements"] == theirs["float_elements"] == sum(sizes) + 300_000
    if norms:
        assert math.isclose(facts["weight_norm"], theirs["weight_norm"], rel_tol=1e-12)
        assert facts["max_abs_weight"] == theirs["max_abs_weight"]
    e = fc.layout[f"{fc.prefix}data/{next(r.storage_key for r in fc.tensors if r.key == 'p200')}"]
    data = bytearray(path.read_bytes())
    data[e.data_offset + e.size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    facts, problem = ptfile.scan(path, fc, LIMITS, 1 << 20, norms=norms)
    assert problem is not None and problem.detail == f"bad CRC in entry {e.name!r}" and facts == {}


def test_deep_scan_needs_no_torch(tmp_path):
    """check_ckpts with torch (and ISA-L's CRC) hidden from the import
    system still gives the full deep scan, and diagnose never imports torch."""
    bundle = EXAMPLES / "bundle-unhealthy"
    code = f"""
import sys, json
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "isal"):
            raise ImportError("hidden")
sys.meta_path.insert(0, Hide())
sys.path.insert(0, {str(ROOT)!r})
from twdiag import cli
import contextlib, io
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    code = cli.main(["ckpts", {str(bundle)!r}, "--deep", "all"])
doc = json.loads(buf.getvalue())
from twdiag import checksum
print(json.dumps({{"code": code, "torch": doc["torch"], "deep": [s["deep_scanned"] for s in doc["stages"].values()],
                   "loaded": "torch" in sys.modules, "crc": checksum.IMPLEMENTATION}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"] == 0 and out["torch"] is None and not out["loaded"] and out["crc"] == "zlib"
    assert out["deep"] and all(steps for steps in out["deep"]), out
    r = subprocess.run([sys.executable, "-c", f"""
import sys, contextlib, io
sys.path.insert(0, {str(ROOT)!r})
from twdiag import cli
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(["diagnose", {str(bundle)!r}, "--out-dir", {str(tmp_path / 'out')!r}])
print("torch" in sys.modules)
"""], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False", r.stderr[-2000:]


def test_isal_crc_is_zlib_crc():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    import zlib
    data = np.random.default_rng(0).bytes(3 << 20)
    for piece in (data[:0], data[:1], data[:4097], data):
        assert isal_zlib.crc32(piece) == zlib.crc32(piece)
        assert isal_zlib.crc32(piece, 12345) == zlib.crc32(piece, 12345)


def _pickle_zip(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


def test_memory_and_hash_bombs_stay_bounded(tmp_path):
    """Each file is refused or bounded, in one process under one RSS bound,
    across files (nothing read is kept), and quickly."""
    root = tmp_path / "bombs"
    files = {}
    # 40,000 param groups sharing one list of 40,000 ids: 1.6 billion ids if copied
    shared = list(range(40_000))
    opt = pickle.dumps({"state": {0: {}}, "param_groups": [{"params": shared, "lr": 0.1} for _ in range(40_000)]},
                       protocol=2)
    assert len(opt) < 2 << 20
    files["groups"] = _pickle_zip(root / "ck_step_1" / "optim_state_dict.pt", opt)
    # retained inflation: several files of ~1.2M empty sets each
    for i in range(2):
        files[f"sets{i}"] = _pickle_zip(root / f"sets_step_{i}" / "state.pt",
                                        b"\x80\x04](" + b"\x8f" * 1_100_000 + b"e.")
    # a tuple of 3 million references to one object
    files["dups"] = _pickle_zip(root / "dups_step_1" / "state.pt",
                                b"\x80\x04}(X\x04\x00\x00\x00step" + b"K\x01" + b"X\x01\x00\x00\x00t(K\x07"
                                + b"2" * 3_000_000 + b"tu.")
    # 150k int keys that all hash to 0: multiples of 2**61 - 1
    big = (1 << 61) - 1
    keys = b"".join(b"\x8a\x0b" + (big * k).to_bytes(11, "little", signed=True) + b"N" for k in range(1, 150_001))
    files["collide"] = _pickle_zip(root / "col_step_1" / "state.pt", b"\x80\x02}(" + keys + b"u.")
    code = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from twdiag import checkpoints, ptfile, rules
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
limits = ptfile.Limits.from_thresholds(rules.load_thresholds())
out = {{}}
t0 = time.time()
for label, path in json.loads(sys.argv[1]).items():
    path = Path(path)
    ck = checkpoints.check_checkpoint("dynamics", 1, path.parent, limits)
    fc = ck.files[path.name]
    out[label] = [[p.status, p.detail] for p in fc.problems]
print(json.dumps({{"files": out, "rss_mb": peak_mb(),
                   "seconds": time.time() - t0}}))
"""
    r = subprocess.run([sys.executable, "-c", code, json.dumps({k: str(v) for k, v in files.items()})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["rss_mb"] < 1024, doc
    assert doc["seconds"] < 60, doc
    f = doc["files"]
    assert any("1,600,000,000" in d for _, d in f["groups"]), f["groups"]
    for i in range(2):
        assert f[f"sets{i}"][0][0] == "unsafe_pickle" and "containers" in f[f"sets{i}"][0][1]
    assert f["collide"][0][0] == "unsafe_pickle" and "collide" in f["collide"][0][1]
    # the duplicate flood is a legal pickle: bounded, and not a valid state.pt
    assert f["dups"] and all(s != "valid" for s, _ in f["dups"])


def test_the_scan_reads_alike_where_there_is_no_pread(tmp_path, monkeypatch):
    """macOS has no os.preadv: the storages are read by seek and readv there,
    with the same CRCs and measures, a flipped byte still a bad CRC."""
    path = tmp_path / "model_state_dict.pt"
    torch.save({"w": torch.randn(3000), "b": torch.randn(7).to(torch.bfloat16)}, path)
    fc = ptfile.check_file(path, LIMITS, allow_config=False)
    with_pread, problem = ptfile.scan(path, fc, LIMITS, 1000)
    assert problem is None
    monkeypatch.delattr(os, "preadv")
    without, problem = ptfile.scan(path, fc, LIMITS, 1000)
    assert problem is None and without == with_pread
    e = fc.layout[f"{fc.prefix}data/{fc.tensors[0].storage_key}"]
    data = bytearray(path.read_bytes())
    data[e.data_offset + 5000] ^= 0x01
    path.write_bytes(bytes(data))
    _, problem = ptfile.scan(path, fc, LIMITS, 1000)
    assert problem is not None and "bad CRC" in problem.detail


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_reads_alike_framed_or_not(protocol):
    """The allowlist reader reads the stream straight and starts over the
    stdlib's framed way at a FRAME (protocols 4 and 5): the same objects
    either way, and its budgets hold in both (a memo index bomb inside a
    frame is still refused)."""
    from twdiag import safe_pickle
    obj = {"a": [1, 2.5, "x" * 70_000, {"k": (1, 2)}], "s": {3, 4}, "t": (None, True, b"raw")}
    data = pickle.dumps(obj, protocol=protocol)
    assert (pickle.FRAME in data[:12]) == (protocol >= 4)
    up = safe_pickle.RestrictedUnpickler(data, LIMITS.budget)
    assert safe_pickle.safe_load(up) == obj
    assert up.objects > 0  # containers were counted
    framed = b"\x80\x04" + pickle.FRAME + struct.pack("<Q", 7) + b"]" + pickle.LONG_BINPUT + struct.pack("<I", 1 << 30) + b"."
    with pytest.raises(safe_pickle.BudgetExceeded, match="memo index"):
        safe_pickle.safe_load(safe_pickle.RestrictedUnpickler(framed, LIMITS.budget))
