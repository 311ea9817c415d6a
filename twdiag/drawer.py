"""A process that draws the loss figures, forked when a diagnosis starts.

Importing matplotlib and drawing the figures are a third of a fresh
`diagnose`, and neither needs the analyses until their results are known.
So, when the process may fork (`forking.can_fork`), a child is forked before
the analyses (after pandas, numpy and PIL are imported, which it inherits):
it imports matplotlib while the parent reads the bundle, then draws the
figures it is sent (the first itself, each other one in a child forked
from it) while the parent writes the other outputs. On two cores that
takes matplotlib off the answer's critical path.

The protocol is two pipes. The parent sends one pickled list of figure
inputs (`plots.figure_inputs`: the plotted columns and dicts, no Analysis;
the send waits while the child is still importing); the child answers
with one pickled list of ("png", bytes) or ("error", text).
The parent sends (`send`), writes its own outputs, then collects (`receive`).
The child exits when its input closes (the parent finished or died) and
never writes to stdout. Anything that goes wrong on the way (no fork, a
child that died) makes `receive` return None, and the caller draws here.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

from . import forking


class Drawer:
    """A forked drawing process (see the module docstring)."""

    def __init__(self, child: forking.Pending, to_child: int):
        self._child, self._to = child, to_child

    @property
    def pid(self) -> int:
        """The drawer's process id (0 once it is reaped)."""
        return self._child.pid

    @classmethod
    def start(cls) -> "Drawer | None":
        """Fork the drawer, or None where forking is unsafe or unavailable."""
        if not forking.can_fork():
            return None
        jobs_r, jobs_w = os.pipe()
        child = forking.Pending(_serve, jobs_r, keep=(jobs_r,), here=False)
        os.close(jobs_r)
        return cls(child, jobs_w)

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
        answers = self._child.result()
        if answers is None:
            return None
        pngs = []
        for kind, value in answers:
            if kind != "png":
                raise RuntimeError(f"drawing a loss figure failed: {value}")
            pngs.append(value)
        return pngs

    def close(self) -> None:
        """Release the pipe and the child. A child whose answer is not
        wanted (a usage error, a failed report) is stopped, not waited for."""
        if self._to is not None:
            try:
                os.close(self._to)
            except OSError:
                pass
            self._to = None
        self._child.cancel()


def _serve(jobs_r: int) -> list[tuple[str, Any]]:
    """The drawer's life: import, wait for the inputs, draw them, answer
    (through `forking.Pending`, which then ends the process)."""
    from . import plots
    plots.prepare()
    with os.fdopen(jobs_r, "rb") as jobs:
        inputs = pickle.load(jobs)
    # several figures: drawn side by side, the first here and each other
    # one in a child forked from here (matplotlib already imported, the
    # inputs inherited), while the parent writes its outputs
    others = [forking.Pending(_draw, item) for item in inputs[1:]]
    return [_draw(item) for item in inputs[:1]] + [p.result() for p in others]


def _draw(item: tuple) -> tuple[str, Any]:
    from . import plots
    try:
        return "png", plots.png_bytes(plots.stage_figure(*item))
    except Exception as exc:  # reported by the parent, as a figure drawn there would be
        return "error", f"{type(exc).__name__}: {exc}"[:500]
