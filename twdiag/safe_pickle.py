"""Read a checkpoint's pickle without ever running it: an allowlist.

`torch.load(weights_only=True)` refuses TinyWorlds' `state.pt`, because its
config pickles `utils.config.*` classes, and TinyWorlds itself reloads
`state.pt` with `weights_only=False`: whatever a pickle names there runs on
resume. So a checkpoint is only called safe when every global its pickles
name is on an allowlist of what a TinyWorlds checkpoint legitimately holds.
`torch._weights_only_unpickler` is the reference for what counts as safe:

- torch's tensor and storage rebuild functions, storage and tensor classes,
  dtypes, `torch.Size`, `torch.device`;
- `collections.OrderedDict` / `Counter` and the builtin data types pickle
  itself spells as globals (`set`, `frozenset`, `complex`, `bytearray`,
  `_codecs.encode` for bytes);
- numpy's array and scalar reconstructors (inert here);
- in `state.pt` only, TinyWorlds' own config classes (`utils.config.*`) and
  the FSDP policy dataclasses their fields may hold, as inert stand-ins.
  The list lives in the thresholds file (`checkpoints.config_globals`) so a
  fork can add its own classes with `--thresholds`.

Any other global makes the file unsafe; the evidence names it. Names are
resolved the way `pickle` and torch resolve them (Python 2 aliases such as
`commands` -> `subprocess` applied first), so an alias cannot hide a global.
Nothing is ever imported: allowed globals come back as our own inert
functions and classes. Tensors become `TensorInfo` records read from the
pickle alone, so key sets and parameter counts need no tensor data.

Resources are bounded before anything is allocated: every constructor we
hand out checks its argument sizes against the budget, the pickle's size is
capped by the caller, and the C unpickler runs under an address-space limit
(RLIMIT_AS), so opcode tricks such as a memo index of 2**30 fail with a
clear reason instead of taking the machine's memory.
"""
from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import itertools
import math
import pickle
import reprlib
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field

# Element sizes of torch's typed storages, by class name (torch.FloatStorage...).
STORAGE_ITEMSIZE = {
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16, "UntypedStorage": 1, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1,
    "Float8_e5m2Storage": 1, "Float8_e4m3fnStorage": 1,
}
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
           "uint8", "bool", "complex64", "complex128", "double", "float", "half", "long", "int",
           "short", "cfloat", "cdouble", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
           "float8_e5m2", "float8_e4m3fn", "uint16", "uint32", "uint64",
           *(f"uint{i}" for i in range(1, 8)), *(f"int{i}" for i in range(1, 8)))
_TENSOR_CLASSES = ("FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor",
                   "IntTensor", "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor")
# torch's other tensor rebuilders: safe per torch, opaque to us (no shape facts).
_OPAQUE_REBUILDERS = ("_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_meta_tensor_no_storage",
                      "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
                      "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor")
_NUMPY = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
          "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray",
          "numpy.dtype")


class UnsafePickle(Exception):
    """The pickle names a global outside the allowlist."""


class BudgetExceeded(Exception):
    """The pickle asks for more memory or nodes than a checkpoint can need."""


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage referenced from data.pkl: archive entry `data/<key>`."""

    storage_type: str
    key: str
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE_ITEMSIZE.get(self.storage_type, 1)


@dataclass
class TensorInfo:
    """What the pickle says about a tensor: enough for counts and key sets,
    and for a numpy view of its storage (`tensors`)."""

    storage: StorageRef | None
    shape: tuple
    offset: int = 0
    stride: tuple | None = None     # None: contiguous (or not said)
    dtype_name: str | None = None   # v3 rebuilds name the dtype beside an untyped storage

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> str:
        if self.dtype_name:
            return self.dtype_name
        name = self.storage.storage_type if self.storage else "unknown"
        return name.replace("Storage", "").lower() or "unknown"

    @property
    def extent(self) -> int:
        return extent(self.shape, self.stride, self.offset)


# Cached: a genuine checkpoint holds ~1,000 tensors of a few dozen shapes,
# and both are asked for every tensor by the check and again by the scan.
@functools.lru_cache(maxsize=4096)
def contiguous(shape: tuple) -> tuple:
    """Row-major strides (in elements) of a shape."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


@functools.lru_cache(maxsize=4096)
def extent(shape: tuple, stride: tuple | None, offset: int) -> int:
    """Storage elements a tensor reaches: offset + its last index + 1 (0 when
    it has no elements). `stride` None means contiguous."""
    if not math.prod(shape):
        return 0
    stride = stride if stride is not None else contiguous(shape)
    return offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1


class Inert:
    """Base of every stand-in: holds the call's args and state, does nothing."""

    _qualname = "?"
    args: tuple = ()
    kwargs: dict = {}
    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):  # BUILD lands here instead of the real class
        self.state = state

    def __repr__(self) -> str:
        # reprlib bounds depth and width: args may be a shared-reference bomb
        inner = ", ".join(reprlib.repr(a) for a in self.args[:8])
        return f"{self._qualname}({inner})"


@functools.lru_cache(maxsize=None)
def _stand_in(qualname: str) -> type:
    # Cached: the classes hold no state (instances do), and building ~100 of
    # them per file was a third of a structural check's time.
    return type(qualname.rsplit(".", 1)[-1], (Inert,), {"_qualname": qualname})


# --- the allowlist ----------------------------------------------------------------

def resolve_name(module: str, name: str) -> str:
    """`module.name` as pickle and torch would import it (Python 2 aliases mapped)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


@dataclass
class Budget:
    """Per-file caps, from the thresholds file (checkpoints.budget)."""

    max_bytes: int = 64 << 20        # one bytes/bytearray value
    max_items: int = 1_000_000       # one list/dict/set built by a constructor call
    max_dims: int = 16               # dimensions of one tensor
    max_numel: int = 1 << 40         # elements of one tensor (a shape, not an allocation)
    max_memory: int = 512 << 20      # address space the unpickler may add
    max_objects: int = 2_000_000     # containers one pickle may build (each costs ~100+ bytes)

    @classmethod
    def from_thresholds(cls, t: dict) -> "Budget":
        b = t.get("budget", {})
        return cls(**{k: int(b[k]) for k in cls.__dataclass_fields__ if k in b})


class _Guards:
    """The callables allowed globals resolve to; each checks sizes first."""

    def __init__(self, budget: Budget):
        self.b = budget

    def _items(self, value, what: str):
        if value is None:
            return ()
        if not isinstance(value, (list, tuple, set, frozenset, dict)):
            raise pickle.UnpicklingError(f"{what} of a {type(value).__name__}")
        if len(value) > self.b.max_items:
            raise BudgetExceeded(f"{what} of {len(value):,} items (budget {self.b.max_items:,})")
        return value

    def set(self, items=()):
        return set(check_keys(self._items(items, "set")))

    def frozenset(self, items=()):
        return frozenset(check_keys(self._items(items, "frozenset")))

    def ordered_dict(self, items=()):
        items = self._items(items, "OrderedDict")
        if isinstance(items, dict):
            check_keys(items)
            return collections.OrderedDict(items)
        pairs = list(items)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise pickle.UnpicklingError("OrderedDict of something other than pairs")
        check_keys(p[0] for p in pairs)
        return collections.OrderedDict(pairs)

    def counter(self, items=()):
        items = self._items(items, "Counter")
        check_keys(items)
        return collections.Counter(items)

    def bytearray(self, source=b"", *rest):
        if isinstance(source, int):
            if not 0 <= source <= self.b.max_bytes:
                raise BudgetExceeded(f"bytearray({source:,}) (budget {self.b.max_bytes:,} bytes)")
            return bytearray(source)
        if isinstance(source, (bytes, bytearray, str)):
            if len(source) > self.b.max_bytes:
                raise BudgetExceeded(f"bytearray of {len(source):,} bytes")
            return bytearray(source, *rest) if isinstance(source, str) else bytearray(source)
        return bytearray(self._items(source, "bytearray"))

    def codecs_encode(self, obj, encoding="utf-8", errors="strict"):
        # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
        if not isinstance(obj, str) or len(obj) > self.b.max_bytes:
            raise pickle.UnpicklingError("_codecs.encode of a non-string or oversized value")
        return obj.encode(str(encoding), str(errors))

    def complex(self, real=0.0, imag=0.0):
        if not all(isinstance(x, (int, float)) for x in (real, imag)):
            raise pickle.UnpicklingError("complex() of a non-number")
        return complex(real, imag)

    def size(self, dims=()):
        return tuple(self.shape(dims))

    def shape(self, dims) -> tuple:
        if not isinstance(dims, (tuple, list)) or len(dims) > self.b.max_dims or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise pickle.UnpicklingError(f"tensor shape {reprlib.repr(dims)} is not a tuple of "
                                         "non-negative ints")
        if math.prod(dims) > self.b.max_numel:
            raise BudgetExceeded(f"tensor shape {tuple(dims)} has more than {self.b.max_numel:,} elements")
        return tuple(dims)

    def rebuild_tensor(self, storage, offset=0, size=(), stride=(), *rest, dtype_name=None):
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise pickle.UnpicklingError(f"tensor storage offset {reprlib.repr(offset)}")
        shape = self.shape(size)
        strides = None
        if stride not in ((), None) or not shape:
            strides = tuple(stride) if isinstance(stride, (tuple, list)) else None
            if strides is None or len(strides) != len(shape) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in strides):
                raise pickle.UnpicklingError(f"tensor stride {reprlib.repr(stride)} does not fit shape {shape}")
        return TensorInfo(storage if isinstance(storage, StorageRef) else None, shape, offset, strides, dtype_name)

    def rebuild_tensor_v3(self, storage, offset=0, size=(), stride=(), requires_grad=False,
                          hooks=None, dtype=None, *rest):
        name = getattr(dtype, "_qualname", "")
        return self.rebuild_tensor(storage, offset, size, stride,
                                   dtype_name=name.removeprefix("torch.") if name.startswith("torch.") else None)

    @staticmethod
    def rebuild_parameter(data, *rest):
        return data

    @staticmethod
    def rebuild_from_type(func, new_type, args, state=None):
        # torch._tensor._rebuild_from_type_v2(func, type, args, state): the
        # tensor is func(*args); func is itself an allowed (inert) rebuilder.
        return func(*args) if callable(func) and isinstance(args, tuple) else None


def _allowlist(guards: _Guards, config_globals: tuple[str, ...]) -> tuple[dict, dict]:
    """(globals allowed in every torch file, extra ones allowed in state.pt)."""
    allowed: dict = {
        "collections.OrderedDict": guards.ordered_dict,
        "collections.Counter": guards.counter,
        "builtins.set": guards.set,
        "builtins.frozenset": guards.frozenset,
        "builtins.bytearray": guards.bytearray,
        "builtins.complex": guards.complex,
        "_codecs.encode": guards.codecs_encode,
        "torch.Size": guards.size,
        "torch._utils._rebuild_tensor": guards.rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": guards.rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": guards.rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": guards.rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": guards.rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": guards.rebuild_from_type,
    }
    for name in ("torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
                 "torch.serialization._get_layout", "torch.storage.TypedStorage",
                 *(f"torch.{t}" for t in _TENSOR_CLASSES), *(f"torch.cuda.{t}" for t in _TENSOR_CLASSES),
                 *(f"torch.{d}" for d in _DTYPES),
                 *(f"torch.{q}" for q in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                                          "per_channel_symmetric", "per_channel_affine_float_qparams")),
                 *(f"torch._utils.{f}" for f in _OPAQUE_REBUILDERS), *_NUMPY):
        allowed[name] = _stand_in(name)
    for storage in STORAGE_ITEMSIZE:  # the storage type travels as its name
        allowed[f"torch.{storage}"] = storage
        allowed[f"torch.cuda.{storage}"] = storage
    allowed["torch.storage.UntypedStorage"] = "UntypedStorage"
    state_only = {name: _stand_in(name) for name in config_globals}
    return allowed, state_only


# --- the unpickler ------------------------------------------------------------------

@dataclass
class GlobalsReport:
    """Every global a pickle names (as resolved), and the refused ones."""

    all: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


# Keys whose hash an attacker cannot choose freely. Python hashes an int by
# its value modulo 2**61 - 1, so 150k multiples of it collide in one bucket and
# building the dict is quadratic (hours). str and bytes hashes are salted per
# process; small ints, floats (at most ~1000 share a hash), None and bools
# cannot be made to collide in bulk. Tuples are checked element by element.
_SAFE_INT = 1 << 60


def _key_ok(key, depth: int = 0) -> bool:
    if isinstance(key, (str, bytes, float, type(None), Inert)):
        return True
    if isinstance(key, int):
        return -_SAFE_INT < key < _SAFE_INT
    if isinstance(key, (tuple, frozenset)) and depth < 4 and len(key) <= 64:
        return all(_key_ok(k, depth + 1) for k in key)
    return False


def check_keys(keys):
    """`keys` unchanged, after refusing any key whose hash could be driven to
    collide (raises BudgetExceeded before anything is hashed)."""
    for k in keys:
        if not _key_ok(k):
            raise BudgetExceeded(f"a {type(k).__name__} key {reprlib.repr(k)} outside the range whose "
                                 "hashes cannot be made to collide (dict/set building would go quadratic)")
    return keys


class RestrictedUnpickler(pickle._Unpickler):
    """Resolves only allowlisted globals, to our own inert objects.

    Python's own (pure-Python) unpickler, not the C one: it keeps its memo in
    a dict (a memo index of 2**30 costs nothing), and its opcode table can be
    wrapped, so every container it builds is counted against the budget and
    every dict or set key is checked before it is hashed. TinyWorlds'
    pickles are tens of KB: this costs about a millisecond a file."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, budget: Budget, config_globals: tuple[str, ...] = (),
                 allow_config: bool = False):
        # bytes, or a binary stream positioned at a pickle (legacy files hold several)
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        super().__init__(stream)
        self._stream, self._start = stream, stream.tell()
        self.report = GlobalsReport()
        self.guards = _Guards(budget)
        self.objects = 0
        self.max_objects = budget.max_objects
        # For `readcache`: each BINFLOAT's (offset of its 8 bytes, value), and
        # the ids of floats handed to a call (whose result may derive from
        # them); None once either cannot be known (a framed read, too many).
        self.floats: list | None = []
        self.consumed: set = set()
        self._walk_left = FLOAT_WALK_NODES
        allowed, state_only = _allowlist(self.guards, tuple(config_globals))
        self.allowed = {**allowed, **state_only} if allow_config else allowed

    def load(self):
        """The stdlib's loop, reading the stream straight. Its own reads go
        through an `_Unframer`, a Python call each (a fifth of the time), only
        to honour protocol 4's FRAME hints, which torch.save's protocol-2
        pickles never hold: a FRAME starts the read over the stdlib's way, so
        frames keep every check it makes."""
        self.read, self.readline = self._file_read, self._file_readline
        self.readinto = self._stream.readinto
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value
        except _Framed:
            self._stream.seek(self._start)
            self.memo, self.objects, self.floats = {}, 0, None
            return super().load()

    def _count(self) -> None:
        self.objects += 1
        if self.objects > self.max_objects:
            raise BudgetExceeded(f"more than {self.max_objects:,} containers in one pickle")

    def find_class(self, module: str, name: str):
        raw = f"{module}.{name}"
        label = resolve_name(module, name)
        shown = label if label == raw else f"{raw} (resolves to {label})"
        if shown not in self.report.all:
            self.report.all.append(shown)
        if label not in self.allowed:
            self.report.refused.append(shown)
            raise UnsafePickle(shown)
        return self.allowed[label]

    def persistent_load(self, pid):
        # torch's zip format: ('storage', storage_type, key, location, numel);
        # the legacy format adds a sixth item, view metadata (None for TinyWorlds' tensors)
        if (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], str) and isinstance(pid[2], str) and isinstance(pid[3], str)
                and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0):
            return StorageRef(pid[1], pid[2], pid[3], pid[4])
        raise pickle.UnpicklingError(f"persistent id {reprlib.repr(pid)} is not a torch storage reference")


class _Framed(Exception):
    """A FRAME opcode met by the straight read (RestrictedUnpickler.load)."""


def _frame(self) -> None:
    if self.read is self._file_read:  # the straight read: start over with the stdlib's framed one
        raise _Framed
    pickle._Unpickler.load_frame(self)


RestrictedUnpickler.dispatch[pickle.FRAME[0]] = _frame


def _counted(opcode: bytes):
    base = pickle._Unpickler.dispatch[opcode[0]]

    def op(self):
        self.objects += 1  # _count, inline: a call fewer for every container built
        if self.objects > self.max_objects:
            self._count()
        base(self)
    RestrictedUnpickler.dispatch[opcode[0]] = op


for _op in (pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.EMPTY_SET, pickle.EMPTY_TUPLE, pickle.DICT,
            pickle.LIST, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET):
    _counted(_op)


def _keys_checked(opcode: bytes, keys_of):
    """Check the keys an opcode is about to hash (`keys_of(self)` peeks at
    them on the stack), then run it."""
    base = RestrictedUnpickler.dispatch[opcode[0]]

    def op(self):
        check_keys(keys_of(self))
        base(self)
    RestrictedUnpickler.dispatch[opcode[0]] = op


_keys_checked(pickle.SETITEM, lambda self: self.stack[-2:-1])
_keys_checked(pickle.SETITEMS, lambda self: self.stack[0::2])
_keys_checked(pickle.DICT, lambda self: self.stack[0::2])
_keys_checked(pickle.ADDITEMS, lambda self: self.stack)
_keys_checked(pickle.FROZENSET, lambda self: self.stack)


def _build_keys(self) -> list:
    """BUILD sets an object's attributes from a dict (or a (dict, slots) pair)."""
    state = self.stack[-1] if self.stack else None
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    return [k for part in parts if isinstance(part, dict) for k in part]


_keys_checked(pickle.BUILD, _build_keys)


def _memo_put(self, index: int) -> None:
    """A memo index far past anything the pickle can hold is harmless here (our
    memo is a dict) but makes the C unpickler torch.load uses zero-fill
    index x 8 bytes: refuse it."""
    if not 0 <= index <= self.guards.b.max_objects:
        raise BudgetExceeded(f"memo index {index:,}: the C unpickler torch.load uses would allocate "
                             f"{index * 8 / (1 << 30):.1f} GiB for it")
    self.memo[index] = self.stack[-1]


_UINT32 = struct.Struct("<I")


def _long_binput(self) -> None:
    """LONG_BINPUT with _memo_put's check inline (torch's pickles hold
    thousands: a call fewer each)."""
    index = _UINT32.unpack(self.read(4))[0]
    if index > self.max_objects:
        _memo_put(self, index)  # raises
    self.memo[index] = self.stack[-1]


RestrictedUnpickler.dispatch[pickle.LONG_BINPUT[0]] = _long_binput
RestrictedUnpickler.dispatch[pickle.PUT[0]] = lambda self: _memo_put(self, int(self.readline()[:-1]))


# --- floats, for reusing a read (readcache) -------------------------------------------
# A genuine run's optimizer pickles differ from checkpoint to checkpoint only
# in the learning rate's 8 bytes. `readcache` reuses a read for such a pickle
# when it can tell where each float went: so the reader records where every
# BINFLOAT's bytes lie, and which floats were handed to a call (a guard or a
# BUILD may derive a value from them, which a substitution would miss).
FLOAT_WALK_NODES = 50_000  # objects looked at for floats handed to calls, per pickle (then: no reuse)
MAX_FLOATS = 1024          # BINFLOATs recorded per pickle (then: no reuse); an optimizer has a few per group
_DOUBLE = struct.Struct(">d")


def _binfloat(self) -> None:
    at = self._stream.tell() - self._start
    value = _DOUBLE.unpack(self.read(8))[0]
    if self.floats is not None:
        if self.read is self._file_read and len(self.floats) < MAX_FLOATS:
            self.floats.append((at, value))
        else:
            self.floats = None
    self.append(value)


RestrictedUnpickler.dispatch[pickle.BINFLOAT[0]] = _binfloat


def _mark_consumed(self, objs) -> None:
    """Every recorded float reachable from a call's arguments is consumed."""
    stack, seen = list(objs), set()
    while stack:
        x = stack.pop()
        self._walk_left -= 1
        if self._walk_left < 0:
            self.floats = None
            return
        if type(x) is float:
            self.consumed.add(id(x))
        elif isinstance(x, (tuple, list, set, frozenset, dict, Inert)) and id(x) not in seen:
            seen.add(id(x))
            if isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, Inert):
                stack.extend((x.args, x.kwargs, x.state))
            else:
                stack.extend(x)


def _consuming(opcode: bytes, args_of):
    """Mark the floats an opcode hands to a call (`args_of(self)` peeks at
    them on the stack), then run it. Free until the pickle's first float."""
    base = RestrictedUnpickler.dispatch[opcode[0]]

    def op(self):
        if self.floats:
            _mark_consumed(self, args_of(self))
        base(self)
    RestrictedUnpickler.dispatch[opcode[0]] = op


_consuming(pickle.REDUCE, lambda self: self.stack[-1:])
_consuming(pickle.BUILD, lambda self: self.stack[-1:])
_consuming(pickle.NEWOBJ, lambda self: self.stack[-1:])
_consuming(pickle.NEWOBJ_EX, lambda self: self.stack[-2:])
_consuming(pickle.OBJ, lambda self: self.stack)
_consuming(pickle.INST, lambda self: self.stack)


@contextmanager
def _memory_limit(extra: int):
    """Cap the process's address space at its current size + `extra` while
    the C unpickler runs (it trusts memo indexes: LONG_BINPUT 2**30 would
    zero-fill 8 GiB). Does nothing where RLIMIT_AS is unavailable."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[0]) * resource.getpagesize()
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    limit = current + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def safe_load(up: RestrictedUnpickler):
    """Unpickle inertly. Raises UnsafePickle at the first refused global,
    before anything could call it; BudgetExceeded when the pickle asks for
    too much; UnpicklingError for malformed data."""
    try:
        with _memory_limit(up.guards.b.max_memory):
            return up.load()
    except (UnsafePickle, BudgetExceeded):
        raise
    except MemoryError as exc:
        raise BudgetExceeded(f"unpickling needs more than {up.guards.b.max_memory >> 20} MiB") from exc
    except RecursionError as exc:
        raise pickle.UnpicklingError("pickle nests too deeply") from exc
    except Exception as exc:
        raise pickle.UnpicklingError(f"{type(exc).__name__}: {exc}"[:300]) from exc


def plain(obj, depth: int = 0, limit: int = 200, budget: list | None = None):
    """JSON-friendly view of an unpickled object (stand-ins shown by name).

    Bounded in depth, width and total nodes (`budget`), because a pickle can
    share one wide list under many parents."""
    budget = [10_000] if budget is None else budget
    budget[0] -= 1
    if depth > 6 or budget[0] < 0:
        return "…"
    if isinstance(obj, dict):
        items = itertools.islice(obj.items(), limit)
        return {str(k)[:200]: plain(v, depth + 1, limit, budget) for k, v in items}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1, limit, budget) for v in itertools.islice(obj, limit)]
    if isinstance(obj, TensorInfo):
        return f"tensor{list(obj.shape)}"
    if isinstance(obj, Inert):
        if not obj.state:
            return repr(obj)[:200]
        return {"class": obj._qualname, "state": plain(obj.state, depth + 1, limit, budget)}
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, str):
        return obj[:1000]
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return repr(obj)[:200]
