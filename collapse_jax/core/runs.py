"""Run directories: config.json, metric arrays, summary.json, all written atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from collapse_jax.core.errors import ConfigError


def _to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, NumPy/JAX arrays and scalars into JSON-compatible values.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` or ``"nan"`` so the file stays
    valid JSON (``json`` would otherwise write the non-standard ``Infinity``).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__") and not isinstance(obj, str | bytes):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return _to_jsonable(arr.item())
        if arr.dtype.kind in "biu" or (arr.dtype.kind == "f" and np.isfinite(arr).all()):
            return arr.tolist()  # nothing to replace: skip the per-element walk
        return [_to_jsonable(v) for v in arr.tolist()]
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item())
    return obj


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the same directory; rename it onto ``path`` only on success.

    A crash part-way leaves the old file (or nothing) in place, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_to_jsonable(obj), indent=2) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, raising :class:`ConfigError` naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"corrupt JSON in {path}: {e}") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_arrays(path: str | os.PathLike, **arrays) -> Path:
    """Atomically write NumPy arrays to an ``.npz`` file."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` file written by :func:`write_arrays`; clear error if missing or corrupt."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}") from None
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError, ...
        raise ConfigError(f"corrupt array file {path}: {e}") from None


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Atomically save a matplotlib figure as PNG and close it.

    The figure is laid out by matplotlib's tight layout engine during the one draw that writes
    the file (``bbox_inches="tight"`` would draw it twice, a third of a report's figure time),
    in one pass: the engine's default ``rect`` makes it measure every axes twice, for the same
    subplot parameters on these figures (about a tenth of the figure time).
    """
    from collapse_jax.core import figures

    if not figures.owns(path):  # a figure worker's share is another figure (core/figures.py)
        from collapse_jax.core.report import pyplot

        pyplot().close(fig)
        return Path(path)
    return write_figure(fig, path, dpi)


def write_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """:func:`save_figure` for a caller that has already asked ``figures.owns(path)``."""
    from matplotlib.layout_engine import TightLayoutEngine

    from collapse_jax.core.report import pyplot

    plt = pyplot()
    if fig.get_layout_engine() is None:
        fig.set_layout_engine(TightLayoutEngine(rect=None))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def series(generation, mean, stderr, quantiles=None, levels=(0.1, 0.5, 0.9)) -> dict[str, list]:
    """The summary.json form of a per-generation metric: generation, mean, stderr and, when
    ``quantiles`` (records × levels) is given, one list per level (``q10``, ``q50``, ``q90``)."""
    out = {
        "generation": _to_jsonable(np.asarray(generation)),
        "mean": _to_jsonable(np.asarray(mean)),
        "stderr": _to_jsonable(np.asarray(stderr)),
    }
    if quantiles is not None:
        q = np.asarray(quantiles)
        for j, level in enumerate(levels):
            out[f"q{round(100 * level)}"] = _to_jsonable(q[..., j])
    return out


class ScanCheckpoint(NamedTuple):
    """Where :func:`run_generations` keeps the chains' state and the recorded trace at chunk
    boundaries (one ``.npz``, replaced atomically), and whether to continue from it."""

    path: Any  # a pathlib.Path
    resume: bool = False  # start from the file when it exists (else start afresh)
    every_seconds: float = 30.0  # at most one save per this many seconds (0: every chunk)


class RunDir:
    """A run directory: ``config.json``, ``metrics.npz``, ``summary.json``, figures, ``report.md``.

    ``RunDir(None)`` keeps everything in memory instead (the Python API's default): nothing is
    written, figures are skipped, and the config, arrays, summary, report and final state are
    attributes. A directory run keeps the same attributes beside its files.
    """

    def __init__(self, path: str | os.PathLike | None, resume: bool = False):
        self.path = None if path is None else Path(path)
        self.resume = resume  # continue the interrupted run in this directory
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
        self.config: dict | None = None
        self.summary: Mapping[str, Any] | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.report: str | None = None
        self.final_state: Any = None  # the last generation's per-chain state, when a study keeps it

    @classmethod
    def of(cls, target: RunDir | str | os.PathLike | None) -> RunDir:
        """``target`` itself when it is a RunDir, else a RunDir at that path (None: in memory)."""
        return target if isinstance(target, RunDir) else cls(target)

    @classmethod
    def start(cls, target: RunDir | str | os.PathLike | None, config: Any, study: str) -> RunDir:
        """:meth:`of` ``target``, with the run's ``config.json`` written first."""
        run_dir = cls.of(target)
        if run_dir.resume and run_dir.path is not None:
            run_dir.check_same_config(config, study)
        run_dir.write_config(config, study)
        return run_dir

    def check_same_config(self, config: Any, study: str) -> None:
        """A resumed run must have the configuration it was started with (ConfigError naming
        the fields that differ)."""
        path = self.file("config.json")
        if not path.exists():
            return
        old = read_json(path)
        new = json.loads(json.dumps(_to_jsonable({"study": study, "config": config})))
        if old.get("study") != study:
            raise ConfigError(f"cannot resume {self.path}: it holds a {old.get('study')!r} run")
        diff = [k for k in new["config"] if old.get("config", {}).get(k) != new["config"][k]]
        if diff:
            raise ConfigError(
                f"cannot resume {self.path}: the configuration differs in {', '.join(diff)}"
            )

    def scan_checkpoint(self):
        """Where a scan study keeps its chunk checkpoint (None for an in-memory run); the save
        interval is ``$COLLAPSE_JAX_CHECKPOINT_SECONDS`` (default 30 s)."""
        if self.path is None:
            return None
        every = float(os.environ.get("COLLAPSE_JAX_CHECKPOINT_SECONDS", "30"))
        return ScanCheckpoint(self.path / "chains_checkpoint.npz", self.resume, every)

    def file(self, name: str) -> Path:
        if self.path is None:
            raise ValueError(f"an in-memory run has no file {name!r}")
        return self.path / name

    def write_config(self, config: Any, study: str) -> Path | None:
        self.config = {"study": study, "config": config}
        return write_json(self.file("config.json"), self.config) if self.path else None

    def write_summary(self, summary: Mapping[str, Any]) -> Path | None:
        self.summary = summary
        return write_json(self.file("summary.json"), summary) if self.path else None

    def write_metrics(self, name: str = "metrics.npz", **arrays) -> Path | None:
        if name == "metrics.npz":
            self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return write_arrays(self.file(name), **arrays) if self.path else None

    def figures(self, make_figures) -> list[tuple[str, str]]:
        """``make_figures(path)`` (drawn from the saved arrays, by the figure workers when the
        command started some: :mod:`collapse_jax.core.figures`); none for an in-memory run."""
        if self.path is None:
            return []
        from collapse_jax.core import figures

        return figures.draw(make_figures, self.path)

    def write_report(self, text: str) -> Path | None:
        self.report = text
        return write_text(self.file("report.md"), text) if self.path else None
