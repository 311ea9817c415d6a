"""Read a checkpoint's pickle without ever running it.

`torch.load(weights_only=True)` refuses TinyWorlds' `state.pt` because its
config pickles `utils.config.*` classes. This module reads such pickles with
an Unpickler whose `find_class` never imports anything outside a tiny
allowlist of plain data types: every other global becomes an inert stand-in
class that only records the arguments it was called with. Tensors become
`TensorInfo` records (dtype, shape, storage key) read from the pickle alone,
so key sets and parameter counts are known without loading tensor data.

Every global the pickle names passes through `find_class`, which records it
and raises `UnsafePickle` for known code-execution entry points: the GLOBAL
opcode is resolved before any REDUCE could call it, so refusing there means
nothing ran. (The C unpickler does this; a pure-Python opcode walk with
`pickletools` was 5x slower for the same answer.)
"""
from __future__ import annotations

import collections
import io
import pickle
import reprlib
from dataclasses import dataclass, field

# Modules whose globals can run code, touch files or the network when called.
# A pickle naming any of them is `unsafe_pickle`, never read further.
UNSAFE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "importlib",
    "shutil", "socket", "pathlib", "io", "_io", "runpy", "pty", "ctypes", "pickle",
    "_pickle", "marshal", "code", "codeop", "webbrowser", "multiprocessing",
    "tempfile", "glob", "urllib", "http", "requests", "asyncio", "signal",
    "threading", "_thread", "types", "functools", "operator", "inspect",
    "platform", "pdb", "timeit", "bdb", "cProfile", "profile", "trace",
    "zipimport", "pkgutil", "imp", "shelve", "dbm", "sqlite3", "smtplib",
    "ftplib", "telnetlib", "xmlrpc", "logging", "atexit", "gc", "ssl",
})
UNSAFE_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr",
    "delattr", "globals", "locals", "vars", "input", "breakpoint", "exit", "quit",
    "help", "memoryview", "super", "type", "classmethod", "staticmethod", "property",
    "__build_class__", "print",
})
# Plain data constructors that are safe to call with pickled arguments.
_SAFE_BUILTINS = {t.__name__: t for t in (set, frozenset, slice, complex, range,
                                          bytearray, bytes, int, float, str, list,
                                          dict, tuple, bool)}
_SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict}
# numpy arrays and scalars (e.g. RNG state) are data; they stay inert stand-ins.
_NUMPY_DATA = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})

# Element sizes of torch's typed storages, by class name (torch.FloatStorage...).
STORAGE_ITEMSIZE = {
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}


class UnsafePickle(Exception):
    """The pickle names globals that could execute code."""


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
    """What the pickle says about a tensor: enough for counts and key sets."""

    storage: StorageRef | None
    shape: tuple
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def dtype(self) -> str:
        name = self.storage.storage_type if self.storage else "unknown"
        return name.replace("Storage", "").lower() or "unknown"


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


def _stand_in(module: str, name: str) -> type:
    return type(name.split(".")[-1], (Inert,), {"_qualname": f"{module}.{name}"})


def _rebuild_tensor(storage, offset=0, size=(), stride=(), *rest) -> TensorInfo:
    return TensorInfo(storage if isinstance(storage, StorageRef) else None,
                      tuple(size), int(offset or 0))


def _rebuild_parameter(data, *rest):
    return data


_TORCH_REBUILDERS = {
    "_rebuild_tensor_v2": _rebuild_tensor, "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


@dataclass
class GlobalsReport:
    """Every global a pickle names, sorted into kinds."""

    all: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # not torch/collections/builtins data


def classify_global(module: str, name: str) -> str:
    """torch | data | unsafe | foreign."""
    root = module.split(".")[0]
    if root == "builtins" or root == "__builtin__":
        return "unsafe" if name in UNSAFE_BUILTINS or name not in _SAFE_BUILTINS else "data"
    if root in UNSAFE_MODULES:
        return "unsafe"
    if root == "torch":
        return "torch"
    if (module, name) in _SAFE_GLOBALS or (module, name) == ("_codecs", "encode"):
        return "data"
    if (module, name) in _NUMPY_DATA:
        return "numpy"
    if "." in name or name.startswith("_"):
        return "unsafe"  # attribute paths such as Path.write_text, or private helpers
    return "foreign"


def _record(rep: GlobalsReport, module: str, name: str) -> None:
    label = f"{module}.{name}"
    if label in rep.all:
        return
    rep.all.append(label)
    kind = classify_global(module, name)
    if kind == "unsafe":
        rep.unsafe.append(label)
    elif kind == "foreign":
        rep.foreign.append(label)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only plain data types; everything else becomes an inert class."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.report = GlobalsReport()

    def find_class(self, module: str, name: str):
        _record(self.report, module, name)
        kind = classify_global(module, name)
        if kind == "unsafe":
            raise UnsafePickle(f"{module}.{name}")
        if kind == "data":
            if (module, name) == ("_codecs", "encode"):
                return _codecs_encode
            return _SAFE_GLOBALS.get((module, name)) or _SAFE_BUILTINS[name]
        if kind == "torch":
            if name in _TORCH_REBUILDERS:
                return _TORCH_REBUILDERS[name]
            if name.endswith("Storage"):
                return name  # the storage type travels as its name
            if name == "Size":
                return tuple
        return _stand_in(module, name)

    def persistent_load(self, pid):
        # torch's zip format: ('storage', storage_type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            stype = pid[1] if isinstance(pid[1], str) else getattr(pid[1], "__name__", "?")
            return StorageRef(stype, str(pid[2]), str(pid[3]), int(pid[4]))
        return Inert(pid)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    return str(obj).encode(encoding, errors)


def safe_load(data: bytes, up: RestrictedUnpickler | None = None):
    """Unpickle `data` inertly. Raises UnsafePickle at the first unsafe global,
    before anything could call it; UnpicklingError for malformed data. Pass
    your own `up` to read `up.report` (every global named) afterwards."""
    up = up or RestrictedUnpickler(data)
    try:
        obj = up.load()
    except UnsafePickle:
        raise
    except RecursionError as exc:
        raise pickle.UnpicklingError("pickle nests too deeply") from exc
    except Exception as exc:
        raise pickle.UnpicklingError(f"{type(exc).__name__}: {exc}") from exc
    return obj


def plain(obj, depth: int = 0, limit: int = 200, budget: list | None = None):
    """JSON-friendly view of an unpickled object (stand-ins shown by name).

    Bounded in depth, width and total nodes (`budget`), because a pickle can
    share one wide list under many parents."""
    budget = [10_000] if budget is None else budget
    budget[0] -= 1
    if depth > 6 or budget[0] < 0:
        return "…"
    if isinstance(obj, dict):
        items = list(obj.items())[:limit]
        return {str(k): plain(v, depth + 1, limit, budget) for k, v in items}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1, limit, budget) for v in list(obj)[:limit]]
    if isinstance(obj, TensorInfo):
        return f"tensor{list(obj.shape)}"
    if isinstance(obj, Inert):
        if not obj.state:
            return repr(obj)[:200]
        return {"class": obj._qualname, "state": plain(obj.state, depth + 1, limit, budget)}
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)[:200]
