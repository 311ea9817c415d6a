"""Does a checkpoint hold its stage's TinyWorlds model, as its own config
describes it? Checked from key names and shapes alone (no code runs), against
`architectures.yaml`: the keys each stage's classes register and their shapes
as expressions of the config (written down as data from upstream's source).

TinyWorlds loads with strict=False, so a checkpoint of another shape
silently leaves the stage at random weights; and a state dict that is not a
TinyWorlds model at all (a 4-tensor toy network in every stage) passes every
structural check. A mismatch makes the checkpoint `inconsistent`: it is never
the fallback.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
from pathlib import Path

from .rules import read_yaml


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Pow: operator.pow}


@functools.lru_cache(maxsize=1)
def spec() -> dict:
    with open(Path(__file__).with_name("architectures.yaml"), encoding="utf-8") as fh:
        return read_yaml(fh)["stages"]


def _fields(config: dict) -> dict:
    out = {k: v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}
    n = out.get("n_actions")
    if n and n > 0 and n & (n - 1) == 0:
        out["action_bits"] = int(math.log2(n))
    if out.get("num_bins") and out.get("latent_dim") is not None:
        out["codes"] = out["num_bins"] ** out["latent_dim"]
    return out


def _eval(expr, fields: dict):
    """An int from a shape expression (names, ints, + - * // **), or None
    when a name is unknown."""
    if expr is None or isinstance(expr, int):
        return expr

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in fields:
                raise KeyError(node.id)
            return fields[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expr!r}")
    try:
        return ev(ast.parse(str(expr), mode="eval"))
    except KeyError:
        return None


def check(stage: str, shapes: dict, config: dict) -> list[str]:
    """What is wrong with a stage's state dict for its config ([] when it fits)."""
    stage_spec = spec().get(stage)
    if not stage_spec or not shapes:
        return []
    fields = _fields(config or {})
    blocks = fields.get("num_blocks")
    if blocks is None:
        found = {k[len(stage_spec["blocks"]) + 1:].split(".", 1)[0] for k in shapes
                 if k.startswith(stage_spec["blocks"] + ".")}
        blocks = len([b for b in found if b.isdigit()])
    problems, missing = [], []
    for pattern, want in stage_spec["keys"].items():
        for key in ([pattern.replace("{i}", str(i)) for i in range(max(blocks, 1))] if "{i}" in pattern else [pattern]):
            got = shapes.get(key)
            if got is None:
                missing.append(key)
                continue
            expect = [_eval(d, fields) for d in want]
            if len(got) != len(expect) or any(e is not None and e != g for e, g in zip(expect, got)):
                problems.append(f"{key} is {list(got)}, its config implies {['?' if e is None else e for e in expect]}")
    if missing:
        problems.insert(0, f"{len(missing)} key(s) a TinyWorlds {stage} model registers are missing "
                           f"(e.g. {', '.join(missing[:3])})")
    if blocks and config and isinstance(config.get("num_blocks"), int):
        extra = sorted({k.split(".")[len(stage_spec["blocks"].split("."))] for k in shapes
                        if k.startswith(stage_spec["blocks"] + ".")} - {str(i) for i in range(blocks)})
        if extra:
            problems.append(f"blocks {extra[:5]} beyond num_blocks = {blocks}")
    return problems
