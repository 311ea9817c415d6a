"""Tensor data read with numpy straight from a certified archive, no torch.

A torch.save archive stores each storage as one uncompressed entry of raw
little-endian elements (`byteorder` says so). The allowlist read of the
pickle (`safe_pickle`) already knows every tensor's storage key, dtype,
shape, stride and offset, and `ziparchive` knows where each storage's bytes
lie in the file. So a tensor is a numpy view of those bytes: read a block at
a time into one reused buffer (`read_chunks`, a storage viewed by one
contiguous tensor: what a state dict holds), or viewed in a memory map of
the file (shared or strided storages); memory stays flat whatever the file
size. bfloat16 has no numpy dtype: its 16 bits are the top half of a
float32, so a uint16 view shifted left by 16 is exact.

What is measured matches the torch-based scan (`ptfile.load_and_scan`, kept
as `--deep torch`): per floating tensor the count of NaN/Inf, and for a
weights file, over all float tensors, the L2 norm and max |w| of the finite
elements, in float64.
"""
from __future__ import annotations

import functools
import math
import mmap
import os
from typing import NamedTuple

import numpy as np

from . import safe_pickle
from .checksum import crc32

# storage class name (or v3 dtype name) -> (numpy dtype code, floating?)
_DTYPES = {
    "float": ("f4", True), "float32": ("f4", True), "double": ("f8", True), "float64": ("f8", True),
    "half": ("f2", True), "float16": ("f2", True), "bfloat16": ("u2", True),
    "long": ("i8", False), "int64": ("i8", False), "int": ("i4", False), "int32": ("i4", False),
    "short": ("i2", False), "int16": ("i2", False), "char": ("i1", False), "int8": ("i1", False),
    "byte": ("u1", False), "uint8": ("u1", False), "bool": ("u1", False),
    "cfloat": ("c8", True), "complex64": ("c8", True), "complexfloat": ("c8", True),
    "cdouble": ("c16", True), "complex128": ("c16", True), "complexdouble": ("c16", True),
}


class TensorRecord(NamedTuple):
    """One tensor as the pickle describes it (bounded summary kept after the read).
    A tuple of atoms: the garbage collector stops tracking it, and a stage's
    ~100,000 records (a genuine model's ~1,000 a checkpoint) made each full
    collection of the process that holds them cost ~0.1 s."""

    key: str
    storage_key: str
    dtype: str          # torch's name: float32, bfloat16, ...
    shape: tuple
    stride: tuple | None
    offset: int         # in elements
    storage_numel: int  # elements of the storage (bytes for an untyped storage)
    storage_type: str


class ScanError(Exception):
    pass


@functools.lru_cache(maxsize=256)  # asked for every tensor, of a handful of names
def numpy_dtype(dtype: str, big_endian: bool = False) -> tuple[np.dtype, bool, bool] | None:
    """(numpy dtype, floating, is_bfloat16) for a torch dtype name, or None."""
    name = dtype.lower().replace("torch.", "")
    if name not in _DTYPES:
        return None
    code, floating = _DTYPES[name]
    return np.dtype((">" if big_endian else "<") + code), floating, name == "bfloat16"


def as_float(chunk: np.ndarray, bf16: bool) -> np.ndarray:
    """A chunk as a float array numpy can test (bfloat16 widened exactly)."""
    if bf16:
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk


class CrcError(ScanError):
    pass


def crc_ok(mm: mmap.mmap, offset: int, size: int, crc: int, chunk: int = 1 << 22) -> bool:
    value = 0
    view = memoryview(mm)
    try:
        for i in range(offset, offset + size, chunk):
            value = crc32(view[i:min(i + chunk, offset + size)], value)
    finally:
        view.release()
    return value == crc


_SQ_BLOCK = 1 << 18  # elements cast to float64 at a time: stays in cache, and BLAS does the sum
# OpenBLAS hands a dot product of more than 10,000 elements to its thread
# pool, whose threads then spin-wait for more work: they take the second core
# from forked workers (a parallel deep scan, the drawer), which slowed a
# two-process scan eightfold. Pieces this long stay on the calling thread.
_DOT_PIECE = 8192
# numpy >= 2.0: the dot product of every row in one call, by the same kernel
# as np.dot (rows of _DOT_PIECE stay off the thread pool too).
_vecdot = getattr(np, "vecdot", None)


class Measure:
    """Running non-finite count, sum of squares and max |w| over float tensors.
    With `norms=False` only the non-finite count (an optimizer's moments and
    step counters: their norm is no weight norm, and the sum of squares is
    most of a scan's arithmetic): a chunk's max and min are finite exactly
    when all its elements are (max and min propagate NaN)."""

    def __init__(self, norms: bool = True):
        self.norms = norms
        self.sumsq, self.maxabs, self.elements = 0.0, 0.0, 0
        self.bad: list[tuple[str, int]] = []
        self._buf = np.empty(_SQ_BLOCK, dtype=np.float64)

    def _sumsq(self, c: np.ndarray) -> float:
        """Sum of squares in float64: block by block, each cast into one
        reused buffer, then dot products of `_DOT_PIECE` elements (one
        vecdot call over the block's rows where numpy has it), added in
        order, so the value is the same either way."""
        c = c.ravel()
        total = 0.0
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are counted by the caller
            for i in range(0, c.size, _SQ_BLOCK):
                part = c[i:i + _SQ_BLOCK]
                if part.dtype != np.float64:
                    buf = self._buf[:part.size]
                    buf[...] = part
                    part = buf
                whole = part.size - part.size % _DOT_PIECE if _vecdot is not None else 0
                if whole:
                    rows = part[:whole].reshape(-1, _DOT_PIECE)
                    for value in _vecdot(rows, rows).tolist():
                        total += value
                for j in range(whole, part.size, _DOT_PIECE):
                    piece = part[j:j + _DOT_PIECE]
                    total += float(np.dot(piece, piece))
        return total

    def add(self, key: str, chunks) -> None:
        nonfinite = 0
        for c in chunks:
            if np.iscomplexobj(c):
                c = np.abs(c)
            self.elements += int(c.size)
            if not c.size:
                continue
            # max and min first, while the chunk is still in cache from its
            # CRC (the float64 cast for the squares evicts it: twice as slow)
            hi, lo = float(c.max()), float(c.min())  # no abs() copy
            if not self.norms:
                if not (np.isfinite(hi) and np.isfinite(lo)):
                    nonfinite += int(c.size - np.count_nonzero(np.isfinite(c)))
                continue
            sq = self._sumsq(c)
            if not np.isfinite(sq):  # a NaN/Inf (or a float64 square past 1e308): count, measure the rest
                finite = np.isfinite(c)
                nonfinite += int(c.size - np.count_nonzero(finite))
                c = c[finite]
                if not c.size:
                    continue
                hi, lo = float(c.max()), float(c.min())
                sq = self._sumsq(c)
            # a finite sum of squares means every element is finite: no isfinite pass
            self.sumsq += sq
            self.maxabs = max(self.maxabs, hi, -lo)
        if nonfinite:
            self.bad.append((key, nonfinite))

    def add_together(self, keys: list, arr: np.ndarray, bounds: list) -> None:
        """Many tensors at once (`arr` holds them end to end, tensor i in
        `bounds[i]`): one max, min and sum of squares for all, and tensor by
        tensor only when they hold a NaN/Inf (to count them)."""
        hi, lo = float(arr.max()), float(arr.min())
        finite = np.isfinite(hi) and np.isfinite(lo)
        if finite and self.norms:
            sq = self._sumsq(arr)
            finite = np.isfinite(sq)
        if not finite:
            for key, (a, b) in zip(keys, bounds):
                self.add(key, (arr[a:b],))
            return
        self.elements += int(arr.size)
        if self.norms:
            self.sumsq += sq
            self.maxabs = max(self.maxabs, hi, -lo)

    def facts(self) -> dict:
        if not self.norms:
            return {"non_finite_tensors": len(self.bad), "float_elements": self.elements}
        return {"non_finite_tensors": len(self.bad), "weight_norm": self.sumsq ** 0.5,
                "max_abs_weight": self.maxabs, "float_elements": self.elements}


def tensor_view(mm: mmap.mmap, rec: TensorRecord, data_offset: int, entry_size: int,
                big_endian: bool = False) -> tuple[np.ndarray, bool, bool]:
    """A read-only view of one tensor's elements; raises ScanError when the
    record does not fit its storage entry."""
    found = numpy_dtype(rec.dtype, big_endian)
    if found is None:
        raise ScanError(f"dtype {rec.dtype} has no numpy view")
    dt, floating, bf16 = found
    shape = tuple(int(n) for n in rec.shape)
    stride = rec.stride if rec.stride is not None else safe_pickle.contiguous(shape)
    reach = safe_pickle.extent(shape, stride, rec.offset)
    if reach * dt.itemsize > entry_size:
        raise ScanError(f"tensor {rec.key} {list(shape)} reaches element {reach:,}, past its storage "
                        f"({entry_size // dt.itemsize:,} elements)")
    if not reach:
        return np.empty(shape, dtype=dt), floating, bf16
    arr = np.ndarray(shape, dtype=dt, buffer=mm, offset=data_offset + rec.offset * dt.itemsize,
                     strides=tuple(s * dt.itemsize for s in stride))
    return arr, floating, bf16


READ_BLOCK = _SQ_BLOCK * 4  # bytes read at a time by read_chunks: 1 MiB


def read_chunks(fd: int, dtype: np.dtype, bf16: bool, start: int, count: int, data_offset: int,
                entry_size: int, crc: int, buf: bytearray):
    """A contiguous tensor's chunks, its storage entry CRC-checked as it is
    read: one pass over memory instead of two (a CRC pass, then a measuring
    pass). The entry is read with pread, a block at a time, into one reused
    buffer: copying from the page cache costs less than mapping it page by
    page (155 against 195 us per MB here), and each block is then in cache
    for its CRC and its measures. The entry's bytes outside the tensor are
    checked too. The tensor holds `count` elements of `dtype` from file
    offset `start`, inside the entry; each yielded chunk is valid until the
    next one is read. Raises CrcError at the end when the entry's CRC does
    not match (the caller then discards the measures), ScanError when the
    file ends before the entry does."""
    size = dtype.itemsize
    stop = start + count * size
    end_entry = data_offset + entry_size
    view = memoryview(buf)
    block = len(buf) - len(buf) % 8  # whole elements of any dtype
    value, pos = 0, data_offset
    try:
        while pos < end_entry:
            want = min(block, end_entry - pos)
            got = _read_at(fd, view[:want], pos)
            if got != want:
                raise ScanError("the file ends inside a storage entry (changed since its check?)")
            value = crc32(view[:got], value)
            lo, hi = max(pos, start), min(pos + got, stop)
            if lo < hi:  # (lo - start) is a whole number of elements
                yield as_float(np.frombuffer(buf, dtype, (hi - lo) // size, lo - pos), bf16)
            pos += got
    finally:
        view.release()
    if value != crc:
        raise CrcError("bad CRC")


# Storage entries up to this size are read and measured many at a time
# (`measure_small`): a tensor of a genuine TinyWorlds model is most often a
# bias, a norm or a small matrix, and measuring each alone (a read, a CRC, a
# max, a min, a sum: ~14 us of calls) costs more than copying its bytes
# once more into a run of them. Measured on 50 checkpoints of 274
# parameters (1,096 tensors each): the scan took 1.05-1.09 s alone,
# 0.89-0.94 s batching entries up to 64 KiB, 0.71 s up to 512 KiB; the
# same up to 1 MiB. Half a read block: a run holds at least two.
SMALL_ENTRY = 1 << 19
F4 = np.dtype("<f4")


class Small(NamedTuple):
    """A float32 tensor alone in a small storage entry (torch.save's usual)."""

    key: str
    data_offset: int  # the entry's
    entry_size: int
    crc: int
    start: int        # the tensor's first byte in the file
    count: int        # its elements


def small(rec: TensorRecord, data_offset: int, entry_size: int, crc: int, big_endian: bool) -> Small | None:
    """`rec` as a Small when it is a little-endian float32 tensor that fits
    in its small entry (else it is viewed and measured on its own)."""
    found = numpy_dtype(rec.dtype, big_endian)
    if entry_size > SMALL_ENTRY or found is None or found[0] != F4:
        return None
    stride = rec.stride if rec.stride is not None else safe_pickle.contiguous(tuple(rec.shape))
    if safe_pickle.extent(tuple(rec.shape), stride, rec.offset) * 4 > entry_size:
        return None
    return Small(rec.key, data_offset, entry_size, crc, data_offset + rec.offset * 4, math.prod(rec.shape))


def measure_small(fd: int, items: list, measure: Measure, buf: bytearray, stage: bytearray) -> str | None:
    """Each entry's CRC and the tensors' measures, reading runs of nearby
    entries (file order) with one read of up to len(buf) bytes and measuring
    each run's tensors together (`Measure.add_together`). Returns the key of
    the first tensor whose entry fails its CRC (nothing of its run is then
    measured), else None; raises ScanError when the file ends early."""
    items = sorted(items, key=lambda it: it.data_offset)
    view, staged = memoryview(buf), memoryview(stage)
    i = 0
    try:
        while i < len(items):
            first, j = items[i].data_offset, i
            while j < len(items) and items[j].data_offset + items[j].entry_size - first <= len(buf):
                j += 1
            run = items[i:j]
            end = run[-1].data_offset + run[-1].entry_size
            if _read_at(fd, view[:end - first], first) != end - first:
                raise ScanError("the file ends inside a storage entry (changed since its check?)")
            keys, bounds, at = [], [], 0
            for it in run:
                a = it.data_offset - first
                if crc32(view[a:a + it.entry_size]) != it.crc:
                    return it.key
                s, n = it.start - first, it.count * 4
                staged[at:at + n] = view[s:s + n]
                keys.append(it.key)
                bounds.append((at // 4, (at + n) // 4))
                at += n
            if at:
                measure.add_together(keys, np.frombuffer(stage, F4, at // 4), bounds)
            i = j
    finally:
        view.release()
        staged.release()
    return None


def _read_at(fd: int, view: memoryview, pos: int) -> int:
    """Fill `view` from file offset `pos`; returns the bytes read (fewer only
    at the end of the file). pread where the platform has it (not macOS)."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], pos + done)
        else:
            os.lseek(fd, pos + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]])
        if not got:
            break
        done += got
    return done


def chunks(arr: np.ndarray, bf16: bool, chunk_elems: int):
    """The tensor's elements in chunks of about `chunk_elems` (a copy only for
    a non-contiguous tensor's chunk)."""
    if arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        for i in range(0, flat.size, chunk_elems):
            yield as_float(flat[i:i + chunk_elems], bf16)
        return
    rows = max(1, chunk_elems // max(1, arr[0].size)) if arr.ndim else 1
    if arr.ndim == 0:
        yield as_float(np.ascontiguousarray(arr).reshape(-1), bf16)
        return
    for i in range(0, arr.shape[0], rows):
        yield as_float(np.ascontiguousarray(arr[i:i + rows]).reshape(-1), bf16)
