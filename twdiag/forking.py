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
    """No other thread, fork available, and not a worker already (imap's
    workers share the cores out; a daemonic process may not have children)."""
    return (threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon and not _IN_WORKER)


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def quiet_child() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def starmap(fn: Callable, jobs: Iterable[tuple], workers: int | None = None,
            on_death: Callable | None = None) -> list:
    """[fn(*job) for job in jobs], in forked children when that is safe and
    worth it (see imap)."""
    return list(imap(fn, jobs, workers, on_death=on_death))


def imap(fn: Callable, jobs: Iterable[tuple], workers: int | None = None, chunksize: int = 1,
         on_death: Callable | None = None) -> Iterator:
    """starmap as a generator, results in order as they come: a caller that
    stops early (a time budget) closes it, and the workers stop. The jobs
    are inherited by the forked workers, not pickled, so they may hold large
    objects; only chunk bounds go to a worker and only results come back,
    pickled. `chunksize` jobs go to a worker at a time (more for short jobs:
    fewer round trips). A job's exception is raised here, where its result
    would have come. A worker that dies (killed: out of memory, say) raises
    WorkerDied, or with `on_death`, each job of the chunk it was on gets
    `on_death(*job)` as its result (computed here: it must not redo the
    work) and a new worker takes the rest."""
    jobs = list(jobs)
    n = min(workers or cpus(), MAX_WORKERS, len(jobs))
    if n < 2 or not can_fork():
        for job in jobs:
            yield fn(*job)
        return
    chunks = [(i, min(i + chunksize, len(jobs))) for i in range(0, len(jobs), chunksize)]
    pool = _Workers(n, fn, jobs)
    try:
        yield from pool.results(chunks, on_death)
    finally:
        pool.stop()


class WorkerDied(RuntimeError):
    """A forked worker ended without answering (killed, or out of memory)."""


_IN_WORKER = False  # set in imap's workers: they never fork in turn (cores are already shared out)


class _Workers:
    """imap's forked workers, each fed chunk bounds over its own pipe and
    answering over another. Our own, not multiprocessing.Pool: the Pool's
    worker-handling thread wakes whenever a result is waiting to be read and
    spins until it is, which cost a third of the parent's time, and a core's
    worth of it, in a --deep all scan; and a worker that died left Pool.imap
    waiting forever. Each worker processes its chunks in the order sent."""

    DEPTH = 2  # chunks queued per worker: the next is there when one ends

    def __init__(self, n: int, fn: Callable, jobs: list):
        self.fn, self.jobs = fn, jobs
        self.workers: dict = {}  # answer pipe -> (pid, task pipe, chunk numbers sent, in order)
        for _ in range(n):
            self._fork()

    def _fork(self) -> None:
        from multiprocessing.connection import Pipe
        task_r, task_w = Pipe(duplex=False)
        result_r, result_w = Pipe(duplex=False)
        _flush_std()
        with _frozen():
            pid = os.fork()
        if pid == 0:
            _serve(self.fn, self.jobs, task_r, result_w)  # never returns
        task_r.close(), result_w.close()
        self.workers[result_r] = (pid, task_w, [])

    def results(self, chunks: list[tuple[int, int]], on_death: Callable | None) -> Iterator:
        from multiprocessing.connection import wait
        todo = list(range(len(chunks)))[::-1]  # chunk numbers still to send, next last
        for _ in range(self.DEPTH):
            for r in list(self.workers):
                self._send(r, chunks, todo)
        done: dict[int, tuple] = {}
        next_out = 0
        while next_out < len(chunks):
            for r in wait([r for r, (_, _, sent) in self.workers.items() if sent]):
                try:
                    with gc_paused():  # an answer unpickles into thousands of lasting objects
                        answer = r.recv()
                except (EOFError, OSError):
                    lost = self._died(r, todo)
                    if on_death is None:
                        raise WorkerDied(f"a forked worker ended without answering (jobs {chunks[lost]})") from None
                    done[lost] = (True, [on_death(*self.jobs[i]) for i in range(*chunks[lost])])
                    self._fork()  # in its place, for the rest
                    for _ in range(self.DEPTH):
                        self._send(next(reversed(self.workers)), chunks, todo)
                    continue
                except Exception as exc:  # an answer that does not unpickle here
                    raise WorkerDied(f"a forked worker's answer could not be read: {exc}"[:500]) from None
                done[self.workers[r][2].pop(0)] = answer
                self._send(r, chunks, todo)
            while next_out in done:
                ok, value = done.pop(next_out)
                if not ok:
                    raise value
                next_out += 1
                yield from value

    def _send(self, r, chunks: list, todo: list) -> None:
        if todo:
            n = todo.pop()
            self.workers[r][2].append(n)
            try:
                self.workers[r][1].send(chunks[n])
            except OSError:  # the worker died meanwhile: its answer pipe's end says so, and `_died` puts n back
                pass

    def _died(self, r, todo: list) -> int:
        """A worker ended: reap it and put back the chunks it had not begun
        (it works in order: the first it was sent is the one it died on,
        which is returned)."""
        pid, w, sent = self.workers.pop(r)
        w.close(), r.close()
        _reap(pid)
        todo.extend(reversed(sent[1:]))
        return sent[0]

    def stop(self) -> None:
        """Close the pipes (an idle worker exits at once), stop any worker
        still busy (an early close), and reap them all."""
        for r, (pid, w, _) in self.workers.items():
            w.close(), r.close()
            _reap(pid)
        self.workers = {}


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def _serve(fn: Callable, jobs: list, tasks, results) -> None:
    """A worker's life: compute the chunks it is sent until its pipe closes."""
    global _IN_WORKER
    code = 0
    try:
        _IN_WORKER = True
        keep_only((tasks.fileno(), results.fileno()))
        quiet_child()
        while True:
            try:
                start, stop = tasks.recv()
            except EOFError:
                break
            try:
                answer = (True, [fn(*jobs[i]) for i in range(start, stop)])
            except Exception as exc:  # raised in the parent, where the result would have come
                answer = (False, exc)
            try:
                results.send(answer)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                results.send((False, RuntimeError(f"a worker's answer could not be sent: {exc}"[:500])))
    except BaseException:
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no stdio flush: the parent owns those


LOCK_WAIT_SECONDS = 5.0  # a lock shared with forked processes is held for microseconds: longer means its holder died


class Counter:
    """A count, here alone or (`shared=True`) in shared memory with the
    processes forked after it: several processes then claim from one count
    (the run's large-pickle budget, diagnose's images). Where shared memory
    cannot be had, each process counts on its own. The shared count's lock
    is waited for at most LOCK_WAIT_SECONDS: a process killed while it held
    it (an interrupt's SIGKILL, the kernel's OOM kill) must not make the
    others wait forever."""

    def __init__(self, value: int = 0, shared: bool = False):
        self._plain, self._shared = value, None
        if shared:
            try:
                self._shared = multiprocessing.get_context("fork").Value("q", value)
            except (ImportError, OSError, ValueError):
                pass

    @property
    def shared(self) -> bool:
        return self._shared is not None

    @property
    def value(self) -> int:
        """Read without the lock (which a dead process may hold)."""
        return self._shared.get_obj().value if self._shared is not None else self._plain

    @value.setter
    def value(self, v: int) -> None:
        if self._shared is not None:
            self._shared.get_obj().value = v
        else:
            self._plain = v

    def claim(self, amount: int, limit: int) -> int | None:
        """Add `amount` unless the count would pass `limit`: the count before,
        or None (also when the shared lock is not had in time)."""
        if self._shared is None:
            return self._add(amount, limit)
        lock = self._shared.get_lock()
        if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
            return None
        try:
            return self._add(amount, limit)
        finally:
            lock.release()

    def _add(self, amount: int, limit: int) -> int | None:
        before = self.value
        if before + amount > limit:
            return None
        self.value = before + amount
        return before


@contextlib.contextmanager
def gc_paused():
    """No garbage collection for the block's length: for a block that builds
    many lasting objects and no cycles (a worker's answer: a genuine
    checkpoint comes back as ~3,000 objects). Collections triggered by its
    allocations, each walking every answer received so far, cost the main
    process of a --deep all of 100 such checkpoints 0.4-0.7 s of CPU, which
    the workers needed. Collection resumes as before once the block ends
    (nested blocks: the outer one's end)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
