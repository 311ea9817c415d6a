"""What may be opened: regular files only, never a FIFO, device, socket,
dangling link or symlink loop, and no call that can hang or raise on them.

A bundle is often a copy made by someone else's tools, or a mount that
another process is still writing, so every read in twdiag goes through here:
`open_regular` opens with O_NONBLOCK (opening a FIFO cannot block) and
checks the opened descriptor with fstat, so a file swapped for a FIFO
between a check and the open is still refused. Problems come back as
`Unreadable(reason)`, never as a hang.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class Unreadable(Exception):
    """This path is not a regular file we can read; str() is the reason."""


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def kind_of(mode: int) -> str | None:
    """None for a regular file, else what it is instead."""
    if stat.S_ISREG(mode):
        return None
    return next((text for test, text in _KINDS if test(mode)), "not a regular file")


def _stat_reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"dangling symlink (to {os.readlink(path)})"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return exc.strerror or str(exc)


def check_regular(path: str | Path) -> os.stat_result:
    """stat() a path that must be a regular file; raises Unreadable."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Unreadable(_stat_reason(path, exc)) from None
    what = kind_of(st.st_mode)
    if what:
        raise Unreadable(f"{what}, not a regular file")
    return st


def is_regular(path: str | Path) -> bool:
    try:
        check_regular(path)
        return True
    except Unreadable:
        return False


def is_dir(path: str | Path) -> bool:
    """A directory (links followed); False for loops and dangling links."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file read-only; raises Unreadable for anything else."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise Unreadable(_stat_reason(path, exc)) from None
    try:
        what = kind_of(os.fstat(fd).st_mode)
        if what:
            raise Unreadable(f"{what}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def resolve(path: str | Path) -> Path:
    """Path.resolve() that cannot raise: a loop resolves to the path itself."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def entries(folder: str | Path, limit: int) -> tuple[list[Path], bool]:
    """The entries of a directory, sorted by name, at most `limit` of them;
    ([], False) when it cannot be listed. The flag says it was cut."""
    try:
        with os.scandir(folder) as it:
            names = []
            for e in it:
                names.append(e.name)
                if len(names) > limit:
                    break
    except OSError:
        return [], False
    cut = len(names) > limit
    return [Path(folder) / n for n in sorted(names[:limit])], cut


def size_of(path: str | Path) -> int | None:
    try:
        return check_regular(path).st_size
    except Unreadable:
        return None
