"""A torch zip archive read by one strict reader, so every reader reads it alike.

Python's `zipfile`, torch's reader (miniz, inside `torch.load`) and ours
locate a zip's entries differently when an archive is ambiguous: `zipfile`
allows for bytes prepended to the archive and reads the directory relative to
the end record, miniz follows the end record's absolute offsets, and with two
zip64 end records each picks another one. A hostile file can then show a
clean pickle to a checker and a payload to `torch.load`. So an archive is
accepted only when it can be read one way:

- one end record, at the very end of the file (no comment), and when zip64
  records are present, exactly one locator/record pair, adjacent and
  agreeing with the end record;
- the central directory exactly where both say, ending where the end
  records begin;
- entry counts that match the directory, within a cap;
- every local header agreeing with its directory entry (name, method,
  flags, CRC and sizes), and the entries tiling the file from byte 0 to the
  directory with no byte unaccounted for (data descriptors included).

Anything else raises `ArchiveError` with a status (`unsafe_pickle` where
readers could disagree, `truncated` or `corrupt` otherwise) and the reason.
The result is each entry's data offset and size, which the pickle check
and the numpy deep scan read directly.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, NamedTuple

_EOCD = struct.Struct("<4sHHHHIIH")            # 22 bytes
_Z64_LOCATOR = struct.Struct("<4sIQI")         # 20 bytes
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")      # 56 bytes (without extensible data)
_CDH = struct.Struct("<4sHHHHHHIIIHHHHHII")    # 46 bytes
_LFH = struct.Struct("<4sHHHHHIIIHH")          # 30 bytes
SIG_EOCD, SIG_LOC, SIG_Z64 = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
SIG_CDH, SIG_LFH, SIG_DD = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_FULL16, _FULL32 = 0xFFFF, 0xFFFFFFFF


class ArchiveError(Exception):
    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Entry(NamedTuple):  # a tuple: built ~1,000 times a genuine optimizer file, a third of a dataclass's cost
    name: str
    header_offset: int
    data_offset: int
    size: int           # stored bytes (== uncompressed for method 0)
    file_size: int      # uncompressed bytes
    crc: int
    method: int
    flags: int


def _ambiguous(detail: str) -> ArchiveError:
    return ArchiveError("unsafe_pickle", detail + ": zip readers would disagree on what this file "
                                                  "holds, so what was checked need not be what torch.load runs")


def _read_at(fh: BinaryIO, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def read_directory(fh: BinaryIO, size: int, max_entries: int, max_directory_bytes: int) -> list[Entry]:
    """Every entry of an unambiguous archive, in file order; raises ArchiveError."""
    if size < _EOCD.size:
        raise ArchiveError("truncated", f"{size} bytes: too short for a zip end record")
    eocd_pos = size - _EOCD.size
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack(
        _read_at(fh, eocd_pos, _EOCD.size))
    if sig != SIG_EOCD:
        _no_end_record(fh, size)
    if disk or cd_disk or n_disk != n_total:
        raise ArchiveError("corrupt", "a multi-disk zip: not a torch.save archive")
    cd_end = eocd_pos
    z64 = None
    if eocd_pos >= _Z64_LOCATOR.size:
        loc = _read_at(fh, eocd_pos - _Z64_LOCATOR.size, _Z64_LOCATOR.size)
        if loc[:4] == SIG_LOC:
            z64 = _zip64_record(fh, eocd_pos - _Z64_LOCATOR.size, loc)
    if z64 is not None:
        z_offset, z_total, z_cd_size, z_cd_offset = z64
        for name, small, big, full in (("entry count", n_total, z_total, _FULL16),
                                       ("directory size", cd_size, z_cd_size, _FULL32),
                                       ("directory offset", cd_offset, z_cd_offset, _FULL32)):
            if small != full and small != big:
                raise _ambiguous(f"the end record's {name} ({small}) and the zip64 record's ({big}) differ")
        n_total, cd_size, cd_offset, cd_end = z_total, z_cd_size, z_cd_offset, z_offset
    elif _FULL16 == n_total or _FULL32 in (cd_size, cd_offset):
        raise ArchiveError("corrupt", "the end record defers to a zip64 record that is not there")
    if n_total > max_entries:
        raise ArchiveError("corrupt", f"the end record claims {n_total:,} entries (more than the "
                                      f"{max_entries:,} any checkpoint holds); not read")
    if cd_offset + cd_size != cd_end:
        raise _ambiguous(f"the central directory is said to span [{cd_offset:,}, {cd_offset + cd_size:,}) "
                         f"but the end records begin at {cd_end:,} ({cd_end - cd_offset - cd_size:+,} bytes "
                         "unaccounted for)")
    if cd_size > max_directory_bytes:
        raise ArchiveError("corrupt", f"central directory of {cd_size:,} bytes (cap {max_directory_bytes:,})")
    return _check_local_headers(fh, _central_directory(_read_at(fh, cd_offset, cd_size), n_total), cd_offset)


def _no_end_record(fh: BinaryIO, size: int) -> None:
    tail = _read_at(fh, max(0, size - (1 << 16) - _EOCD.size), (1 << 16) + _EOCD.size)
    head = _read_at(fh, 0, 4)
    if SIG_EOCD in tail:
        raise _ambiguous("the zip end record is not at the end of the file (a comment or trailing bytes "
                         "follow it)")
    if head == SIG_LFH:
        raise ArchiveError("truncated", f"zip without an end record ({size:,} bytes): the write stopped early")
    raise ArchiveError("corrupt", "not a zip archive")


def _zip64_record(fh: BinaryIO, loc_pos: int, loc: bytes) -> tuple[int, int, int, int]:
    _, disk, z_offset, disks = _Z64_LOCATOR.unpack(loc)
    if disk or disks != 1:
        raise ArchiveError("corrupt", "a multi-disk zip64 archive: not a torch.save archive")
    if z_offset + _Z64_EOCD.size > loc_pos:
        raise _ambiguous(f"the zip64 locator points at {z_offset:,}, past where its record can be")
    raw = _read_at(fh, z_offset, _Z64_EOCD.size)
    if len(raw) < _Z64_EOCD.size or raw[:4] != SIG_Z64:
        raise ArchiveError("corrupt", f"no zip64 end record at {z_offset:,}, where its locator points")
    (_, rec_size, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset) = _Z64_EOCD.unpack(raw)
    if z_offset + 12 + rec_size != loc_pos:
        # Python's zipfile reads the record just before the locator, miniz
        # the one the locator points to: they must be the same one.
        raise _ambiguous(f"the zip64 record the locator points to (at {z_offset:,}) does not end where "
                         f"the locator begins ({loc_pos:,})")
    if disk or cd_disk or n_disk != n_total:
        raise ArchiveError("corrupt", "a multi-disk zip64 archive: not a torch.save archive")
    return z_offset, n_total, cd_size, cd_offset


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field where the 32-bit ones are full."""
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, i)
        if tag == 0x0001:
            body, j = extra[i + 4:i + 4 + n], 0
            vals = []
            for v in (usize, csize, offset):
                if v == _FULL32:
                    if j + 8 > len(body):
                        raise ArchiveError("corrupt", "zip64 extra field too short")
                    vals.append(struct.unpack_from("<Q", body, j)[0])
                    j += 8
                else:
                    vals.append(v)
            return vals[0], vals[1], vals[2]
        i += 4 + n
    if _FULL32 in (usize, csize, offset):
        raise ArchiveError("corrupt", "an entry defers to a zip64 extra field that is not there")
    return usize, csize, offset


def _central_directory(cd: bytes, n_total: int) -> list[tuple]:
    """(name, header offset, size, file size, crc, method, flags) of each entry."""
    entries, names, pos = [], set(), 0
    while pos < len(cd):
        if len(entries) >= n_total:
            raise _ambiguous(f"the central directory holds more than the {n_total:,} entries the end record "
                             "counts")
        if pos + _CDH.size > len(cd):
            raise ArchiveError("corrupt", "central directory entry cut short")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk, _, _,
         offset) = _CDH.unpack_from(cd, pos)
        if sig != SIG_CDH:
            raise ArchiveError("corrupt", f"bad central directory signature at entry {len(entries)}")
        end = pos + _CDH.size + nlen + elen + clen
        if end > len(cd):
            raise ArchiveError("corrupt", "central directory entry runs past the directory")
        raw_name = cd[pos + _CDH.size:pos + _CDH.size + nlen]
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        usize, csize, offset = _zip64_extra(cd[pos + _CDH.size + nlen:pos + _CDH.size + nlen + elen],
                                            usize, csize, offset)
        if disk not in (0, _FULL16):
            raise ArchiveError("corrupt", "an entry on another disk")
        if name in names:
            raise _ambiguous(f"duplicate zip entry {name!r}")
        names.add(name)
        entries.append((name, offset, csize, usize, crc, method, flags))
        pos = end
    if len(entries) != n_total:
        raise _ambiguous(f"the end record counts {n_total:,} entries, the central directory holds "
                         f"{len(entries):,}")
    return entries


class _Window:
    """Small reads at rising offsets, served from one read of up to BLOCK
    bytes: a genuine optimizer file holds ~700 small entries, each with a
    local header and a data descriptor, which cost two seeks and reads each."""

    BLOCK = 1 << 16

    def __init__(self, fh: BinaryIO):
        self.fh, self.start, self.buf = fh, 0, b""

    def read(self, offset: int, n: int, room: int) -> bytes:
        """n bytes at offset; `room`: bytes from offset worth reading with them."""
        if offset < self.start or offset + n > self.start + len(self.buf):
            self.start, self.buf = offset, _read_at(self.fh, offset, max(n, min(room, self.BLOCK)))
        return self.buf[offset - self.start:offset - self.start + n]


def _check_local_headers(fh: BinaryIO, found: list[tuple], cd_offset: int) -> list[Entry]:
    """Local headers agree with the directory, and the entries tile [0, cd_offset)."""
    order = sorted(range(len(found)), key=lambda i: found[i][1])
    entries: list = [None] * len(found)
    window = _Window(fh)
    expected = 0
    for k, i in enumerate(order):
        name, header_offset, size, file_size, crc0, method0, flags0 = found[i]
        nxt = found[order[k + 1]][1] if k + 1 < len(order) else cd_offset
        if header_offset != expected:
            raise _ambiguous(f"{header_offset - expected:+,} bytes unaccounted for before entry "
                             f"{name!r} (at {header_offset:,}, expected {expected:,})")
        # the window reaches the next header when it is near (small entries)
        room = nxt + _LFH.size + 256 - header_offset
        raw = window.read(header_offset, _LFH.size, room)
        if len(raw) < _LFH.size:
            raise ArchiveError("truncated", f"local header of {name!r} runs past the end of the file")
        sig, _, flags, method, _, _, crc, csize, usize, nlen, elen = _LFH.unpack(raw)
        if sig != SIG_LFH:
            raise _ambiguous(f"no local header at {header_offset:,} for entry {name!r}")
        local = window.read(header_offset + _LFH.size, nlen + elen, room - _LFH.size)
        local_name = local[:nlen].decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if local_name != name or method != method0 or flags != flags0:
            raise _ambiguous(f"local header of {name!r} disagrees with the directory "
                             f"(name {local_name!r}, method {method}, flags {flags:#x})")
        data_offset = header_offset + _LFH.size + nlen + elen
        if not flags & 0x8:
            usize, csize, _ = _zip64_extra(local[nlen:], usize, csize, 0)
            if (crc, csize, usize) != (crc0, size, file_size):
                raise _ambiguous(f"local header of {name!r} disagrees with the directory on CRC or sizes")
        entry = Entry(name, header_offset, data_offset, size, file_size, crc0, method0, flags0)
        data_end = data_offset + size
        if flags & 0x8:
            data_end += _descriptor_length(window, data_end, nxt - data_end, entry)
        if data_end != nxt:
            raise _ambiguous(f"entry {name!r} ends at {data_end:,} but the next part begins at {nxt:,}")
        entries[i] = entry
        expected = nxt
    return entries


def _descriptor_length(window: _Window, pos: int, room: int, e: Entry) -> int:
    """The data descriptor after an entry: with or without its signature, with
    32- or 64-bit sizes; it must repeat the directory's CRC and sizes."""
    if room < 12 or room > 24:
        raise _ambiguous(f"{room:,} bytes between entry {e.name!r}'s data and the next part: not a data "
                         "descriptor")
    raw = window.read(pos, room, room + _LFH.size + 256)
    body = raw[4:] if raw[:4] == SIG_DD else raw
    if len(body) == 12:
        crc, csize, usize = struct.unpack("<III", body)
    elif len(body) == 20:
        crc, csize, usize = struct.unpack("<IQQ", body)
    else:
        raise _ambiguous(f"a {room}-byte data descriptor after {e.name!r}")
    if (crc, csize, usize) != (e.crc, e.size, e.file_size):
        raise _ambiguous(f"the data descriptor of {e.name!r} disagrees with the directory")
    return room
