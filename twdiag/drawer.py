"""A process that draws the loss figures, forked when a diagnosis starts.

Importing matplotlib and drawing the figures are a third of a fresh
`diagnose`, and neither needs the analyses until their results are known.
So, when the process may fork (`forking.can_fork`), a child is forked before
the analyses (after pandas, numpy and PIL are imported, which it inherits):
it imports matplotlib while the parent reads the bundle, then draws the
figures it is sent, each in a worker of its own, while the parent writes
the other outputs. On two cores that takes matplotlib off the answer's
critical path.

The protocol is two pipes. The parent sends one pickled list of figure
inputs (`plots.figure_inputs`: the plotted columns and dicts, no Analysis;
the send waits while the child is still importing); the
child answers with one pickled list of ("png", bytes) or ("error", text).
The parent sends (`send`), writes its own outputs, then collects (`receive`).
The child exits when its input closes (the parent finished or died) and
never writes to stdout. Anything that goes wrong on the way (no fork, a
child that died) makes `receive` return None, and the caller draws here.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Any

from . import forking


class Drawer:
    """A forked drawing process (see the module docstring)."""

    def __init__(self, pid: int, to_child: int, from_child: int):
        self.pid, self._to, self._from = pid, to_child, from_child
        self._answered = False

    @classmethod
    def start(cls) -> "Drawer | None":
        """Fork the drawer, or None where forking is unsafe or unavailable."""
        if not forking.can_fork() or not hasattr(os, "fork"):
            return None
        jobs_r, jobs_w = os.pipe()
        res_r, res_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # no buffered output may be written twice
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(jobs_w)
            os.close(res_r)
            _serve(jobs_r, res_w)
        os.close(jobs_r)
        os.close(res_w)
        return cls(pid, jobs_w, res_r)

    def send(self, inputs: list[tuple]) -> bool:
        """Hand over the figures' inputs; False when the drawer is gone."""
        try:
            with os.fdopen(self._to, "wb") as out:
                self._to = None
                pickle.dump(inputs, out, protocol=pickle.HIGHEST_PROTOCOL)
            return True
        except (OSError, pickle.PickleError):
            self.close()
            return False

    def receive(self) -> list[bytes] | None:
        """PNG bytes per figure sent, or None when the drawer could not
        answer (the caller then draws). A figure that failed raises, as it
        would have when drawn here."""
        try:
            with os.fdopen(self._from, "rb") as back:
                self._from = None
                answers = pickle.load(back)
            self._answered = True
        except (OSError, EOFError, pickle.PickleError):
            return None
        finally:
            self.close()
        pngs = []
        for kind, value in answers:
            if kind != "png":
                raise RuntimeError(f"drawing a loss figure failed: {value}")
            pngs.append(value)
        return pngs

    def close(self) -> None:
        """Release the pipes and reap the child. A child whose answer is not
        wanted (a usage error, a failed report) is stopped, not waited for."""
        for fd in (self._to, self._from):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to = self._from = None
        if self.pid:
            try:
                if not self._answered:
                    os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
            self.pid = 0


_INPUTS: list = []  # the figures' inputs, for the child's own forked workers


def _serve(jobs_r: int, res_w: int) -> None:
    """The child's whole life: import, wait for the inputs, draw, answer, exit."""
    global _INPUTS
    code = 0
    try:
        forking.keep_only((jobs_r, res_w))
        forking.quiet_child()
        from . import plots
        plots.prepare()
        with os.fdopen(jobs_r, "rb") as jobs:
            _INPUTS = pickle.load(jobs)
        # several figures: drawn side by side, the first here and each other
        # one in a child forked from here (matplotlib already imported), while
        # the parent writes its outputs
        others = [forking.Pending(_draw, i) for i in range(1, len(_INPUTS))]
        answers = ([_draw(0)] if _INPUTS else []) + [p.result() for p in others]
        with os.fdopen(res_w, "wb") as res:
            pickle.dump(answers, res, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # the parent's input closed early, or it is gone: nothing to tell
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no stdio flush: the parent owns those


def _draw(i: int) -> tuple[str, Any]:
    from . import plots
    try:
        return "png", plots.png_bytes(plots.stage_figure(*_INPUTS[i]))
    except Exception as exc:  # reported by the parent, as a figure drawn there would be
        return "error", f"{type(exc).__name__}: {exc}"[:500]
