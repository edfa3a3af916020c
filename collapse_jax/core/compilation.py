"""The persistent XLA compilation cache, on by default for the CLI and the Python API.

A second run of the same study reuses the compiled programs of the first instead of compiling
them again. The cache lives under the user's cache directory (``$XDG_CACHE_HOME`` or
``~/.cache``), in a folder per machine type (compiled CPU code depends on the processor's
features), and is JAX's own persistent cache: entries are keyed by the program, the compiler
options and the JAX/XLA versions, and a cached program is the one XLA would compile (results are
identical with and without the cache; tested). JAX 0.10 writes an entry in place, not
atomically: without a size budget another process can read a half-written entry, and
deserialising it crashed a test worker (segmentation fault). With a budget
(:data:`MAX_CACHE_BYTES`) JAX takes a file lock around every read and write (and evicts the least
recently used entries beyond it), so runs that share the cache concurrently are safe. ``COLLAPSE_JAX_CACHE_DIR`` moves it; ``COLLAPSE_JAX_NO_CACHE=1`` or the CLI's
``--no-cache`` switches it off.

Beside it, the program store (:func:`keyed`, :func:`program`) keeps a study's compiled start and
chunk programs whole, under a key made from the study's settings rather than from the lowered
program, so a warm start loads them without tracing or lowering them (see ARCHITECTURE.md).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import re
import threading
from pathlib import Path
from typing import Any

#: Every compiled program is kept: with a time threshold, whether a program is cached would
#: depend on how long its compilation happened to take (the machine's load), so a warm run could
#: still compile programs that a cold run left out.
MIN_COMPILE_SECONDS = 0.0
#: Size budget of the cache; setting one also makes JAX lock the cache around reads and writes.
MAX_CACHE_BYTES = 8 * 2**30


@functools.cache  # read once: the program store's key asks for it at every chunk
def _machine_tag() -> str:
    """The processor type and a digest of its feature flags (Linux), e.g. ``x86_64-3fa2c1``."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


def cache_dir() -> Path | None:
    """Where compiled programs are kept, or None when the cache is switched off."""
    if os.environ.get("COLLAPSE_JAX_NO_CACHE", "") not in ("", "0"):
        return None
    root = os.environ.get("COLLAPSE_JAX_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "collapse_jax" / "xla" / _machine_tag()


def enable(enabled: bool = True) -> Path | None:
    """Switch JAX's persistent compilation cache on at :func:`cache_dir` (before the first
    compilation of the process); returns the directory, or None when it stays off."""
    path = cache_dir() if enabled else None
    if path is None:
        return None
    import jax

    path.mkdir(parents=True, exist_ok=True)
    repair(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return path


def repair(path: Path) -> int:
    """Give every cached program without an access-time record one (its file's modification
    time); returns how many were repaired.

    With a size budget JAX keeps a ``KEY-atime`` file beside each ``KEY-cache`` entry and reads
    them all before every write: one entry without it (written by a version of this package
    that set no budget, or by a process killed between the two writes) makes every later write
    fail with a warning, so nothing new would be cached. Done under JAX's own lock file."""
    import filelock

    with filelock.FileLock(path / ".lockfile", timeout=60):
        missing = [
            p
            for p in path.glob("*-cache")
            if not (path / (p.name.removesuffix("-cache") + "-atime")).exists()
        ]
        for p in missing:
            stamp = p.stat().st_mtime_ns.to_bytes(8, "little")
            (path / (p.name.removesuffix("-cache") + "-atime")).write_bytes(stamp)
    return len(missing)


# --------------------------------------------------------------------------------------------
# Compiled programs kept whole: a warm start without tracing or lowering

#: Folder of the program store inside JAX's cache directory.
PROGRAMS = "programs"
#: Programs kept in the store; beyond it the least recently used are deleted.
MAX_PROGRAMS = 256
_MAGIC = b"collapse_jax program 2\n"
_loaded: dict[str, Any] = {}  # key -> compiled program, this process
_MAX_LOADED = 32
_options: dict[str, bytes] = {}  # key -> compile options caught when it was compiled here
#: What this process did with keyed programs (for tests and benchmarks).
stats = {"loaded": 0, "compiled": 0, "unkeyed": 0, "rejected": 0, "prefetched": 0}


class _Unkeyable(TypeError):
    pass


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()


@functools.cache
def source_digest() -> str:
    """A digest of every Python source file of this package (any change to the code that builds
    a program makes a new key)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _token(x: Any) -> str:
    """A text that determines ``x`` exactly (arrays by the digest of their bytes; a string that
    names a file also by the digest of its contents); raises :class:`_Unkeyable` for anything
    else, e.g. a function, whose behaviour no text of it pins down."""
    import numpy as np  # here: the CLI's `list` and `--help` import this module, not NumPy

    if x is None or isinstance(x, (bool, int, float, complex, bytes)):
        return repr(x)
    if isinstance(x, str):
        if x and len(x) < 4096 and os.path.isfile(x):
            return f"{x!r}@{_digest(Path(x).read_bytes())}"
        return repr(x)
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(x)
        return f"nd({a.dtype},{a.shape},{_digest(a.tobytes())})"
    name = f"{type(x).__module__}.{type(x).__qualname__}"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = (f"{f.name}={_token(getattr(x, f.name))}" for f in dataclasses.fields(x))
        return f"{name}({','.join(fields)})"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"{name}({','.join(f'{k}={_token(getattr(x, k))}' for k in x._fields)})"
    if isinstance(x, (tuple, list)):
        return f"{name}[{','.join(_token(v) for v in x)}]"
    if isinstance(x, dict):
        items = sorted((_token(k), _token(v)) for k, v in x.items())
        return f"{name}{{{','.join(f'{k}:{v}' for k, v in items)}}}"
    raise _Unkeyable(name)


def _field_ids(family) -> tuple[int, ...]:
    return tuple(id(getattr(family, f)) for f in family._fields if f != "cache_key")


def keyed(family, *parts: Any, drop: tuple[str, ...] = ("seed",)):
    """``family`` with a key for the program store: ``parts`` are everything its functions are
    built from (a study's name and config, a sweep, ...): dataclasses, named tuples, arrays,
    numbers and strings (a file named by a string counts by its contents). Config fields in
    ``drop`` are left out: the seed reaches the programs as their key argument, so runs with
    other seeds share programs. The key also holds the package's source digest. The key is kept
    only while the family's functions are the ones it was made for: a field replaced later
    (``family._replace(reduce=...)``) unkeys it. Parts that cannot be keyed leave it unkeyed."""

    def strip(p):
        if dataclasses.is_dataclass(p) and not isinstance(p, type):
            return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in drop}
        return p

    family = family._replace(cache_key=None)
    try:
        text = _token([type(p).__qualname__ if dataclasses.is_dataclass(p) else "" for p in parts])
        text += _token([strip(p) for p in parts])
    except _Unkeyable:
        return family
    return family._replace(cache_key=(_digest(text + source_digest()), _field_ids(family)))


def _environment() -> str:
    """What, besides the program's own inputs, shapes a compiled program: versions, the backend
    and its devices, the configuration options that change tracing, XLA flags, the processor."""
    import jax
    import jaxlib

    cfg = jax.config
    devices = jax.devices()
    return repr(
        (
            jax.__version__,
            jaxlib.__version__,
            devices[0].client.platform,
            devices[0].client.platform_version,
            [(d.id, d.device_kind) for d in devices],
            bool(cfg.jax_enable_x64),
            str(cfg.jax_default_prng_impl),
            bool(cfg.jax_threefry_partitionable),
            str(cfg.jax_default_matmul_precision),
            os.environ.get("XLA_FLAGS", ""),
            _machine_tag(),
        )
    )


def _signature(args: Any) -> str:
    """The avals and placements of a program's arguments (what a compiled program accepts)."""
    import jax
    import numpy as np

    leaves, tree = jax.tree.flatten(args)
    parts = [str(tree)]
    for x in leaves:
        if isinstance(x, jax.Array):
            parts.append(f"{x.aval.str_short()}:{x.aval.weak_type}:{x.sharding}")
        else:
            a = np.asarray(x)
            parts.append(f"host:{a.dtype}{a.shape}:{type(x).__name__}")
    return "|".join(parts)


def program(family, name: str, jitted, static: Any, args: tuple):
    """The program ``jitted`` (a ``jax.jit`` of the family's ``name`` program, closed over
    ``static``) for ``args``: for a keyed family with the compilation cache on, the compiled
    program from the store (no trace, no lowering: a warm start of the discrete demo config
    spent 1.2 s of its 5.8 s tracing and lowering its two programs), compiled and kept there on
    a miss; otherwise ``jitted`` itself. Same program either way: the one XLA compiles from the
    same lowering (results identical; tested).

    The store also remembers which program a run asked for next (:func:`_follow`), and a warm
    run loads that one in a background thread while it runs this one."""
    store = _store_dir(family)
    if store is None:
        stats["unkeyed"] += 1
        return jitted
    key = _digest(
        "\0".join(
            (family.cache_key[0], name, repr(static), _signature(args), _environment(),
             repr(family.compiler_options))
        )
    )  # fmt: skip
    if key in _loaded:
        return _loaded[key]
    path = store / f"{name}-{key}.bin"
    _follow(path)
    prefetched = _pending.pop(path, None)
    if prefetched is not None:
        thread, box = prefetched
        thread.join()
        compiled = box[0] if box else None
        stats["prefetched"] += compiled is not None
    else:
        compiled = _read(path)
    if compiled is None:
        compiled = _compile_and_keep(key, path, jitted, args)
    else:
        stats["loaded"] += 1
        compiled = _FirstCall(compiled, key, path, jitted)
    if len(_loaded) >= _MAX_LOADED:
        _loaded.pop(next(iter(_loaded)))
    _loaded[key] = compiled
    return compiled


# The order in which a run asked for its programs, kept beside the store: a file per program,
# naming the program asked for after it. A discrete run asks for its start program, then its
# chunk at each compaction width (K = 50: four programs); loading one took 0.2-0.7 s of a warm
# run, in the run's own thread, between two programs. Deserialising releases the GIL, so the
# next one loads while this one computes. A guess that turns out wrong (another run's order)
# costs only the background load: the run loads or compiles what it asks for, as before.
_NAME = re.compile(r"[a-z_]+-[0-9a-f]{64}\.bin")
_pending: dict[Path, tuple[threading.Thread, list]] = {}  # path -> (loader, [program or None])
_last: list[Path] = []  # the program this process asked for last


def _order_dir(store: Path) -> Path:
    return store.parent / f"{store.name}-order"


def _follow(path: Path) -> None:
    """Note that ``path`` was asked for after the previous program, and start loading the one
    that followed ``path`` last time, if the store holds it."""
    order = _order_dir(path.parent)
    if _last and _last[0].parent == path.parent and _last[0] != path:
        note = order / (_last[0].stem + ".next")
        try:
            known = note.read_text()
        except OSError:
            known = None
        if known != path.name:
            from collapse_jax.core.runs import atomic_path

            with contextlib.suppress(OSError), atomic_path(note) as tmp:
                Path(tmp).write_text(path.name)
    _last[:] = [path]
    try:
        name = (order / (path.stem + ".next")).read_text()
    except OSError:
        return
    following = path.parent / name
    if not _NAME.fullmatch(name) or following in _pending or not following.is_file():
        return
    if following.stem.split("-", 1)[1] in _loaded:  # already loaded in this process
        return
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_read(following)), daemon=True)
    thread.start()
    _pending[following] = (thread, box)


@atexit.register
def _join_pending() -> None:
    """A load still under way ends before the interpreter tears down the runtime it uses."""
    for thread, _ in list(_pending.values()):
        thread.join()


def _compile_and_keep(key: str, path: Path, jitted, args):
    compiled, options, served = _compile(jitted, args)
    options = _options.setdefault(key, options) if options else _options.get(key)
    _write(path, compiled, options, served)
    stats["compiled"] += 1
    return compiled


class _FirstCall:
    """A program loaded from the store, until its first call has run to the end.

    A stored program that loads but fails when run (XLA:CPU found a function missing from an
    incompletely serialised program: "Function wrapped_iota not found") is deleted, compiled
    again and kept, and the call is made again with the new program: a bad entry costs one
    compilation, never the run. The first call waits for its results, which the run loop reads
    at once anyway; later calls go to the program itself."""

    def __init__(self, compiled, key: str, path: Path, jitted):
        self.compiled, self.key, self.path, self.jitted = compiled, key, path, jitted

    def __call__(self, *args):
        import jax

        try:
            return jax.block_until_ready(self.compiled(*args))
        except jax.errors.JaxRuntimeError:
            stats["rejected"] += 1
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.compiled = _compile_and_keep(self.key, self.path, self.jitted, args)
            return self.compiled(*args)
        finally:
            if _loaded.get(self.key) is self:
                _loaded[self.key] = self.compiled


def _store_dir(family) -> Path | None:
    """The store's folder when ``family`` is keyed (and still the family it was keyed for) and
    JAX's compilation cache is on in a single-process run; else None."""
    import jax

    key = getattr(family, "cache_key", None)
    root = jax.config.jax_compilation_cache_dir
    if key is None or not root or key[1] != _field_ids(family) or jax.process_count() > 1:
        return None
    return Path(root) / PROGRAMS


def _compile(jitted, args):
    """``jitted.lower(*args).compile()``; the serialised XLA compile options JAX passed for it
    (None when JAX took the program from its in-memory cache, or has no such hook); and, when
    JAX's persistent cache served the program, ``{id(executable): (executable, bytes)}`` with
    the bytes that cache holds for it (None where they could not be read).

    The options are needed to load the program again: JAX's serialised program does not hold
    them, and XLA's CPU runtime loads a program compiled with non-default options (the discrete
    sampler's emitters) only when given them ("Function ..._kernel not found" at its first call
    otherwise). JAX's own persistent cache passes them the same way; they are caught here at the
    one internal call that receives them rather than rebuilt.

    The bytes are needed because XLA:CPU serialises a program that it loaded, rather than
    compiled, only in part: such a copy was a quarter smaller and failed at its first call
    ("Function wrapped_iota not found"). So a program JAX's cache served is kept in the store as
    the bytes JAX's cache holds, which were written from the compiled program."""
    from jax._src import compilation_cache, compiler

    seen, served = [], {}
    real = getattr(compiler, "compile_or_get_cached", None)
    real_get = getattr(compilation_cache, "get_executable_and_time", None)

    def spy(backend, computation, devices, compile_options, *rest, **kw):
        seen.append(compile_options)
        return real(backend, computation, devices, compile_options, *rest, **kw)

    def get(cache_key, compile_options, backend, *rest, **kw):
        executable, seconds = real_get(cache_key, compile_options, backend, *rest, **kw)
        if executable is not None:
            served[id(executable)] = (executable, _cached_bytes(cache_key, backend))
        return executable, seconds

    if real is not None:
        compiler.compile_or_get_cached = spy
    if real_get is not None:
        compilation_cache.get_executable_and_time = get
    try:
        compiled = jitted.lower(*args).compile()
    finally:
        if real is not None:
            compiler.compile_or_get_cached = real
        if real_get is not None:
            compilation_cache.get_executable_and_time = real_get
    return compiled, (seen[0].SerializeAsString() if len(seen) == 1 else None), served


def _cached_bytes(cache_key: str, backend) -> bytes | None:
    """The serialised program JAX's persistent cache holds under ``cache_key``, or None."""
    try:
        from jax._src import compilation_cache as cc

        blob = cc._get_cache(backend).get(cache_key)
        return cc.extract_executable_and_time(cc.decompress_executable(blob))[0]
    except Exception:  # another JAX's internals: the program is then not kept
        return None


def _serialize(compiled, served) -> tuple:
    """``jax.experimental.serialize_executable.serialize(compiled)``, with the executables JAX's
    cache served written as the bytes it holds (see :func:`_compile`)."""
    from jax.experimental import serialize_executable as se

    if not served:
        return se.serialize(compiled)
    plain = se._JaxPjrtPickler

    class Pickler(plain):
        def persistent_id(self, obj):
            if id(obj) in served:
                data = served[id(obj)][1]
                if data is None:
                    raise ValueError("the bytes of a cached program could not be read")
                return ("exec", data)
            return super().persistent_id(obj)

    se._JaxPjrtPickler = Pickler
    try:
        return se.serialize(compiled)
    finally:
        se._JaxPjrtPickler = plain


class _Unpickler(pickle.Unpickler):
    """Reads what ``jax.experimental.serialize_executable.serialize`` pickled (its persistent
    ids: 'exec', 'device', 'client'), loading the executable with its compile options."""

    def __init__(self, file, backend, options):
        super().__init__(file)
        from jax._src.lib import xla_client

        self.backend, self.options = backend, options
        self.devices = xla_client.DeviceList(tuple(backend.devices()))
        self.by_id = {d.id: d for d in backend.devices()}

    def persistent_load(self, pid):
        if pid[0] == "exec":
            return self.backend.deserialize_executable(pid[1], self.devices, self.options)
        if pid[0] == "device":
            return self.by_id[pid[1]]
        if pid[0] == "client":
            return self.backend
        raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")


def _read(path: Path):
    """The compiled program stored at ``path``, or None (absent, damaged or not loadable)."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 64
    if blob[: len(_MAGIC)] != _MAGIC or _digest(blob[head:]).encode() != blob[len(_MAGIC) : head]:
        return None
    try:
        import io

        import jax
        from jax._src.lib import xla_client

        payload, in_tree, out_tree, options = pickle.loads(blob[head:])
        options = xla_client.CompileOptions.ParseFromString(options)
        backend = jax.devices()[0].client
        unloaded, args_flat, no_kwargs = _Unpickler(io.BytesIO(payload), backend, options).load()
        args_info = in_tree.unflatten(args_flat)
        compiled = jax.stages.Compiled(
            unloaded.load(), [], args_info, out_tree, no_kwargs=no_kwargs
        )
    except Exception:  # a store written by another version: compile again
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return compiled


def _write(path: Path, compiled, options: bytes | None, served=None) -> None:
    """Keep ``compiled`` at ``path`` (atomically, with a checksum); a program that cannot be
    serialised, or a full disk, only means the next run compiles it again."""
    if options is None:
        return
    try:
        body = _serialize(compiled, served or {})
        body = pickle.dumps((*body, options), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return
    from collapse_jax.core.runs import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(_MAGIC + _digest(body).encode() + body)
        _evict(path.parent)
    except OSError:
        return


def _evict(folder: Path) -> None:
    """Delete the least recently used programs beyond :data:`MAX_PROGRAMS`."""
    entries = []
    for p in folder.glob("*.bin"):
        with contextlib.suppress(OSError):
            entries.append((p.stat().st_mtime, p))
    for _, p in sorted(entries)[: max(0, len(entries) - MAX_PROGRAMS)]:
        with contextlib.suppress(OSError):
            p.unlink()
        with contextlib.suppress(OSError):
            (_order_dir(folder) / (p.stem + ".next")).unlink()
