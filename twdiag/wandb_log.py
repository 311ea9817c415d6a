"""Framing decoder for W&B `.wandb` transaction logs.

The file is a LevelDB-style log (see references/wandb-log-format.md): a 7-byte
file header, then 32 KiB blocks of chunks, each chunk `<crc32, length, type>`
plus payload. One logical record is a FULL chunk or FIRST + MIDDLE* + LAST; its
payload is a serialized `wandb_internal.Record`.

We own the framing (wandb's old Python reader is gone since 0.30 and opened
files read-write); records are parsed with wandb's published protobuf classes.
The reader streams the file in block-aligned slabs, so memory stays bounded
whatever the file size, and it never raises on damaged input: every problem is
counted in a `ScanReport`.
"""
from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import BinaryIO, Iterator

from .checksum import crc32
from .rules import default_limits

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
# Block-aligned read size: large enough to amortise syscalls, small enough to
# keep memory flat on multi-GB files.
SLAB_BLOCKS = 64
# Records past this many bytes are skipped unparsed (thresholds: limits.max_record_bytes).
MAX_RECORD_BYTES = int(default_limits()["max_record_bytes"])
# Type byte CRC seeds, precomputed once (CRC covers type byte + payload).
_TYPE_CRC = {t: crc32(bytes([t])) for t in (FULL, FIRST, MIDDLE, LAST)}


@dataclass
class ScanReport:
    """What the framing layer saw. Field names match the corpus MANIFEST."""

    path: str
    file_size: int = 0
    header_ok: bool = False
    header_error: str | None = None
    header_version: int | None = None
    layout: str | None = None  # "standard" | "shifted"
    records_total: int = 0
    chunks: int = 0
    corrupt_chunks: int = 0
    corrupt_detail: list = field(default_factory=list)
    zeroed_blocks_skipped: int = 0
    orphan_chunks_skipped: int = 0
    partial_records_dropped: int = 0
    nonzero_padding: int = 0
    decode_errors: int = 0
    oversized_records: int = 0  # records above limits.max_record_bytes, skipped unparsed
    truncated_tail: bool = False
    truncation: str | None = None
    scan_end_offset: int = 0
    # Where the next read of a growing file resumes: just after the last
    # complete record (a half-written one at the tail is read again whole).
    resume_offset: int = 0

    @property
    def damaged(self) -> bool:
        return bool(self.corrupt_chunks or self.zeroed_blocks_skipped
                    or self.orphan_chunks_skipped or self.partial_records_dropped
                    or self.decode_errors or self.oversized_records)

    @property
    def next_offset(self) -> int:
        """Where the next read of a growing file starts: after the last
        complete record when the tail is cut mid-record, else where this
        scan ended (damage already counted is not read again)."""
        return self.resume_offset if self.truncated_tail else self.scan_end_offset

    def to_dict(self) -> dict:
        d = asdict(self)
        d["corrupt_detail"] = d["corrupt_detail"][:20]  # bounded output
        d["damaged"] = self.damaged
        return d


class WandbLogError(Exception):
    """The file cannot be read as a .wandb log at all (header, I/O)."""


def check_header(head: bytes) -> str | None:
    """Return None when `head` is a valid version-0 header, else the reason."""
    if len(head) < HEADER.size:
        return f"file shorter than the 7-byte header ({len(head)} bytes)"
    ident, magic, version = HEADER.unpack_from(head)
    if ident != IDENT:
        return f"bad ident {ident!r} (not a .wandb file)"
    if magic != MAGIC:
        return f"bad magic 0x{magic:04X}"
    if version != VERSION:
        return f"unsupported version {version}"
    return None


def _chain_fits(buf: bytes, start: int, limit: int) -> bool | None:
    """Walk chunk headers in [start, limit): True if they tile the block.

    None when the evidence is inconclusive (bad CRC, file too short).
    """
    p = start
    while limit - p >= CHUNK.size:
        if p + CHUNK.size > len(buf):
            return None
        crc, length, ctype = CHUNK.unpack_from(buf, p)
        if crc == 0 and length == 0 and ctype == 0:
            return None
        end = p + CHUNK.size + length
        if ctype not in _TYPE_CRC:
            return None
        if end > limit:
            return False
        if end > len(buf):
            return None
        if crc32(buf[p + CHUNK.size:end], _TYPE_CRC[ctype]) != crc:
            return None
        p = end
    return True


def detect_layout(head: bytes) -> str:
    """Tell the pre-0.17.6 shifted layout (blocks at 7 + k*32768) from standard.

    Only the first block differs: in the standard layout its chunks tile
    [7, 32768), in the shifted one [7, 32775). A file within one block reads
    the same either way.
    """
    if len(head) <= BLOCK:
        return "standard"
    if _chain_fits(head, HEADER.size, BLOCK) is False and \
            _chain_fits(head, HEADER.size, BLOCK + HEADER.size):
        return "shifted"
    return "standard"


def iter_payloads(fh: BinaryIO, report: ScanReport, base: int,
                  first_block: int = 0, stop_block: int | None = None,
                  start_offset: int | None = None) -> Iterator[bytes]:
    """Complete record payloads, one by one (see `iter_batches`)."""
    return itertools.chain.from_iterable(
        iter_batches(fh, report, base, first_block, stop_block, start_offset))


def iter_batches(fh: BinaryIO, report: ScanReport, base: int,
                 first_block: int = 0, stop_block: int | None = None,
                 start_offset: int | None = None, offsets: bool = False) -> Iterator[list]:
    """Yield the complete record payloads of each block, as a list (one
    generator step per block, not per record: the hot loop stays in C);
    count every skip in `report`.

    `base` is where block 0 starts (0 standard, 7 shifted). Resync rule, as in
    wandb's Go reader: after a bad chunk drop the rest of its block and any
    half-built record, then resume at the next FULL or FIRST chunk.

    `first_block`/`stop_block` select the records whose first chunk lies in
    that block range, so ranges can be decoded independently: a range start
    skips the tail of a record begun earlier (not damage), and a range end
    reads on until the record begun inside it is complete.

    `start_offset` resumes a growing file exactly where an earlier read left
    off (its `resume_offset`: a chunk boundary after a complete record).
    `offsets`: yield (record offset, payload) pairs instead (`records`).
    """
    size = report.file_size
    state = _Assembly(quiet_orphans=first_block > 0 and start_offset is None,
                      offsets=[] if offsets else None)
    if start_offset is not None:
        first_block = max(0, (start_offset - base) // BLOCK)
    block_start = base + first_block * BLOCK
    pos = max(block_start, HEADER.size) if start_offset is None else max(start_offset, HEADER.size)
    report.resume_offset = pos
    stop_at = size if stop_block is None else base + stop_block * BLOCK
    slab_at, slab = 0, b""
    while pos < size and (pos < stop_at or state.parts is not None):
        block_end = block_start + BLOCK
        if block_start < slab_at or min(block_end, size) > slab_at + len(slab):
            slab_at = block_start
            fh.seek(slab_at)
            slab = fh.read(BLOCK * SLAB_BLOCKS)
        batch: list[bytes] = []
        pos = _read_block(slab, slab_at, pos, block_end, report, state, stop_at, batch)
        if batch and offsets:
            batch = list(zip(state.offsets, batch))
            state.offsets.clear()
        if batch:
            yield batch
        if report.truncated_tail or (pos >= stop_at and state.parts is None):
            break
        block_start = block_end
        pos = max(pos, block_start)
    if state.parts is not None and not report.truncated_tail:
        report.truncated_tail = True
        report.truncation = "FIRST chunk without LAST at EOF"
        pos = size
    report.scan_end_offset = min(pos, size) if report.truncated_tail else size


@dataclass
class _Assembly:
    # A FIRST..MIDDLE record being built. While it is None, MIDDLE and LAST
    # chunks are orphans (skipped until the next FULL or FIRST).
    parts: list | None = None
    size: int = 0            # bytes in `parts`
    oversized: bool = False  # the record being built passed the cap: its chunks are counted, not kept
    offsets: list | None = None  # when kept: each emitted record's first chunk offset, in order
    start: int = 0               # the first chunk offset of the record being built
    # At a range start the first orphans belong to the previous range.
    quiet_orphans: bool = False

    def drop(self, report: ScanReport) -> None:
        if self.parts is not None:
            report.partial_records_dropped += 1
        self.parts, self.quiet_orphans = None, False


def _read_block(slab: bytes, rel: int, pos: int, block_end: int,
                report: ScanReport, st: _Assembly, stop_at: int, out: list) -> int:
    """Consume the chunks of one block, appending complete payloads to `out`;
    return where reading stopped."""
    size = report.file_size
    while block_end - pos >= CHUNK.size:
        if pos >= size or (pos >= stop_at and st.parts is None):
            return pos
        if pos + CHUNK.size > size:
            report.truncated_tail = True
            report.truncation = f"partial chunk header ({size - pos} of 7 bytes)"
            return pos
        crc, length, ctype = CHUNK.unpack_from(slab, pos - rel)
        # Past stop_at we only finish a record begun in range; damage there is
        # counted by the next range, the dropped record by us.
        past = pos >= stop_at
        if crc == 0 and length == 0 and ctype == 0:
            report.zeroed_blocks_skipped += 0 if past else 1
            st.drop(report)
            return block_end
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        if ctype not in _TYPE_CRC or end > block_end:
            if not past:
                report.corrupt_chunks += 1
                report.corrupt_detail.append([pos, "bad chunk header"])
            st.drop(report)
            return block_end
        if end > size:
            report.truncated_tail = True
            report.truncation = f"partial chunk payload ({size - start} of {length} bytes)"
            return pos
        payload = slab[start - rel:end - rel]
        chunk_at = pos
        if crc32(payload, _TYPE_CRC[ctype]) != crc:
            if not past:
                report.corrupt_chunks += 1
                report.corrupt_detail.append([pos, "crc mismatch"])
            st.drop(report)
            return block_end
        pos = end
        if st.quiet_orphans and ctype in (MIDDLE, LAST):
            continue  # the previous block range reads this record
        report.chunks += 1
        if ctype == FULL or ctype == FIRST:
            st.quiet_orphans = False
            if st.parts is not None:  # FIRST never closed: damage or writer bug
                report.partial_records_dropped += 1
            if ctype == FULL:
                st.parts = None
                report.records_total += 1
                report.resume_offset = pos
                out.append(payload)
                if st.offsets is not None:
                    st.offsets.append(chunk_at)
            else:
                st.parts, st.size, st.oversized, st.start = [payload], len(payload), False, chunk_at
        elif st.parts is None:
            report.orphan_chunks_skipped += 1
        else:
            # A record's size is only known at its end: past the cap its chunks
            # are dropped as they come (a 120 MB console record costs nothing).
            st.size += len(payload)
            if st.size > MAX_RECORD_BYTES and not st.oversized:
                st.oversized, st.parts[:] = True, []
            if not st.oversized:
                st.parts.append(payload)
            if ctype == LAST:
                report.records_total += 1
                report.resume_offset = pos
                if st.oversized:
                    report.oversized_records += 1
                else:
                    out.append(b"".join(st.parts))
                    if st.offsets is not None:
                        st.offsets.append(st.start)
                st.parts, st.oversized = None, False
    tail = slab[pos - rel:min(block_end, size) - rel]
    if tail.strip(b"\0"):
        report.nonzero_padding += 1
    return block_end


def open_log(path: str | Path) -> tuple[ScanReport, BinaryIO | None, int]:
    """Open read-only (a regular file only: a FIFO would hang), check the
    header and pick the layout.

    Returns (report, file handle or None when unreadable, block base offset).
    Header problems go into the report; only an OSError raises WandbLogError.
    """
    from . import safefs
    path = Path(path)
    report = ScanReport(path=str(path))
    try:
        fh = safefs.open_regular(path)  # read-only: works on read-only mounts
        report.file_size = os.fstat(fh.fileno()).st_size
    except safefs.Unreadable as exc:
        raise WandbLogError(f"cannot open {path}: {exc}") from exc
    except OSError as exc:
        raise WandbLogError(f"cannot open {path}: {exc.strerror or exc}") from exc
    head = fh.read(BLOCK + HEADER.size + 1)
    error = check_header(head)
    if error:
        fh.close()
        report.header_error = error
        return report, None, 0
    report.header_ok = True
    report.header_version = VERSION
    report.layout = detect_layout(head)
    return report, fh, (HEADER.size if report.layout == "shifted" else 0)


def block_count(report: ScanReport) -> int:
    base = HEADER.size if report.layout == "shifted" else 0
    return max(1, -(-(report.file_size - base) // BLOCK))


def scan(path: str | Path, first_block: int = 0, stop_block: int | None = None,
         start_offset: int | None = None, offsets: bool = False) -> tuple[ScanReport, Iterator]:
    """Return (report, payload iterator) for the records of a block range,
    or from `start_offset` to the end (a growing file, read again).

    The report is filled in as the iterator is consumed; a bad header gives
    an empty iterator and `report.header_error`, never an exception.
    """
    report, fh, base = open_log(path)
    if fh is None:
        return report, iter(())

    def _gen() -> Iterator[list[bytes]]:
        with fh:
            yield from iter_batches(fh, report, base, first_block, stop_block, start_offset, offsets)

    return report, itertools.chain.from_iterable(_gen())


def merge_reports(parts: list[ScanReport]) -> ScanReport:
    """Combine the reports of consecutive block ranges of one file."""
    out = parts[0]
    for r in parts[1:]:
        for name in ("records_total", "chunks", "corrupt_chunks", "zeroed_blocks_skipped",
                     "orphan_chunks_skipped", "partial_records_dropped",
                     "nonzero_padding", "decode_errors", "oversized_records"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        out.corrupt_detail += r.corrupt_detail
    cut = next((r for r in parts if r.truncated_tail), parts[-1])
    out.truncated_tail, out.truncation = cut.truncated_tail, cut.truncation
    out.scan_end_offset = cut.scan_end_offset
    out.resume_offset = max(r.resume_offset for r in parts)
    return out
