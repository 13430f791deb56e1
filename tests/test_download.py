"""Downloading MNIST through a local 127.0.0.1 HTTP server (never the real network)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fastnn.data import MNISTDownloadError, download_mnist, load_mnist
from fastnn.data.download import DEFAULT_MIRRORS, mirrors
from fastnn.data.mnist import FILES, default_cache_dir

_LOCAL = ("127.0.0.1", "localhost", "::1")


def write_split_files(directory: Path, n_train: int = 12, n_test: int = 5) -> dict[str, str]:
    """Four small synthetic MNIST .gz files; returns {name: SHA-256 of the raw content}."""
    rng = np.random.default_rng(n_train)
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for key, name in FILES.items():
        n = n_train if key.startswith("train") else n_test
        if key.endswith("images"):
            dims, magic = (n, 28, 28), 2051
        else:
            dims, magic = (n,), 2049
        header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims))
        raw = header + rng.integers(0, 10, dims).astype(np.uint8).tobytes()
        (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        sums[name] = hashlib.sha256(raw).hexdigest()
    return sums


@pytest.fixture(autouse=True)
def no_real_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Refuse any connection that is not to this machine, and isolate the cache."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] not in _LOCAL:
            raise AssertionError(f"test tried to reach the network: {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FASTNN_DATA_DIR", raising=False)
    monkeypatch.delenv("FASTNN_MNIST_MIRRORS", raising=False)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve() -> Iterator:
    """serve(directory) -> (base_url, request_log): a threaded HTTP server on 127.0.0.1:0."""
    servers = []

    def start(directory: Path) -> tuple[str, list[str]]:
        log: list[str] = []
        handler = type("H", (_Handler,), {"requests": log})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
        )
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more


def test_mirror_list_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mirrors() == list(DEFAULT_MIRRORS)
    monkeypatch.setenv("FASTNN_MNIST_MIRRORS", "http://a/x, http://b/y/")
    assert mirrors() == ["http://a/x/", "http://b/y/"]
    assert mirrors(["http://c"]) == ["http://c/"]
    with pytest.raises(ValueError, match="mirrors"):
        mirrors([])


def test_download_falls_back_across_mirrors(serve, tmp_path: Path) -> None:
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    sums = write_split_files(good_dir)
    write_split_files(bad_dir, n_train=3)  # valid IDX files, wrong checksums
    good, good_log = serve(good_dir)
    bad, bad_log = serve(bad_dir)
    missing, _ = serve(tmp_path / "empty")  # 404 for everything
    dest = tmp_path / "cache"
    out = download_mnist(
        dest, mirrors=[_closed_port_url(), missing, bad, good], checksums=sums, quiet=True
    )
    assert out == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in FILES.values())
    assert len(bad_log) == 4 and len(good_log) == 4  # every file: bad mirror tried, then good
    m = load_mnist(dest, download=False, checksums=sums)
    assert m.train_images.shape == (12, 28, 28)

    # Files already present and valid are not fetched again.
    download_mnist(dest, mirrors=[good], checksums=sums, quiet=True)
    assert len(good_log) == 4


def test_load_mnist_downloads_into_cache_via_env(
    serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    sums = write_split_files(src)
    url, log = serve(src)
    monkeypatch.setenv("FASTNN_MNIST_MIRRORS", f"{_closed_port_url()},{url}")
    m = load_mnist(tmp_path / "not-here", checksums=sums, timeout=5)
    assert m.directory == default_cache_dir() == tmp_path / "xdg" / "fastnn" / "mnist"
    assert m.test_labels.shape == (5,) and len(log) == 4
    assert not list(m.directory.glob(".*part")), "temporary files must not be left behind"


def test_corrupt_cached_file_is_replaced(serve, tmp_path: Path) -> None:
    src = tmp_path / "src"
    sums = write_split_files(src)
    url, log = serve(src)
    dest = tmp_path / "cache"
    download_mnist(dest, mirrors=[url], checksums=sums, quiet=True)
    victim = dest / f"{FILES['train_labels']}.gz"
    victim.write_bytes(victim.read_bytes()[:-10])
    download_mnist(dest, mirrors=[url], checksums=sums, quiet=True)
    assert len(log) == 5 and victim.read_bytes() == (src / victim.name).read_bytes()


@pytest.mark.mnist
def test_download_real_files_with_official_checksums(
    serve, mnist_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "mirror"
    src.mkdir()
    for name in FILES.values():
        shutil.copy(mnist_dir / f"{name}.gz", src / f"{name}.gz")
    url, _ = serve(src)
    dest = download_mnist(tmp_path / "cache", mirrors=[url], quiet=True)
    m = load_mnist(dest, download=False)
    assert m.train_images.shape == (60000, 28, 28)


def test_offline_error_says_how_to_use_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTNN_MNIST_MIRRORS", _closed_port_url() + " " + _closed_port_url())
    with pytest.raises(MNISTDownloadError) as info:
        load_mnist(tmp_path / "nope", timeout=2)
    msg = str(info.value)
    assert "--data-dir" in msg and "FASTNN_DATA_DIR" in msg and "could not download" in msg
    assert msg.count("127.0.0.1") == 2  # both mirrors reported
    cache = default_cache_dir()
    assert not cache.exists() or not any(cache.iterdir()), "no partial files on failure"


def test_timeout_on_silent_server(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the TCP handshake, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        start = time.monotonic()
        with pytest.raises(MNISTDownloadError, match="timed out"):
            download_mnist(tmp_path / "c", mirrors=[url], timeout=0.3, quiet=True)
        assert time.monotonic() - start < 10


def test_bad_timeout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        download_mnist(tmp_path, mirrors=["http://127.0.0.1:1/"], timeout=0)
