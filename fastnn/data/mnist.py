"""MNIST: IDX reader, checksum verification and data-directory search.

The four MNIST files are IDX files (big-endian header, then raw bytes):

* images: magic 2051, then ``n, rows, cols`` as uint32, then ``n*rows*cols``
  uint8 pixels, row-major -> array ``(n, rows, cols)`` uint8;
* labels: magic 2049, then ``n`` as uint32, then ``n`` uint8 labels -> ``(n,)``.

Each file may sit in a directory either gzip-compressed (``name.gz``) or raw
(``name``). Checksums are SHA-256 of the *decompressed* content, so the official
``.gz`` files and any recompressed copy are both accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FILES",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
    "MNIST",
    "MNISTError",
    "RAW_SHA256",
    "candidate_dirs",
    "default_cache_dir",
    "find_file",
    "find_mnist_dir",
    "has_mnist_files",
    "load_mnist",
    "parse_idx",
    "read_idx",
]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

#: Split/kind -> file name (without ``.gz``).
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the official, decompressed MNIST files.
RAW_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

ENV_DATA_DIR = "FASTNN_DATA_DIR"


class MNISTError(ValueError):
    """A missing, truncated, corrupt or unverifiable MNIST file."""


@dataclass(frozen=True)
class MNIST:
    """The MNIST arrays: images ``(n, 28, 28)`` uint8, labels ``(n,)`` uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path


def _magic_kind(magic: int) -> str:
    return {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(magic, "unknown")


def parse_idx(raw: bytes, name: str = "<bytes>", expected_magic: int | None = None) -> np.ndarray:
    """Parse decompressed IDX bytes of MNIST images (magic 2051) or labels (2049).

    Returns ``(n, rows, cols)`` uint8 for images, ``(n,)`` uint8 for labels.
    Raises :class:`MNISTError` naming ``name`` for a bad magic number, a header
    that does not fit the byte length, or trailing bytes.
    """
    if len(raw) < 8:
        raise MNISTError(f"{name}: truncated: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise MNISTError(
            f"{name}: bad magic number {magic} (0x{magic:08x}); expected "
            f"{IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise MNISTError(
            f"{name}: bad magic number {magic} ({_magic_kind(magic)}); expected "
            f"{expected_magic} ({_magic_kind(expected_magic)})"
        )
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTError(f"{name}: truncated: {len(raw)} bytes, header needs {header}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise MNISTError(
            f"{name}: truncated: header says shape {dims} ({expected} bytes), "
            f"file has {len(raw)} bytes"
        )
    if len(raw) > expected:
        raise MNISTError(
            f"{name}: {len(raw) - expected} unexpected trailing bytes after shape {dims}"
        )
    # Copy so the array owns writable memory instead of viewing the bytes object.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (gzip detected by its magic bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as gz:
                    return gz.read()
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise MNISTError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    except OSError as exc:
        raise MNISTError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def read_idx(
    path: str | os.PathLike,
    expected_sha256: str | None = None,
    expected_magic: int | None = None,
) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a uint8 array; see :func:`parse_idx`.

    With ``expected_sha256`` the SHA-256 of the decompressed content must match,
    else :class:`MNISTError` is raised naming the file and both digests.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256.lower():
            raise MNISTError(
                f"{path}: checksum mismatch: SHA-256 of the decompressed content is "
                f"{digest}, expected {expected_sha256.lower()} (corrupt or not the "
                f"official MNIST file)"
            )
    return parse_idx(raw, str(path), expected_magic)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastnn/mnist``, or ``~/.cache/fastnn/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastnn" / "mnist"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for MNIST, in order: ``data_dir``, ``$FASTNN_DATA_DIR``,
    the user cache dir."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(default_cache_dir())
    return dirs


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name.gz`` or ``directory/name`` (gzip preferred), else None."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def has_mnist_files(directory: Path) -> bool:
    """Whether ``directory`` holds all four MNIST files (gzipped or not)."""
    return all(find_file(directory, name) is not None for name in FILES.values())


def find_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of :func:`candidate_dirs` holding all four files, else None.

    A directory missing any file is skipped, so an incomplete ``data_dir`` falls
    through to ``$FASTNN_DATA_DIR`` and the cache rather than mixing sources.
    """
    for directory in candidate_dirs(data_dir):
        if has_mnist_files(directory):
            return directory
    return None


def _missing_message(dirs: list[Path]) -> str:
    names = ", ".join(f"{n}[.gz]" for n in FILES.values())
    searched = "; ".join(str(d) for d in dirs)
    return (
        f"MNIST files not found (need {names}). Searched: {searched}. "
        f"Point fastnn at local copies with --data-dir DIR or the {ENV_DATA_DIR} "
        f"environment variable."
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: list[str] | None = None,
    checksums: Mapping[str, str | None] | None = None,
    timeout: float = 30.0,
) -> MNIST:
    """Find (or download) and read the four MNIST files.

    Search order: ``data_dir``, ``$FASTNN_DATA_DIR``, then the cache dir
    (:func:`default_cache_dir`). If none holds all four files and ``download``
    is true, the missing ones are downloaded into the cache dir from ``mirrors``
    (default: ``$FASTNN_MNIST_MIRRORS`` or :data:`fastnn.data.download.DEFAULT_MIRRORS`).

    ``checksums`` maps file name (without ``.gz``) to the expected SHA-256 of
    its decompressed content, or None to skip the check; it defaults to the
    official :data:`RAW_SHA256`. Images and label counts must agree per split.

    The returned arrays are read-only and cached for this process while the
    files are unchanged; copy them before modifying.
    """
    sums: Mapping[str, str | None] = RAW_SHA256 if checksums is None else checksums
    dirs = candidate_dirs(data_dir)
    directory = find_mnist_dir(data_dir)
    if directory is None:
        if not download:
            raise MNISTError(_missing_message(dirs))
        from fastnn.data.download import download_mnist

        directory = download_mnist(
            default_cache_dir(), mirrors=mirrors, checksums=sums, timeout=timeout
        )

    paths: dict[str, Path] = {}
    for key, name in FILES.items():
        path = find_file(directory, name)
        if path is None:  # removed between the search and now
            raise MNISTError(_missing_message(dirs))
        paths[key] = path
    cache_key = _cache_key(paths, sums)
    cached = _CACHE.get(cache_key)
    if cached is not None:
        return cached

    arrays: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
        arrays[key] = read_idx(path, sums.get(FILES[key]), magic)
        # Shared by every later load_mnist call in this process: keep it immutable.
        arrays[key].flags.writeable = False

    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise MNISTError(
                f"{directory}: {split} split has {images.shape[0]} images but "
                f"{labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) > 9:
            raise MNISTError(
                f"{directory}: {split} labels contain {int(labels.max())}, expected 0..9"
            )
    result = MNIST(directory=directory, **arrays)
    _CACHE.clear()  # hold one dataset at most (~55 MB)
    _CACHE[cache_key] = result
    return result


# Decompressing and hashing the four files takes ~1 s; repeated loads in one
# process (evaluate after train, tests) reuse the arrays while the files are
# unchanged (same path, size and mtime).
_CACHE: dict[tuple, MNIST] = {}


def _cache_key(paths: Mapping[str, Path], sums: Mapping[str, str | None]) -> tuple:
    stats = []
    for key in sorted(paths):
        st = paths[key].stat()
        stats.append((str(paths[key].resolve()), st.st_size, st.st_mtime_ns))
    return (tuple(stats), tuple(sorted(sums.items())))
