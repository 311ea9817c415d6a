"""What reading a pickle through the allowlist gave, remembered for the next
file that holds the same pickle, or the same but for some floats.

The allowlist read (pure Python) is most of a structural check, and a
stage's checkpoints repeat their pickles. Every model file holds the same
pickle byte for byte (the same keys, shapes and storage names), and a
genuine run's optimizer pickles differ from checkpoint to checkpoint only
in the 8 bytes of the learning rate (the shared sample; a 240-parameter run,
whose optimizer pickle takes 9-13 ms to read). So:

- **the same bytes**: the outcome is copied (facts, tensor records, globals,
  problems, config);
- **the same bytes but inside some BINFLOATs** (`Template`): the opcodes are
  the same, so are every global, every budget check and every tensor
  record. The object read the first time is kept; this file's floats are
  put where that read put its own, `describe` runs on it, and the first
  values go back. The facts are this file's own. A float qualifies only
  if every place it has is a dict value or a list item: one that is a dict
  key, in a tuple or a set, or was handed to a call (whose result may
  derive from its value) must match byte for byte, else the file is read.

Only for a `describe` that depends on the object alone (`PURE_DESCRIBERS`),
and keyed by everything else the outcome depends on (`rest`). Memory stays
bounded: `ENTRIES` pickles per describer, objects kept only for pickles of
at most `KEEP_OBJECT_BYTES`.
"""
from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from typing import Callable

from . import safe_pickle

PURE_DESCRIBERS: set = set()
ENTRIES = 4  # distinct pickles remembered per describer (a stage has one model and one optimizer pickle)
# A kept object costs about ten times its pickle (a 54 KB optimizer pickle of
# 240 parameters: about 0.5 MB): 4 entries of 256 KB stay near 10 MB.
KEEP_OBJECT_BYTES = 256 << 10
_DOUBLE = struct.Struct(">d")
_ZERO8 = bytes(8)

_KEPT: dict = {}  # describer -> [(rest, _Outcome)], oldest first


@dataclass
class Template:
    """A kept read and where its replaceable floats are."""

    masked: bytes    # the pickle with every BINFLOAT's 8 bytes zeroed
    slots: tuple     # where those 8 bytes lie
    places: dict     # offset -> [(container, key, the float read there)], replaceable floats only
    obj: object

    def changed(self, data: bytes, first: bytes) -> list | None:
        """The offsets whose floats differ from the first read's, when every
        other byte is the same and those floats are all replaceable."""
        m = bytearray(data)
        for at in self.slots:
            m[at:at + 8] = _ZERO8
        if m != self.masked:
            return None
        changed = [at for at in self.slots if data[at:at + 8] != first[at:at + 8]]
        return changed if all(at in self.places for at in changed) else None


@dataclass
class _Outcome:
    data: bytes
    tensors: list
    facts: dict
    globals: list
    problems: list
    config: dict | None
    template: Template | None


def recall(describe: Callable | None, rest: tuple | None, data: bytes, fc) -> bool:
    """Fill `fc` from a remembered read of these bytes (or these but for
    replaceable floats); False when there is none."""
    if rest is None:
        return False
    for r, o in _KEPT.get(describe, ()):
        if r != rest or len(o.data) != len(data):
            continue
        if o.data == data:
            _copy(o, fc)
            return True
        changed = o.template.changed(data, o.data) if o.template is not None else None
        if changed is not None:
            _describe_as(o, data, changed, describe, fc)
            return True
    return False


def remember(describe: Callable | None, rest: tuple | None, data: bytes, fc, seen: tuple[int, int],
             reader: safe_pickle.RestrictedUnpickler, obj, max_nodes: int) -> None:
    """Keep what reading `data` gave `fc` (its problems and globals from
    `seen` on), and the object when its floats may be replaced later."""
    if rest is None:
        return
    kept = _KEPT.setdefault(describe, [])  # per describer: optimizer pickles never push out the model's
    if len(kept) >= ENTRIES:
        kept.pop(0)
    template = _template(data, reader, obj, max_nodes) if len(data) <= KEEP_OBJECT_BYTES else None
    kept.append((rest, _Outcome(data, list(fc.tensors), copy.deepcopy(fc.facts), fc.globals[seen[1]:],
                                [copy.copy(p) for p in fc.problems[seen[0]:]], copy.deepcopy(fc.config),
                                template)))


def _copy(o: _Outcome, fc) -> None:
    fc.tensors = list(o.tensors)
    fc.facts.update(copy.deepcopy(o.facts))
    fc.globals += [g for g in o.globals if g not in fc.globals]
    fc.problems += [copy.copy(p) for p in o.problems]
    fc.config = copy.deepcopy(o.config)


def _describe_as(o: _Outcome, data: bytes, changed: list, describe: Callable, fc) -> None:
    """What reading `data` gives: the same records and globals (the same
    opcodes), and `describe` of the kept object holding this file's floats."""
    fc.tensors = list(o.tensors)
    fc.globals += [g for g in o.globals if g not in fc.globals]
    places = [(c, k, first) for at in changed for c, k, first in o.template.places[at]]
    values = {at: _DOUBLE.unpack_from(data, at)[0] for at in changed}
    try:
        for at in changed:
            for c, k, _ in o.template.places[at]:
                c[k] = values[at]
        describe(o.template.obj, fc)
    finally:
        for c, k, first in places:
            c[k] = first


def _template(data: bytes, reader: safe_pickle.RestrictedUnpickler, obj, max_nodes: int) -> Template | None:
    if not reader.floats:  # none, or not known
        return None
    ids = {id(v): at for at, v in reader.floats}
    found = _places(obj, ids, max_nodes)
    if found is None:
        return None
    places, fixed = found
    fixed |= reader.consumed
    keep = {}
    for at, v in reader.floats:
        if id(v) not in fixed and places.get(id(v)):
            keep[at] = places[id(v)]
    if not keep:
        return None
    masked = bytearray(data)
    for at, _ in reader.floats:
        masked[at:at + 8] = _ZERO8
    return Template(bytes(masked), tuple(at for at, _ in reader.floats), keep, obj)


def _places(obj, ids: dict, max_nodes: int) -> tuple[dict, set] | None:
    """For each recorded float (by id): its places as a dict value or list
    item, and the ids of those found anywhere else (a key, in a tuple or a
    set, a stand-in's arguments). None past `max_nodes` objects."""
    places: dict = {}
    fixed: set = set()
    stack, seen, n = [obj], set(), 0
    while stack:
        x = stack.pop()
        n += 1
        if n > max_nodes:
            return None
        if not isinstance(x, (dict, list, tuple, set, frozenset, safe_pickle.Inert)) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            for k, v in x.items():
                _visit(k, None, None, ids, places, fixed, stack)
                _visit(v, x, k, ids, places, fixed, stack)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                _visit(v, x, i, ids, places, fixed, stack)
        elif isinstance(x, safe_pickle.Inert):
            stack.extend((x.args, x.kwargs, x.state))
        else:
            for v in x:
                _visit(v, None, None, ids, places, fixed, stack)
    return places, fixed


def _visit(v, container, key, ids: dict, places: dict, fixed: set, stack: list) -> None:
    if type(v) is not float:
        stack.append(v)
    elif id(v) in ids:
        if container is None:
            fixed.add(id(v))
        else:
            places.setdefault(id(v), []).append((container, key, v))
