"""A seeded, bounded fuzz over real artifacts: a few hundred mutations of a
real .wandb file and of a real torch.save checkpoint. Each must give exactly
one JSON document, no exception, and leave the mutated input unchanged."""
import hashlib
import shutil

import numpy as np
import pytest

from conftest import cli

# not in the fast subset: the seeded fuzz runs in the full suite (CI)
N_LOG, N_CKPT = 100, 100  # 200 mutations: the suite stays under 3 minutes


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(6)
    at = int(rng.integers(0, max(1, len(b))))
    if kind == 0:  # flip a few bytes
        for i in rng.integers(0, len(b), int(rng.integers(1, 16))):
            b[int(i)] ^= int(rng.integers(1, 256))
    elif kind == 1:  # cut
        b = b[:at]
    elif kind == 2:  # zero a range
        b[at:at + int(rng.integers(1, 40000))] = bytes(len(b[at:at + int(rng.integers(1, 40000))]))
    elif kind == 3:  # insert garbage
        b[at:at] = rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes()
    elif kind == 4:  # repeat a chunk
        b[at:at] = b[at:at + int(rng.integers(1, 5000))]
    else:  # overwrite with random bytes
        n = int(rng.integers(1, 2000))
        b[at:at + n] = rng.integers(0, 256, len(b[at:at + n]), dtype=np.uint8).tobytes()
    return bytes(b)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fuzzed_wandb_logs(tmp_path, runs):
    rng = np.random.default_rng(20261201)
    src = runs["healthy"].read_bytes()
    for i in range(N_LOG):
        case = tmp_path / f"c{i}" / "wandb" / "offline-run-20261128_070000-fuzz0001"
        case.mkdir(parents=True)
        f = case / "run-fuzz0001.wandb"
        f.write_bytes(_mutate(src, rng))
        before = _digest(f)
        code, doc, err = cli("stats", f)
        assert code in (0, 3, 4), (i, doc)
        assert doc["exit_code"] == code and "internal error" not in doc.get("error", ""), (i, doc)
        assert _digest(f) == before
        shutil.rmtree(tmp_path / f"c{i}")


def test_fuzzed_checkpoints(tmp_path):
    pytest.importorskip("torch")
    from twdiag import synth
    rng = np.random.default_rng(7)
    good = synth.write_checkpoint(tmp_path / "src" / "dynamics", "dynamics", 100)
    names = ("model_state_dict.pt", "optim_state_dict.pt", "state.pt")
    originals = {n: (good / n).read_bytes() for n in names}
    for i in range(N_CKPT):
        root = tmp_path / f"c{i}"
        d = root / "results" / synth.TS / "dynamics" / "checkpoints" / "dynamics_step_100"
        shutil.copytree(good, d)
        name = names[i % 3]
        (d / name).write_bytes(_mutate(originals[name], rng))
        before = _digest(d / name)
        code, doc, err = cli("ckpts", root, "--deep", "all")
        assert code == 0, (i, name, doc)
        st = doc["stages"]["dynamics"]
        assert st["total"] == 1 and "internal error" not in doc.get("error", "")
        if st["latest"]["status"] != "valid":
            assert st["fallback"]["step"] is None
        assert _digest(d / name) == before
        shutil.rmtree(root)
