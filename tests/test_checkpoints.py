"""Checkpoints on real torch.save output in TinyWorlds' layout: every damage
kind gets its status, the allowlist holds against an attack corpus built at
test time (nothing ever runs, nothing is ever valid, memory stays bounded),
and the fallback is health-aware."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, cli, run_read_only, tree_fingerprint

torch = pytest.importorskip("torch")

from twdiag import bundle, checkpoints, fallback, logs, ptfile, readcache, rules, synth  # noqa: E402

TS = synth.TS
T = rules.load_thresholds()
LIMITS = ptfile.Limits.from_thresholds(T)
pytestmark = pytest.mark.fast


class Evil:
    """A pickle payload that would create a file if anything ran it."""

    def __init__(self, marker: Path, how: str = "system"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "getoutput":  # pickled at protocol 2 as commands.getoutput
            return (subprocess.getoutput, (f"touch {self.marker}",))
        return (open, (str(self.marker), "w"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _entry_offset(path: Path, suffix: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
        with zf.open(info) as fh:
            fh.read(1)
        return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2


def torch_zip(path: Path, data_pkl: bytes, extra: dict | None = None, compress: int = zipfile.ZIP_STORED,
              duplicate: bytes | None = None, prefix: str = "archive") -> Path:
    """A zip in torch.save's layout around a hand-made pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl, compress_type=compress)
        zf.writestr(f"{prefix}/byteorder", "little")
        zf.writestr(f"{prefix}/version", "3\n")
        for name, blob in (extra or {}).items():
            zf.writestr(f"{prefix}/{name}", blob)
        if duplicate is not None:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zf.writestr(f"{prefix}/data.pkl", duplicate)
    return path


def _check(path: Path, allow_config: bool = True) -> ptfile.FileCheck:
    return ptfile.check_file(path, LIMITS, allow_config)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """One dynamics checkpoints dir, one anomaly per step."""
    root = tmp_path_factory.mktemp("ckzoo") / "bundle"
    run = root / "results" / TS
    for stage in ("video_tokenizer", "latent_actions"):
        for step in (0, 60, 120, 180):
            synth.write_checkpoint(run / stage, stage, step, seed=1)
    dyn = run / "dynamics"
    steps = {step: synth.write_checkpoint(dyn, "dynamics", step, seed=2) for step in range(0, 1100, 100)}
    torch.save({}, steps[100] / "model_state_dict.pt")      # multi-rank {} overwrite
    torch.save({}, steps[100] / "optim_state_dict.pt")
    m = steps[200] / "model_state_dict.pt"                     # disk full mid-save
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    _flip(steps[300] / "model_state_dict.pt", _entry_offset(steps[300] / "model_state_dict.pt", "data.pkl"))
    synth.write_checkpoint(dyn, "dynamics", 400, seed=2, nan=True)
    (steps[500] / "optim_state_dict.pt").unlink()
    marker = root.parent / "pwned"
    torch.save({"step": 600, "config": Evil(marker)}, steps[600] / "state.pt")
    torch.save({"w": Evil(marker, "open")}, steps[700] / "model_state_dict.pt", pickle_protocol=4)
    shutil.copy(steps[900] / "state.pt", steps[800] / "state.pt")  # saved step != folder step
    _flip(steps[900] / "model_state_dict.pt", _entry_offset(steps[900] / "model_state_dict.pt", "data/0"))
    (steps[1000] / "model_state_dict.pt").write_bytes(b"")   # zero bytes
    return {"root": root, "run": run, "dyn": dyn, "steps": steps, "marker": marker}


def _stage(path: Path) -> checkpoints.StageResult:
    b = bundle.discover([path])
    (stage, art), = [(s, a) for s, a in b.stages.items() if a.checkpoints]
    return checkpoints.check_stage(art, LIMITS)


def test_each_anomaly_gets_its_status_and_nothing_runs(zoo):
    res = _stage(zoo["dyn"] / "checkpoints")
    fb = fallback.decide(res, None, None, {}, T, deep="all")
    got = {c.step: c.status for c in res.checkpoints}
    assert got == {0: "valid", 100: "empty", 200: "truncated", 300: "corrupt", 400: "non_finite",
                   500: "missing_files", 600: "unsafe_pickle", 700: "unsafe_pickle",
                   800: "inconsistent", 900: "corrupt", 1000: "truncated"}
    assert not zoo["marker"].exists()
    by_step = {c.step: c for c in res.checkpoints}
    assert "system" in by_step[600].problems[0].detail and "allowlist" in by_step[600].problems[0].detail
    assert "saved step 900" in by_step[800].problems[0].detail
    assert "CRC" in " ".join(p.detail for p in by_step[900].problems)
    assert "encoder.layers.0.weight (1)" in by_step[400].problems[0].detail
    size = (zoo["steps"][100] / "model_state_dict.pt").stat().st_size
    assert f"0 items, {size} bytes" in by_step[100].problems[0].detail
    # only step 0 is intact, and step 0 is the initialisation: restart
    assert fb["step"] is None and fb["restart"] is True and "step 0" in fb["reason"]


def test_default_mode_deep_scans_only_what_decides(zoo):
    res = _stage(zoo["dyn"] / "checkpoints")
    fb = fallback.decide(res, None, None, {}, T, deep="auto")
    deep = {c.step: c.deep for c in res.checkpoints if c.deep != "no"}
    # 800 looked inconsistent (scanned); 900 is the newest valid-looking one and
    # fails its tensor CRC; 400 holds NaN; step 0 is the reference (weights only)
    assert deep == {0: "passed", 400: "failed", 800: "passed", 900: "failed"}
    assert {c.step: c.status for c in res.checkpoints}[400] == "non_finite"
    assert fb["step"] is None and fb["restart"] is True
    assert res.checkpoints[0].deep_files == ["model_state_dict.pt"]


def test_sample_checkpoints_stay_valid(sample_bundle):
    """The allowlist must not cry wolf on genuine TinyWorlds files."""
    b = bundle.discover([sample_bundle])
    for stage, art in b.stages.items():
        res = checkpoints.check_stage(art, LIMITS)
        assert [c.status for c in res.checkpoints] == ["valid"] * 4, stage
        state = res.checkpoints[-1].files["state.pt"]
        assert {"utils.config.DistributedConfig", "utils.config.DeviceType"} <= set(state.globals)
        fb = fallback.decide(res, None, None, {}, T)
        assert fb["step"] == 180 and fb["verified"]["level"] == "deep scan"
        assert fb["verified"]["deep_scanned"] == ["model_state_dict.pt", "optim_state_dict.pt"]


ATTACK_GLOBALS = [  # module, name: a route to code, files or the network, none on a blocklist
    ("commands", "getoutput"), ("__builtin__", "eval"), ("pydoc", "pipepager"), ("torch.hub", "load"),
    ("torch.serialization", "load"), ("numpy", "load"), ("pandas.io.pickle", "read_pickle"),
    ("builtins", "getattr"), ("timeit", "timeit"), ("torch._C", "_jit_pass_lower_all_tuples"),
    ("utils.config", "os"), ("torch", "load"), ("collections", "UserString"), ("copyreg", "_reconstructor"),
]


def _global_pickle(module: str, name: str, marker: Path) -> bytes:
    arg = f"touch {marker}".encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85R.")


@pytest.fixture(scope="session")
def attacks(tmp_path_factory, zoo) -> dict:
    """A hostile corpus, built with real pickles and zips."""
    root = tmp_path_factory.mktemp("attacks")
    marker = root / "PWNED"
    files = {}
    for module, name in ATTACK_GLOBALS:
        files[f"global {module}.{name}"] = torch_zip(root / f"g_{module}_{name}" / "state.pt",
                                                     _global_pickle(module, name, marker))
    files["protocol-2 alias of subprocess"] = root / "alias" / "state.pt"
    files["protocol-2 alias of subprocess"].parent.mkdir()
    torch.save({"config": Evil(marker, "getoutput"), "step": 0}, files["protocol-2 alias of subprocess"])
    files["bytearray(3<<30) in a model file"] = torch_zip(
        root / "bomb_bytes" / "model_state_dict.pt",
        b"\x80\x02c__builtin__\nbytearray\n\x8a\x05" + (3 << 30).to_bytes(5, "little", signed=True) + b"\x85R.")
    files["list(range(10**8))"] = torch_zip(
        root / "bomb_list" / "state.pt",
        b"\x80\x02c__builtin__\nlist\nc__builtin__\nxrange\nJ" + struct.pack("<i", 10 ** 8) + b"\x85R\x85R.")
    files["memo index 2**30"] = torch_zip(root / "memo" / "state.pt", b"\x80\x02]r" + struct.pack("<I", 1 << 30) + b".")
    big = list(range(200_000))
    opt = {"state": {0: {}}, "param_groups": [{"params": big, "lr": 0.1}] * 40_000}
    files["40k refs to one big param group"] = root / "refs" / "optim_state_dict.pt"
    files["40k refs to one big param group"].parent.mkdir()
    torch.save(opt, files["40k refs to one big param group"])
    files["duplicate data.pkl"] = torch_zip(root / "dup" / "state.pt", pickle.dumps({"step": 0}, protocol=2),
                                            duplicate=_global_pickle("os", "system", marker))
    files["deflate bomb"] = torch_zip(root / "deflate" / "state.pt", b"\x80\x02}." + b"\0" * (64 << 20),
                                      compress=zipfile.ZIP_DEFLATED)
    enc = torch_zip(root / "enc" / "state.pt", pickle.dumps({"step": 0}, protocol=2))
    raw = bytearray(enc.read_bytes())
    raw[6] |= 1  # the encrypted flag in the first local header
    cd = raw.rfind(b"PK\x01\x02", 0, len(raw))
    first_cd = raw.find(b"PK\x01\x02")
    raw[first_cd + 8] |= 1
    enc.write_bytes(bytes(raw))
    files["encrypted flag"] = enc
    files["unknown compression"] = torch_zip(root / "lzma" / "state.pt", pickle.dumps({"step": 0}, protocol=2),
                                             compress=zipfile.ZIP_LZMA)
    files["entry outside the layout"] = torch_zip(root / "extra" / "state.pt", pickle.dumps({"step": 0}, protocol=2),
                                                  extra={"../../evil.py": b"import os"})
    files["tensor shape 'ab'"] = torch_zip(
        root / "shape" / "model_state_dict.pt",
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(NK\x00U\x02ab)tRs.")
    del cd
    return {"root": root, "files": files, "marker": marker}


def test_attack_corpus_never_valid_never_runs_and_stays_small(attacks):
    """Checked in a fresh process so peak RSS is the check's own."""
    code = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from twdiag import ptfile, rules
limits = ptfile.Limits.from_thresholds(rules.load_thresholds())
out = {}
for label, path in json.loads(sys.argv[2]).items():
    fc = ptfile.check_file(Path(path), limits, Path(path).name == "state.pt")
    out[label] = [[p.status, p.detail] for p in fc.problems]
print(json.dumps({"files": out, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
    files = {k: str(v) for k, v in attacks["files"].items()}
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), json.dumps(files)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert not attacks["marker"].exists()
    assert doc["rss_mb"] < 1024, doc["rss_mb"]
    for label, problems in doc["files"].items():
        if label == "40k refs to one big param group":
            continue  # a legal pickle: it must just be bounded (and it is not a valid checkpoint alone)
        assert problems, f"{label} was not flagged"
        assert problems[0][0] in ("unsafe_pickle", "corrupt", "inconsistent"), (label, problems)
    for module, name in ATTACK_GLOBALS:
        detail = doc["files"][f"global {module}.{name}"][0]
        assert detail[0] == "unsafe_pickle" and f"{module}.{name}" in detail[1], detail
    alias = doc["files"]["protocol-2 alias of subprocess"][0]
    assert alias[0] == "unsafe_pickle" and "resolves to subprocess.getoutput" in alias[1]
    assert "budget" in doc["files"]["bytearray(3<<30) in a model file"][0][1]
    assert "budget" in doc["files"]["memo index 2**30"][0][1] or "MiB" in doc["files"]["memo index 2**30"][0][1]
    assert "duplicate" in doc["files"]["duplicate data.pkl"][0][1]
    assert "not inflated" in doc["files"]["deflate bomb"][0][1]
    assert "encrypted" in doc["files"]["encrypted flag"][0][1]
    assert "outside the torch.save layout" in doc["files"]["entry outside the layout"][0][1]
    assert "not a tuple of non-negative ints" in doc["files"]["tensor shape 'ab'"][0][1]


def test_a_malicious_state_pt_is_never_the_fallback(tmp_path):
    """A checkpoint whose state.pt reaches a command runner through an alias
    is unsafe_pickle (never valid, never the fallback), whatever the model
    and optimizer files look like; the deep scan does not certify state.pt."""
    d = tmp_path / "results" / TS / "dynamics"
    for step in (0, 100, 200):
        synth.write_checkpoint(d, "dynamics", step)
    newest = d / "checkpoints" / "dynamics_step_200" / "state.pt"
    torch.save({"config": Evil(tmp_path / "x", "getoutput"), "step": 200}, newest)
    code, doc, _ = cli("ckpts", tmp_path)
    st = doc["stages"]["dynamics"]
    assert code == 0 and st["fallback"]["step"] == 100
    assert st["latest"]["status"] == "unsafe_pickle" and not (tmp_path / "x").exists()
    assert "ckpt_unsafe_pickle" in {f["rule_id"] for f in st["findings"]} and st["verdict"] == "critical"
    assert st["fallback"]["verified"]["allowlist_checked"] == ["model_state_dict.pt", "optim_state_dict.pt",
                                                              "state.pt"]


@pytest.mark.parametrize("what", ["params 5", "params [[1]]", "mixed keys"])
def test_odd_but_legal_structures_are_reasons_not_crashes(tmp_path, what):
    d = synth.write_checkpoint(tmp_path / "results" / TS / "dynamics", "dynamics", 100)
    if what == "params 5":
        torch.save({"state": {0: {}}, "param_groups": [{"params": 5, "lr": 1.0}]}, d / "optim_state_dict.pt")
    elif what == "params [[1]]":
        torch.save({"state": {0: {}}, "param_groups": [{"params": [[1]], "lr": 1.0}]}, d / "optim_state_dict.pt")
    else:
        torch.save({"a": torch.zeros(2), 3: torch.zeros(2)}, d / "model_state_dict.pt")
    code, doc, _ = cli("ckpts", tmp_path)
    assert code == 0, doc
    assert doc["stages"]["dynamics"]["latest"]["status"] == "inconsistent"


def test_special_files_are_skipped_with_a_reason(tmp_path):
    cdir = tmp_path / "results" / TS / "dynamics" / "checkpoints"
    synth.write_checkpoint(cdir.parent, "dynamics", 100)
    os.symlink("/dev/zero", cdir / "dynamics_checkpoint_300.pt")
    os.symlink(tmp_path / "nowhere", cdir / "dynamics_checkpoint_400.pt")
    loop = cdir / "dynamics_checkpoint_500.pt"
    os.symlink(loop, loop)
    os.mkfifo(cdir / "dynamics_checkpoint_600.pt")
    code, doc, _ = cli("ckpts", tmp_path)
    reasons = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert code == 0 and doc["stages"]["dynamics"]["total"] == 1
    assert "character device" in reasons["dynamics_checkpoint_300.pt"]
    assert "dangling symlink" in reasons["dynamics_checkpoint_400.pt"]
    assert "symlink loop" in reasons["dynamics_checkpoint_500.pt"]
    assert "FIFO" in reasons["dynamics_checkpoint_600.pt"]


def _weights_story(root: Path, stage: str = "dynamics", blown_from: int | None = None) -> Path:
    d = root / "results" / TS / stage
    for step in range(0, 1000, 100):
        scale = 100.0 if blown_from is not None and step >= blown_from else 1.0 + step / 1000
        synth.write_checkpoint(d, stage, step, seed=3, scale=scale)
    return d


def test_weights_blown_up_is_evidence(tmp_path):
    _weights_story(tmp_path, blown_from=600)
    res = _stage(tmp_path / "results" / TS / "dynamics" / "checkpoints")
    fb = fallback.decide(res, None, None, {}, T)
    assert fb["step"] == 500 and fb["onset"] == {"step": 600, "rule_id": "weights_blowup"}
    assert fb["newest_intact"]["step"] == 900 and "x the earliest" in fb["newest_intact"]["why_not_fallback"]
    row = {r["step"]: r for r in fb["checkpoints"]}
    assert row[900]["weights_vs_earliest"] > 50 and row[500]["weights_vs_earliest"] < 2


def test_history_onset_moves_the_fallback_and_step0_is_never_one(tmp_path):
    _weights_story(tmp_path)
    res = _stage(tmp_path / "results" / TS / "dynamics" / "checkpoints")
    fb = fallback.decide(res, None, {"metrics": {"onsets": {"loss_blowup": 350}}}, {}, T)
    assert fb["step"] == 300 and fb["newest_intact"]["step"] == 900
    assert "after the onset of loss_blowup at step 350" in fb["newest_intact"]["why_not_fallback"]
    res = _stage(tmp_path / "results" / TS / "dynamics" / "checkpoints")
    fb = fallback.decide(res, None, {"metrics": {"onsets": {"action_collapse": 0}}}, {}, T)
    assert fb["step"] is None and fb["restart"] is True
    assert "step 0" in fb["reason"] and "untrained initialisation" in fb["reason"]


def test_bundle_unchanged_and_read_only_works(zoo, tmp_path):
    before = tree_fingerprint(zoo["root"])
    r = run_read_only(zoo["root"], [sys.executable, str(ROOT / "scripts" / "check_ckpts.py"), str(zoo["root"]),
                                    "--deep", "all", "--out-dir", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["stages"]
    assert tree_fingerprint(zoo["root"]) == before


def test_dynamics_dependencies_resolve_by_suffix_and_stay_inside(tmp_path):
    run = tmp_path / "bundle" / "results" / TS
    for stage in ("video_tokenizer", "latent_actions"):
        synth.write_checkpoint(run / stage, stage, 180)
    cfg = synth.stage_config("dynamics", video_tokenizer_path="/etc", latent_actions_path=(
        f"/old/host/results/{TS}/latent_actions/checkpoints/latent_actions_step_180"))
    synth.write_checkpoint(run / "dynamics", "dynamics", 100, config=cfg)
    code, doc, _ = cli("ckpts", tmp_path / "bundle")
    deps = {d["key"]: d for d in doc["dependencies"]}
    assert deps["latent_actions_path"]["status"] == "valid"
    assert deps["video_tokenizer_path"]["resolved"] is None
    assert "outside it and was not read" in deps["video_tokenizer_path"]["how"]


def test_a_damaged_upstream_file_makes_healthy_dynamics_watch_not_critical(tmp_path):
    run = tmp_path / "results" / TS
    synth.write_checkpoint(run / "video_tokenizer", "video_tokenizer", 180)
    lam = synth.write_checkpoint(run / "latent_actions", "latent_actions", 180)
    torch.save({}, lam / "model_state_dict.pt")
    for step in (0, 100, 200):
        synth.write_checkpoint(run / "dynamics", "dynamics", step, config=synth.stage_config(
            "dynamics", video_tokenizer_path=str(run / "video_tokenizer/checkpoints/video_tokenizer_step_180"),
            latent_actions_path=str(lam)))
    code, doc, _ = cli("ckpts", tmp_path)
    dyn = doc["stages"]["dynamics"]
    assert dyn["verdict"] == "watch" and dyn["fallback"]["step"] == 200
    f = next(f for f in dyn["findings"] if f["rule_id"] == "ckpt_dependency_invalid")
    assert f["severity"] == "watch" and "Restore" not in f["message"] and "restore" in f["message"]


EXAMPLES_MODELS = json.loads((EXAMPLES / "models.json").read_text())


@pytest.mark.parametrize("name", sorted(EXAMPLES_MODELS))
def test_examples_are_genuine_tinyworlds_output(name):
    """The example bundles are what upstream TinyWorlds' training scripts
    write: every state.pt pickles TinyWorlds' own utils.config classes, the
    inert reading of each model file counts the tensors and numbers that
    TinyWorlds' own loaders built from it (examples/models.json, recorded by
    make_examples.py), and each stage's W&B config holds the full argument set."""
    b = bundle.discover([EXAMPLES / name])
    assert set(b.stages) == set(bundle.STAGES)
    for stage, art in b.stages.items():
        res = checkpoints.check_stage(art, LIMITS)
        intact = [c for c in res.checkpoints if c.status == "valid"]
        assert intact and all(c.status in ("valid", "empty") for c in res.checkpoints), stage
        for c in intact:
            assert {"utils.config.DistributedConfig", "utils.config.DeviceType"} <= \
                set(c.files["state.pt"].globals), (stage, c.step)
        facts = EXAMPLES_MODELS[name][stage]
        ck = next(c for c in intact if c.path.name == facts["checkpoint"])
        assert ck.fact("model_state_dict.pt", "tensors") == facts["tensors"]
        assert ck.fact("model_state_dict.pt", "elements") == facts["elements"]
    hist = logs.load(b)
    common = {"n_updates", "learning_rate", "batch_size_per_gpu", "gradient_accumulation_steps",
              "log_interval", "patch_size", "embed_dim", "hidden_dim", "distributed"}
    own = {"video_tokenizer": {"latent_dim", "num_bins"}, "latent_actions": {"n_actions"},
           "dynamics": {"latent_dim", "num_bins", "n_actions", "video_tokenizer_path", "latent_actions_path"}}
    for stage, h in hist.items():  # each stage's own config dataclass, as wandb.init(config=...) logs it
        assert common | own[stage] <= set(h.config), stage
        assert int(h.frame["_step"].max()) == int(h.config["n_updates"]) - 1, stage


@pytest.mark.fast
def test_a_state_timestamp_is_never_silently_null():
    """TinyWorlds writes "%Y_%m_%d_%H_%M_%S"; a fork's epoch seconds become the
    same text (and still give a throughput); anything else says its type."""
    from twdiag.checkpoints import _parse_ts, _timestamp_text
    assert _timestamp_text("2026_12_01_22_22_45") == "2026_12_01_22_22_45"
    assert _timestamp_text(1764627765.0) == "2025_12_01_22_22_45"
    assert _parse_ts(_timestamp_text(1764627765.0)) == 1764627765.0
    assert _timestamp_text([1, 2]) == "<list>" and _timestamp_text(None) is None


def test_identical_pickles_are_read_once_with_the_same_facts(monkeypatch):
    """A stage's model files hold byte-identical pickles, and its optimizer
    files the same but for the learning rate: the allowlist read runs once
    for each, and every checkpoint gets the facts, tensor records, globals
    and problems a read of its own gives."""
    b = bundle.discover([EXAMPLES / "bundle-healthy"])
    reads = []
    real = ptfile._unpickle
    monkeypatch.setattr(ptfile, "_unpickle", lambda data, *a: (reads.append(data), real(data, *a))[1])
    monkeypatch.setattr(readcache, "_KEPT", {})
    remembered = checkpoints.check_all(b, T)
    model_reads = sum(1 for d in reads if b"optimizer" not in d and b"param_groups" not in d
                      and b"scheduler_state_dict" not in d)
    n_models = sum(len(r.checkpoints) for r in remembered.values())
    assert n_models >= 6 and model_reads == len(remembered)  # one read per stage, not per checkpoint
    # optimizer pickles differ only in the learning rate: read once per stage too (readcache.Template)
    assert sum(1 for d in reads if b"param_groups" in d) == len(remembered)
    monkeypatch.setattr(readcache, "PURE_DESCRIBERS", set())  # nothing remembered: every file read
    fresh = checkpoints.check_all(b, T)
    for stage, res in remembered.items():
        for a, c in zip(res.checkpoints, fresh[stage].checkpoints):
            for name, fc in a.files.items():
                other = c.files[name]
                assert (fc.facts, fc.tensors, fc.globals, fc.crc_checked, fc.config) == \
                       (other.facts, other.tensors, other.globals, other.crc_checked, other.config), (a.step, name)
                assert [(p.status, p.file, p.detail) for p in fc.problems] == \
                       [(p.status, p.file, p.detail) for p in other.problems]
                assert fc.facts is not other.facts



def test_a_file_check_sent_back_by_a_worker_is_the_same_file_check():
    """FileCheck pickles its zip entries and tensor records as plain tuples
    (what forked workers send back): a round trip, and a deep copy, give
    equal checks with the same types, and nothing is built per entry."""
    import copy
    import pickle
    from twdiag import tensors, ziparchive
    b = bundle.discover([EXAMPLES / "bundle-healthy"])
    stage, artifacts = next(iter(b.stages.items()))
    ck = checkpoints.check_one(stage, artifacts.checkpoints[-1].path, ptfile.Limits.from_thresholds(T))
    assert ck.files and all(fc.layout and fc.tensors is not None for fc in ck.files.values())
    data = pickle.dumps(ck)
    for other in (pickle.loads(data), copy.deepcopy(ck)):
        for name, fc in ck.files.items():
            again = other.files[name]
            assert vars(again) == vars(fc), name
            assert all(type(e) is ziparchive.Entry for e in again.layout.values())
            assert all(type(t) is tensors.TensorRecord for t in again.tensors)
    import pickletools
    for fc in ck.files.values():  # one object built on arrival, not one per entry and record
        built = [op.name for op, _, _ in pickletools.genops(pickle.dumps(fc)) if op.name in ("NEWOBJ", "REDUCE")]
        assert len(fc.layout) >= 6 and len(built) <= 1, (fc.name, len(built))
