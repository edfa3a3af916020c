"""Report figures drawn by worker processes beside the run.

A report's figures are pure matplotlib work: importing pyplot (about 0.3 s on a 2-core CPU) and
then 0.3–0.5 s per figure, one after the other, while the run's other processor idles; on the
discrete demo config that was a third of a warm run. So the command starts a few workers first
thing, before it imports JAX or the study. They import matplotlib, and then (once the command
knows the study: :func:`serve`) the module that holds the study's figure function, while the
run computes. When the run has written its arrays, every worker calls the same figure
function on the run directory and draws its share of the figures: figure ``i`` (in the order
the function saves them) is drawn by worker ``i mod n``. The others are not even built where the
figure is made with :func:`~collapse_jax.core.report.subplots` (every chain family's figures,
:func:`~collapse_jax.core.report.curves_figure` included), else built and closed undrawn by
``save_figure``. The run's own process never imports matplotlib.

Nothing is lost or changed: the figures are the same files (same bytes; tested). A figure
function that cannot be sent to a worker (a lambda), a worker that dies, hangs or raises, or
answers that do not account for every figure, make the run draw the figures itself, in process,
exactly as without workers (a genuine error then surfaces with its ordinary traceback). Files
are written atomically by :func:`collapse_jax.core.runs.save_figure` either way.

``COLLAPSE_JAX_FIGURE_WORKERS`` sets the number of workers (``0``: draw in process); the default
is two where this process may use at least two processors, else none. The Python API draws in
process unless it is called inside :func:`workers`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

#: Seconds a worker may take to answer one figure request before the run draws them itself.
TIMEOUT_S = 300.0

# A worker's share while it serves a request: (index, count); None in any other process.
_share: tuple[int, int] | None = None
_seen: list[str] = []  # every figure path save_figure was given during the request
_drawn: list[str] = []  # those this worker drew

_active: Pool | None = None


def owns(path) -> bool:
    """Whether this process draws the figure saved at ``path`` (called by ``save_figure``):
    always, except in a worker, which draws every n-th figure of a request."""
    if _share is None:
        return True
    index, count = _share
    mine = len(_seen) % count == index
    _seen.append(str(path))
    if mine:
        _drawn.append(str(path))
    return mine


def draw(make_figures: Callable[[Path], list], path: Path) -> list:
    """``make_figures(path)``: by the active workers when there are some and they answer for
    every figure, else in this process."""
    if _active is not None:
        figures = _active.draw(make_figures, Path(path))
        if figures is not None:
            return figures
    return make_figures(Path(path))


def default_count() -> int:
    """Workers to start: ``COLLAPSE_JAX_FIGURE_WORKERS``, else 2 on two or more processors."""
    text = os.environ.get("COLLAPSE_JAX_FIGURE_WORKERS", "").strip()
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            from collapse_jax.core.errors import ConfigError

            raise ConfigError(
                f"COLLAPSE_JAX_FIGURE_WORKERS must be a whole number, got {text!r}"
            ) from None
    from collapse_jax.core.devices import cores  # os only: no JAX import

    return 2 if cores() >= 2 else 0


def figure_modules(studies: Sequence) -> list[str]:
    """The modules that hold the studies' ``make_figures`` (those without one draw their figures
    their own way, in process)."""
    return [m.make_figures.__module__ for m in studies if hasattr(m, "make_figures")]


def serve(studies: Sequence) -> None:
    """Tell the active workers (started by :func:`workers` before the command knew its studies)
    which study modules they will draw for: they import those figure modules while the run
    computes. When none of the studies draws its figures from the run directory
    (``make_figures``), the workers are not needed and are ended now."""
    if _active is None:
        return
    names = figure_modules(studies)
    if names:
        _active.preload(names)
    else:
        _active.close()


@contextlib.contextmanager
def workers(preload: Sequence[str] = (), count: int | None = None) -> Iterator[Pool | None]:
    """Draw the figures of the runs inside this block with ``count`` workers (default
    :func:`default_count`) that import the ``preload`` modules while they wait."""
    global _active
    count = default_count() if count is None else count
    if count <= 0 or _active is not None:
        yield _active
        return
    pool = Pool(count)
    if preload:
        pool.preload(preload)
    _active = pool
    try:
        yield pool
    finally:
        _active = None
        pool.close()


# --------------------------------------------------------------------------------------------
# Messages: a 4-byte length, then a pickle.


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``, or None at end of file or past ``deadline``."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _receive(fd: int, deadline: float | None = None):
    head = _read_exactly(fd, 4, deadline)
    if head is None:
        return None
    data = _read_exactly(fd, struct.unpack(">I", head)[0], deadline)
    return None if data is None else pickle.loads(data)


# --------------------------------------------------------------------------------------------
# The run's side.

_BOOT = (
    "import json, os, sys; "
    "sys.path[:] = json.loads(os.environ.pop('COLLAPSE_JAX_WORKER_PATH')); "
    "from collapse_jax.core.figures import _serve; _serve()"
)


class Pool:
    """``count`` worker processes, each answering figure requests in order."""

    def __init__(self, count: int):
        self.count = count
        self.procs: list[subprocess.Popen] = []
        self.asked = False  # whether a figure request was sent
        for index in range(count):
            env = dict(
                os.environ,
                COLLAPSE_JAX_WORKER_PATH=json.dumps(sys.path),
                COLLAPSE_JAX_WORKER_INDEX=str(index),
                MPLBACKEND="Agg",
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BOOT],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
            )

    def preload(self, names: Sequence[str]) -> None:
        """Have every worker import these modules (errors are left for a request to report)."""
        try:
            for proc in self.procs:
                _send(proc.stdin.fileno(), ("preload", list(names)))
        except OSError:  # a worker is gone: the next request finds out and draws in process
            pass

    def draw(self, make_figures, path: Path) -> list | None:
        """The figure function's list when the workers drew every figure, else None."""
        if not self.procs:
            return None
        try:
            request = pickle.dumps((make_figures, path), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # a lambda or a closure: drawn in process
            return None
        try:
            self.asked = True
            for index, proc in enumerate(self.procs):
                _send(proc.stdin.fileno(), ("draw", index, self.count, request))
            deadline = time.monotonic() + TIMEOUT_S
            answers = [_receive(proc.stdout.fileno(), deadline) for proc in self.procs]
        except OSError:  # a worker is gone
            answers = [None]
        if any(a is None for a in answers):  # died or hung: no more requests to this pool
            self.close()
            return None
        if any(a[0] != "ok" for a in answers):
            return None  # the figure function raised: the in-process call raises it again
        figures, seen = answers[0][1], answers[0][2]
        drawn = [p for a in answers for p in a[3]]
        complete = (
            all(a[1] == figures and a[2] == seen for a in answers)
            and sorted(drawn) == sorted(seen)
            and all(Path(p).is_file() for p in seen)
        )
        return figures if complete else None

    def close(self) -> None:
        """End the workers (they exit at the end of their input); kill any that linger. Workers
        that were never asked for a figure (a command that stopped at bad input, a study that
        draws its own way) are killed at once: they may still be importing matplotlib, and
        they have written nothing."""
        procs, self.procs = self.procs, []
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if not self.asked:
                proc.kill()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


# --------------------------------------------------------------------------------------------
# The worker's side.


def _serve() -> None:
    """A worker's life: import matplotlib, then import the modules it is told to preload and
    answer figure requests, in the order they come, until the run closes its input."""
    global _share
    os.nice(10)  # while the run computes, its threads come first
    # Ctrl-C reaches the whole process group: the run stops and closes the workers' input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out_fd = os.dup(1)  # answers go here; anything printed goes to stderr
    index = int(os.environ.pop("COLLAPSE_JAX_WORKER_INDEX"))
    # The figure code's warnings once, from the first worker, not once per worker.
    quiet = os.open(os.devnull, os.O_WRONLY) if index else 2
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    from collapse_jax.core.report import pyplot

    plt = pyplot()
    fig = plt.figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "0")  # loads the font: the first text a process draws costs the most
    fig.canvas.draw()
    plt.close(fig)
    in_fd = sys.stdin.fileno()
    while True:
        message = _receive(in_fd)
        if message is None:
            # The run closed our input: every answer is sent and every figure file written
            # (atomically) and closed. The interpreter's teardown with matplotlib loaded took
            # 0.25-0.43 s, which the run waits for in ``Pool.close``; nothing depends on it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if message[0] == "preload":
            for name in message[1]:
                with contextlib.suppress(Exception):  # a request that needs it reports the error
                    importlib.import_module(name)
            continue
        _, share, count, request = message  # this worker's place among the count
        _share = (share, count)
        _seen.clear()
        _drawn.clear()
        try:
            make_figures, path = pickle.loads(request)
            answer = ("ok", make_figures(path), list(_seen), list(_drawn))
        except BaseException as e:
            answer = ("error", repr(e))
        finally:
            _share = None
        _send(out_fd, answer)
