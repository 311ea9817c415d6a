"""readcache: a pickle that differs from a remembered one only inside
BINFLOATs gives exactly what reading it gives, and is read again whenever a
changed float's value could have gone anywhere but a dict value or a list
item. Every case compares against a fresh read of the same bytes."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twdiag import checkpoints, ptfile, readcache, rules, safe_pickle  # noqa: E402

pytestmark = pytest.mark.fast

T = rules.load_thresholds()


def _view(obj, fc) -> None:
    fc.facts["view"] = repr(safe_pickle.plain(obj))


readcache.PURE_DESCRIBERS.add(_view)


def _read(data: bytes, rest=("test",)) -> tuple[str, ptfile.FileCheck]:
    """What ptfile does with a pickle: recall it, or read it and remember."""
    fc = ptfile.FileCheck("x.pt")
    if readcache.recall(_view, rest, data, fc):
        return "recalled", fc
    up = safe_pickle.RestrictedUnpickler(data, safe_pickle.Budget())
    obj = safe_pickle.safe_load(up)
    fc.tensors = ptfile.tensor_records(obj, 10_000)
    fc.globals += up.report.all
    _view(obj, fc)
    readcache.remember(_view, rest, data, fc, (0, 0), up, obj, 10_000)
    return "read", fc


def _fresh(data: bytes) -> ptfile.FileCheck:
    obj = safe_pickle.safe_load(safe_pickle.RestrictedUnpickler(data, safe_pickle.Budget()))
    fc = ptfile.FileCheck("x.pt")
    _view(obj, fc)
    return fc


# Pickle opcodes, spelled out so a float can be shared through the memo.
def F(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


def S(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


PUT0, GET0, DICT0, MARK, SETITEMS, TUPLE1, TUPLE2, LIST0, APPEND = b"q\x00", b"h\x00", b"}", b"(", b"u", \
    b"\x85", b"\x86", b"]", b"a"
COMPLEX = b"cbuiltins\ncomplex\n"


def pickle_of(body) -> callable:
    return lambda x: b"\x80\x02" + DICT0 + MARK + body(x) + SETITEMS + b"."


CASES = {  # name -> (pickle of x, reusable when x changes)
    "dict value": (pickle_of(lambda x: S("lr") + F(x) + S("eps") + F(1e-8)), True),
    "list item, shared through the memo": (pickle_of(lambda x: S("a") + LIST0 + F(x) + PUT0 + APPEND
                                                      + S("b") + GET0), True),
    "dict key": (pickle_of(lambda x: S("a") + DICT0 + F(x) + S("k") + b"s"), False),
    "in a tuple": (pickle_of(lambda x: S("betas") + F(x) + F(0.999) + TUPLE2), False),
    "handed to a call, and a dict value": (pickle_of(lambda x: S("a") + F(x) + PUT0 + S("c") + COMPLEX
                                                     + GET0 + F(0.0) + TUPLE2 + b"R"), False),
    "a dict value and in a tuple": (pickle_of(lambda x: S("a") + F(x) + PUT0 + S("t") + GET0 + TUPLE1), False),
    # beside a replaceable float (the pickle has a template): the changed one is not
    "in a tuple, beside a learning rate": (pickle_of(lambda x: S("lr") + F(0.1) + S("betas") + F(x) + F(0.999)
                                                     + TUPLE2), False),
    "handed to a call, beside a learning rate": (pickle_of(lambda x: S("lr") + F(0.1) + S("c") + COMPLEX + F(x)
                                                           + F(0.0) + TUPLE2 + b"R"), False),
    "a dict key, beside a learning rate": (pickle_of(lambda x: S("lr") + F(0.1) + S("k") + DICT0 + F(x) + S("v")
                                                     + b"s"), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_changed_float_gives_what_reading_gives(name, monkeypatch):
    monkeypatch.setattr(readcache, "_KEPT", {})
    make, reusable = CASES[name]
    first = make(0.001)
    assert _read(first)[0] == "read"
    how, again = _read(first)
    assert how == "recalled" and again.facts == _fresh(first).facts
    changed = make(0.0005)
    assert len(changed) == len(first) and changed != first
    how, fc = _read(changed)
    assert how == ("recalled" if reusable else "read"), name
    assert fc.facts == _fresh(changed).facts != _fresh(first).facts
    # the kept object is the first read's again: the first bytes still give their own facts
    assert _read(first)[1].facts == _fresh(first).facts


def test_other_bytes_or_other_limits_are_read_again(monkeypatch):
    monkeypatch.setattr(readcache, "_KEPT", {})
    make = CASES["dict value"][0]
    assert _read(make(0.1))[0] == "read"
    other = make(0.1).replace(b"lr", b"LR")
    assert _read(other)[0] == "read" and _read(other)[1].facts == _fresh(other).facts
    assert _read(make(0.2), rest=("other limits",))[0] == "read"


def test_a_run_reads_each_stage_optimizer_once(tmp_path, monkeypatch):
    """Optimizer files saved by torch along a cosine schedule: the allowlist
    read runs for the first only, and every file's facts (its own learning
    rate), records and problems are those a read of its own gives."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    paths = []
    for step in range(4):
        model(torch.randn(3, 4)).sum().backward()
        opt.step(), sched.step()
        paths.append(tmp_path / f"step_{step}" / "optim_state_dict.pt")  # the name is part of the facts
        paths[-1].parent.mkdir()
        torch.save(opt.state_dict(), paths[-1])
    limits = ptfile.Limits.from_thresholds(T)
    describe = checkpoints._optim_describer(limits.budget.max_items)
    reads = []
    real = ptfile._unpickle
    monkeypatch.setattr(ptfile, "_unpickle", lambda data, *a: (reads.append(data), real(data, *a))[1])
    monkeypatch.setattr(readcache, "_KEPT", {})
    remembered = [ptfile.check_file(p, limits, False, describe) for p in paths]
    assert len(reads) == 1
    lrs = [fc.facts["learning_rates"][0] for fc in remembered]
    assert len(set(lrs)) == 4  # each file's own
    monkeypatch.setattr(readcache, "PURE_DESCRIBERS", set())
    for p, fc in zip(paths, remembered):
        fresh = ptfile.check_file(p, limits, False, describe)
        assert (fc.facts, fc.tensors, fc.globals, fc.storages_nbytes) == \
               (fresh.facts, fresh.tensors, fresh.globals, fresh.storages_nbytes)
        assert [(q.status, q.detail) for q in fc.problems] == [(q.status, q.detail) for q in fresh.problems]
    assert len(reads) == 5


def test_seeded_byte_flips_give_what_a_fresh_read_gives(monkeypatch):
    """A torch-saved optimizer pickle, remembered, then 300 variants with one
    byte changed (half inside a float's 8 bytes, half anywhere): whatever the
    cache does with each, the facts, records and globals, or the refusal,
    are those of a fresh read of the same bytes."""
    import io
    import pickletools
    import random
    import zipfile
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    with zipfile.ZipFile(buf) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    floats = [pos + 1 + i for op, _, pos in pickletools.genops(data) if op.name == "BINFLOAT" for i in range(8)]
    describe = checkpoints._optim_describer(10_000)

    def outcome(fc_or_exc):
        if isinstance(fc_or_exc, Exception):
            return type(fc_or_exc).__name__
        fc = fc_or_exc
        return repr((fc.facts, fc.tensors, fc.globals, [(p.status, p.detail) for p in fc.problems]))

    def read(blob, cached: bool):
        fc = ptfile.FileCheck("optim_state_dict.pt")
        try:
            if cached and readcache.recall(describe, ("t",), blob, fc):
                return fc, "recalled"
            up = safe_pickle.RestrictedUnpickler(blob, safe_pickle.Budget())
            obj = safe_pickle.safe_load(up)
            fc.tensors = ptfile.tensor_records(obj, 10_000)
            fc.globals += up.report.all
            describe(obj, fc)
            if cached:
                readcache.remember(describe, ("t",), blob, fc, (0, 0), up, obj, 10_000)
            return fc, "read"
        except Exception as exc:  # a refusal: compared by kind
            return exc, "refused"

    monkeypatch.setattr(readcache, "_KEPT", {})
    assert read(data, True)[1] == "read"
    rng = random.Random(31)
    kinds = set()
    for n in range(300):
        at = rng.choice(floats) if n % 2 else rng.randrange(len(data))
        blob = bytearray(data)
        blob[at] ^= rng.randrange(1, 256)
        blob = bytes(blob)
        got, how = read(blob, True)
        kinds.add(how)
        assert outcome(got) == outcome(read(blob, False)[0]), (n, at, how)
    assert kinds >= {"recalled", "read"}
