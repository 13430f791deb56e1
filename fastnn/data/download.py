"""Download the MNIST files into the cache directory, verified and atomic.

Each missing file is fetched as ``<mirror>/<name>.gz`` from the mirrors in
order until one yields content whose decompressed SHA-256 matches. The bytes
are written with :func:`fastnn._io.write_atomic` (a ``.part`` file next to the
target, fsynced and renamed into place), so an interrupted download never
leaves a half-written file under the real name.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path

from fastnn._io import write_atomic
from fastnn.data.mnist import (
    ENV_DATA_DIR,
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    RAW_SHA256,
    MNISTError,
    find_file,
    parse_idx,
)

__all__ = ["DEFAULT_MIRRORS", "ENV_MIRRORS", "MNISTDownloadError", "download_mnist", "mirrors"]

#: Public MNIST mirrors, tried in this order.
DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Environment variable overriding the mirror list (comma or space separated URLs).
ENV_MIRRORS = "FASTNN_MNIST_MIRRORS"

# A generous cap: the largest official file is ~9.9 MB compressed. It keeps a
# misbehaving server from filling memory.
_MAX_BYTES = 64 * 1024 * 1024


class MNISTDownloadError(MNISTError):
    """No mirror delivered a verified copy of an MNIST file."""


def mirrors(override: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The mirror list: ``override``, else ``$FASTNN_MNIST_MIRRORS``, else the defaults."""
    if override is not None:
        chosen = list(override)
    else:
        env = os.environ.get(ENV_MIRRORS, "")
        chosen = env.replace(",", " ").split() or list(DEFAULT_MIRRORS)
    if not chosen:
        raise ValueError("mirrors must name at least one URL")
    return [m if m.endswith("/") else m + "/" for m in chosen]


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) mirrors
        data = response.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise MNISTError(f"{url}: more than {_MAX_BYTES} bytes, refusing")
    return data


def _verify(payload: bytes, url: str, name: str, sha256: str | None) -> None:
    """Raise MNISTError unless ``payload`` decompresses to a valid, matching IDX file."""
    try:
        raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    except (EOFError, OSError, zlib.error) as exc:
        raise MNISTError(f"{url}: corrupt or truncated gzip data ({exc})") from exc
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256.lower():
            raise MNISTError(f"{url}: checksum mismatch: got {digest}, expected {sha256.lower()}")
    magic = IMAGES_MAGIC if "images" in name else LABELS_MAGIC
    parse_idx(raw, url, magic)


def _existing_ok(path: Path, name: str, sha256: str | None) -> bool:
    try:
        _verify(path.read_bytes(), str(path), name, sha256)
    except (MNISTError, OSError):
        return False
    return True


def download_mnist(
    dest: str | os.PathLike,
    *,
    mirrors: list[str] | tuple[str, ...] | None = None,
    checksums: Mapping[str, str | None] | None = None,
    timeout: float = 30.0,
    quiet: bool = False,
) -> Path:
    """Download whichever MNIST files ``dest`` lacks (or holds corrupt) and return ``dest``.

    ``mirrors``: base URLs tried in order (default: :func:`mirrors`).
    ``checksums``: file name -> SHA-256 of the decompressed content (None skips
    the check); default the official :data:`~fastnn.data.mnist.RAW_SHA256`.
    ``timeout``: seconds per connection attempt. Raises :class:`MNISTDownloadError`
    listing every attempt, with a hint on pointing fastnn at local files.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    sums: Mapping[str, str | None] = RAW_SHA256 if checksums is None else checksums
    urls = _mirror_list(mirrors)
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MNISTDownloadError(f"cannot create the MNIST cache dir {dest}: {exc}") from exc

    for name in FILES.values():
        sha = sums.get(name)
        existing = find_file(dest, name)
        if existing is not None and _existing_ok(existing, name, sha):
            continue
        errors: list[str] = []
        for base in urls:
            url = f"{base}{name}.gz"
            if not quiet:
                print(f"fastnn: downloading {url}", file=sys.stderr)
            try:
                payload = _fetch(url, timeout)
                _verify(payload, url, name, sha)
            except (urllib.error.URLError, OSError, MNISTError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                errors.append(f"  {url}: {reason}")
                continue
            filename = f"{name}.gz" if payload[:2] == b"\x1f\x8b" else name
            write_atomic(dest / filename, payload, suffix=".part")
            if existing is not None and existing.name != filename:
                # A stale corrupt .gz would shadow the fresh raw file in find_file.
                existing.unlink(missing_ok=True)
            break
        else:
            raise MNISTDownloadError(
                f"could not download {name}.gz from any mirror:\n"
                + "\n".join(errors)
                + f"\nIf you are offline, put the four MNIST files (gzip or raw) in a "
                f"directory and pass --data-dir DIR or set {ENV_DATA_DIR}=DIR."
            )
    return dest


# ``mirrors`` is both a public function and download_mnist's keyword; keep an alias.
_mirror_list = mirrors
