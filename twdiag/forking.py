"""Work spread over forked processes, or done here when forking is unsafe.

A fork beside live threads can leave a child stuck on a lock one of them
held (wandb keeps four threads alive once a run was started in the process:
a hang seen in the test session), and spawn would re-run the caller's main
module in every child. So work is forked only from a process with no other
thread, where fork is available; otherwise it runs here, one item after
another, with the same results.

Children ignore SIGINT and take SIGTERM's default action: an interrupt is
the parent's to handle (it stops the pool), and a child must never print a
KeyboardInterrupt traceback of its own.

Two shapes: `starmap`/`imap` spread jobs over a pool (the jobs inherited by
the workers, not pickled); `Pending` computes one call in a child started
now, for the caller to collect later (diagnose's images and drawer).
"""
from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

MAX_WORKERS = 4
# Set by `serial_blas` (so a child that wants its own threads can drop it).
BLAS_ENV = "OPENBLAS_NUM_THREADS"
_blas_env_set = False


def serial_blas() -> None:
    """Keep numpy's OpenBLAS on the calling thread; call before numpy is
    imported (the command line does, first thing). OpenBLAS runs large
    products on a thread pool whose threads then spin-wait for more work:
    they took the second core from every forked worker and from the drawer,
    which made forked image analysis twice as slow as serial. twdiag's
    parallelism is its own forked processes; its products are small. A
    value the user set is kept."""
    global _blas_env_set
    if BLAS_ENV not in os.environ:
        os.environ[BLAS_ENV] = "1"
        _blas_env_set = True


def child_env() -> dict:
    """This process's environment without what `serial_blas` added (for a
    subprocess that should use its own threads, like the model probe)."""
    env = dict(os.environ)
    if _blas_env_set:
        env.pop(BLAS_ENV, None)
    return env


def can_fork() -> bool:
    """No other thread, fork available, and not a pool's worker already (a
    daemonic process may not have children)."""
    return (threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def quiet_child() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def starmap(fn: Callable, jobs: Iterable[tuple], workers: int | None = None) -> list:
    """[fn(*job) for job in jobs], in forked children when that is safe and
    worth it (see imap)."""
    return list(imap(fn, jobs, workers))


# imap's function and jobs, by call: workers inherit them when they are
# forked, so only an index goes to a worker and only the result comes back.
_INHERITED: dict[int, tuple[Callable, list]] = {}


def imap(fn: Callable, jobs: Iterable[tuple], workers: int | None = None, chunksize: int = 1) -> Iterator:
    """starmap as a generator, results in order as they come: a caller that
    stops early (a time budget) closes it, and the workers stop. The jobs
    are inherited by the forked workers, not pickled, so they may hold large
    objects; `fn` must be a module-level function, and its results are
    pickled back. `chunksize` jobs go to a worker at a time (more for short
    jobs: fewer round trips to the parent)."""
    jobs = list(jobs)
    n = min(workers or cpus(), MAX_WORKERS, len(jobs))
    if n < 2 or not can_fork():
        for job in jobs:
            yield fn(*job)
        return
    token = id(jobs)
    _INHERITED[token] = (fn, jobs)
    try:
        _flush_std()
        with _frozen():
            pool = multiprocessing.get_context("fork").Pool(n, initializer=quiet_child)
        with pool:
            yield from pool.imap(_inherited, [(token, i) for i in range(len(jobs))], chunksize)
    finally:
        _INHERITED.pop(token, None)


@contextlib.contextmanager
def _frozen():
    """Around a fork: the objects alive now are left out of the garbage
    collector's passes (`gc.freeze`), here only for the fork's length. A
    child's collections would otherwise walk every inherited object and
    write to its header, copying the pages that hold it: the drawer's
    matplotlib import took 15% more CPU, in page faults."""
    parent = os.getpid()
    gc.freeze()
    try:
        yield
    finally:
        if os.getpid() == parent:  # a child keeps them frozen: it lives briefly
            gc.unfreeze()


def _flush_std() -> None:
    """Before a fork: output still buffered would be written by the parent
    and again by a child that flushes on exit (multiprocessing's workers do)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or detached: nothing to duplicate
            pass


def _inherited(item: tuple[int, int]) -> Any:
    token, i = item
    fn, jobs = _INHERITED[token]
    return fn(*jobs[i])


def keep_only(keep: tuple[int, ...]) -> None:
    """In a forked child: close every inherited descriptor but `keep` and
    stderr, and point stdin and stdout at /dev/null. A fork keeps the
    parent's descriptors open in the child, and a pipe stays open while any
    process holds an end: the model probe reads its job until end of file,
    and waited for a long-lived child to exit (a deadlock until its time
    budget ran out); a caller reading stdout to its end would wait too."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    low = 3  # `null` itself is closed here too
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class Pending:
    """fn(*args), computed from now on in a forked child; `result()` waits
    for it. Where this process may not fork, or the child fails, `result()`
    computes it here (an exception then comes from here, as it would have),
    or with `here=False` returns None. The child answers through a pipe,
    pickled; it keeps no inherited descriptor but `keep` (see keep_only).
    `cancel()` stops a child whose answer is no longer wanted."""

    def __init__(self, fn: Callable, *args, keep: tuple[int, ...] = (), here: bool = True):
        self.fn, self.args, self.here = fn, args, here
        self.pid, self._fd = 0, None
        if not can_fork():
            return
        r, w = os.pipe()
        _flush_std()
        with _frozen():
            pid = os.fork()
        if pid == 0:
            _answer(w, keep, fn, args)  # never returns
        os.close(w)
        self.pid, self._fd = pid, r

    def result(self) -> Any:
        if self._fd is not None:
            try:
                with os.fdopen(self._fd, "rb") as back:
                    self._fd = None
                    return pickle.load(back)
            except (OSError, EOFError, pickle.PickleError, AttributeError, ValueError):
                pass  # the child failed
            finally:
                self._reap(kill=False)
        return self.fn(*self.args) if self.here else None

    def cancel(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._reap(kill=True)

    def _reap(self, kill: bool) -> None:
        if not self.pid:
            return
        try:
            if kill:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass
        self.pid = 0


def _answer(w: int, keep: tuple[int, ...], fn: Callable, args: tuple) -> None:
    code = 0
    try:
        keep_only((w, *keep))
        quiet_child()
        value = fn(*args)
        with os.fdopen(w, "wb") as out:
            pickle.dump(value, out, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # the parent computes it itself, or does without
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no stdio flush: the parent owns those
