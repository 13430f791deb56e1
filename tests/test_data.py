"""MNIST IDX reading, checksums, directory search, and the DataLoader."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fastnn.data import DataLoader, MNISTError, load_mnist, read_idx
from fastnn.data.loader import MNIST_MEAN, MNIST_STD, normalize
from fastnn.data.mnist import FILES, RAW_SHA256, candidate_dirs, find_mnist_dir, parse_idx


# --- helpers: synthetic IDX files ------------------------------------------------------
def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, n, h, w))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return (
        (2049).to_bytes(4, "big")
        + len(labels).to_bytes(4, "big")
        + labels.astype(np.uint8).tobytes()
    )


def write_split_files(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True):
    """Write four small synthetic MNIST files; return {name: sha256 of raw content}."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    payloads = {
        FILES["train_images"]: idx_images(rng.integers(0, 256, (n_train, 28, 28))),
        FILES["train_labels"]: idx_labels(rng.integers(0, 10, n_train)),
        FILES["test_images"]: idx_images(rng.integers(0, 256, (n_test, 28, 28))),
        FILES["test_labels"]: idx_labels(rng.integers(0, 10, n_test)),
    }
    for name, raw in payloads.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return {name: hashlib.sha256(raw).hexdigest() for name, raw in payloads.items()}


# --- the real files -----------------------------------------------------------------------
@pytest.mark.mnist
def test_reads_real_mnist(mnist_dir: Path) -> None:
    m = load_mnist(mnist_dir, download=False)
    assert m.train_images.shape == (60000, 28, 28) and m.train_images.dtype == np.uint8
    assert m.test_images.shape == (10000, 28, 28)
    assert m.train_labels.shape == (60000,) and m.test_labels.shape == (10000,)
    # Published MNIST facts: the first training labels and the per-class counts.
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(m.test_labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert m.train_images.max() == 255 and m.train_images.min() == 0


@pytest.mark.mnist
def test_official_hashes_match_shared_sums_file(mnist_dir: Path) -> None:
    sums = mnist_dir / "SHA256SUMS.raw"
    if not sums.exists():
        pytest.skip(f"{sums} not present")
    listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    assert listed == RAW_SHA256


@pytest.mark.mnist
def test_recompressed_and_raw_files_pass_official_checksum(mnist_dir: Path, tmp_path: Path) -> None:
    name = FILES["test_labels"]
    raw = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
    (tmp_path / name).write_bytes(raw)
    a = read_idx(tmp_path / f"{name}.gz", RAW_SHA256[name], 2049)
    b = read_idx(tmp_path / name, RAW_SHA256[name], 2049)
    assert a.shape == (10000,) and np.array_equal(a, b)


@pytest.mark.mnist
def test_checksum_mismatch_names_file(mnist_dir: Path, tmp_path: Path) -> None:
    name = FILES["test_labels"]
    raw = bytearray(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # still a valid IDX file, just not the official one
    bad = tmp_path / f"{name}.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(MNISTError, match="checksum mismatch") as info:
        read_idx(bad, RAW_SHA256[name])
    assert str(bad) in str(info.value)


# --- corrupt files --------------------------------------------------------------------------
def test_parse_synthetic_images_and_labels() -> None:
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_images(imgs))
    assert out.shape == (2, 3, 4) and np.array_equal(out, imgs)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert parse_idx(idx_labels(labels)).tolist() == [3, 1, 4]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_images_file(tmp_path: Path, gz: bool) -> None:
    data = idx_images(np.zeros((10, 28, 28), np.uint8))[:-28]  # one row short
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(MNISTError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_labels(np.arange(1000) % 10))[:-20])
    with pytest.raises(MNISTError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(idx_images(np.zeros((1, 2, 2), np.uint8))[:10])
    with pytest.raises(MNISTError, match="truncated"):
        read_idx(path)


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(idx_labels(np.arange(5)) + b"\0")
    with pytest.raises(MNISTError, match="trailing"):
        read_idx(path)


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes((1234).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    with pytest.raises(MNISTError, match="bad magic number 1234"):
        read_idx(path)
    # A labels file where images are expected is also a bad magic number.
    path.write_bytes(idx_labels(np.arange(3)))
    with pytest.raises(MNISTError, match="bad magic.*expected 2051"):
        read_idx(path, expected_magic=2051)


def test_count_mismatch_between_images_and_labels(tmp_path: Path) -> None:
    sums = write_split_files(tmp_path, n_train=6)
    (tmp_path / f"{FILES['train_labels']}.gz").write_bytes(
        gzip.compress(idx_labels(np.arange(5) % 10))
    )
    with pytest.raises(MNISTError, match="6 images but 5 labels"):
        load_mnist(tmp_path, download=False, checksums={**sums, FILES["train_labels"]: None})


def test_default_checksums_reject_synthetic_files(tmp_path: Path) -> None:
    write_split_files(tmp_path)
    with pytest.raises(MNISTError, match="checksum mismatch"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("gz", [True, False])
def test_load_synthetic_with_checksum_override(tmp_path: Path, gz: bool) -> None:
    sums = write_split_files(tmp_path, gz=gz)
    m = load_mnist(tmp_path, download=False, checksums=sums)
    assert m.train_images.shape == (12, 28, 28) and m.test_labels.shape == (5,)
    assert m.directory == tmp_path


# --- directory search -------------------------------------------------------------------------
def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "xdg"
    monkeypatch.setenv("FASTNN_DATA_DIR", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert candidate_dirs(explicit) == [explicit, env, cache / "fastnn" / "mnist"]
    assert find_mnist_dir(explicit) is None
    write_split_files(cache / "fastnn" / "mnist")
    assert find_mnist_dir(explicit) == cache / "fastnn" / "mnist"
    write_split_files(env)
    assert find_mnist_dir(explicit) == env
    write_split_files(explicit, gz=False)
    assert find_mnist_dir(explicit) == explicit
    # An incomplete directory is skipped rather than mixed with another.
    (explicit / FILES["test_labels"]).unlink()
    assert find_mnist_dir(explicit) == env


def test_home_cache_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FASTNN_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert candidate_dirs() == [tmp_path / ".cache" / "fastnn" / "mnist"]


def test_missing_without_download_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FASTNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(MNISTError, match="--data-dir.*FASTNN_DATA_DIR"):
        load_mnist(tmp_path / "nothing", download=False)


# --- DataLoader ----------------------------------------------------------------------------------
def _ids_dataset(n: int = 50, hw: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with pixel value i (so batches reveal their sample ids)."""
    images = np.repeat(np.arange(n, dtype=np.uint8), hw * hw).reshape(n, hw, hw)
    return images, np.arange(n, dtype=np.int32)


def _order(loader: DataLoader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_loader_batches_dtype_layout_and_normalisation() -> None:
    images = np.array([[[0, 255], [51, 102]]] * 3, dtype=np.uint8)
    loader = DataLoader(images, np.array([1, 2, 3]), batch_size=2, shuffle=False)
    batches = list(loader)
    assert len(loader) == 2 and [b[0].shape for b in batches] == [(2, 1, 2, 2), (1, 1, 2, 2)]
    x, y = batches[0]
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.flags.c_contiguous
    expected = ((images[0].astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)
    assert y.tolist() == [1, 2]


def test_loader_no_shuffle_keeps_order_and_drop_last() -> None:
    images, labels = _ids_dataset(10)
    assert _order(DataLoader(images, labels, 4)) == list(range(10))
    dl = DataLoader(images, labels, 4, drop_last=True)
    assert len(dl) == 2 and _order(dl) == list(range(8))


def test_loader_shuffle_is_seeded_per_epoch() -> None:
    images, labels = _ids_dataset(50)
    a = DataLoader(images, labels, 8, shuffle=True, seed=3)
    b = DataLoader(images, labels, 8, shuffle=True, seed=3)
    a0, a1 = _order(a), _order(a)
    assert sorted(a0) == list(range(50)) and sorted(a1) == list(range(50))
    assert a0 != list(range(50)) and a0 != a1  # shuffled, and differently each epoch
    assert _order(b) == a0 and _order(b) == a1  # same seed: same sequence of epochs
    c = DataLoader(images, labels, 8, shuffle=True, seed=4)
    assert _order(c) != a0
    # Resuming at epoch 1 replays epoch 1 exactly.
    c = DataLoader(images, labels, 8, shuffle=True, seed=3)
    c.set_epoch(1)
    assert _order(c) == a1 and c.epoch == 2


def test_loader_images_follow_labels_when_shuffled() -> None:
    images, labels = _ids_dataset(30)
    for x, y in DataLoader(images, labels, 7, shuffle=True, seed=1):
        pix = np.rint((x[:, 0, 0, 0] * MNIST_STD + MNIST_MEAN) * 255).astype(int)
        assert pix.tolist() == y.tolist()


def test_loader_shift_augmentation() -> None:
    rng = np.random.default_rng(0)
    n, hw, s = 40, 8, 2
    images = rng.integers(1, 256, (n, hw, hw)).astype(np.uint8)  # no zeros: fill is visible
    labels = np.arange(n)
    dl = DataLoader(images, labels, 16, shuffle=True, seed=5, augment_shift=s)
    seen_shifts = set()
    for x, y in dl:
        raw = np.rint((x[:, 0] * MNIST_STD + MNIST_MEAN) * 255).astype(np.int64)
        for img, i in zip(raw, y):
            padded = np.pad(images[i].astype(np.int64), s)
            matches = [
                (dy, dx)
                for dy in range(-s, s + 1)
                for dx in range(-s, s + 1)
                if np.array_equal(img, padded[s - dy : s - dy + hw, s - dx : s - dx + hw])
            ]
            assert len(matches) == 1, "each augmented image is exactly one zero-filled shift"
            seen_shifts.add(matches[0])
    assert len(seen_shifts) > 5  # shifts vary across samples
    # Same seed and epoch -> identical augmented batches.
    again = DataLoader(images, labels, 16, shuffle=True, seed=5, augment_shift=s)
    for (x1, _), (x2, _) in zip(DataLoader(images, labels, 16, True, 5, s), again):
        assert np.array_equal(x1, x2)


@pytest.mark.parametrize("depth", [1, 3])
def test_loader_prefetch_yields_the_same_batches(depth: int) -> None:
    """A background thread preparing batches ahead changes nothing the consumer sees:
    same batches, same order, same epochs (shuffle and augmentation)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (45, 6, 6)).astype(np.uint8)
    labels = np.arange(45)
    plain = DataLoader(images, labels, 8, shuffle=True, seed=2, augment_shift=1)
    ahead = DataLoader(images, labels, 8, shuffle=True, seed=2, augment_shift=1,
                       prefetch=depth)
    for _ in range(2):  # two epochs
        got, want = list(ahead), list(plain)
        assert len(got) == len(want) == 6
        for (x1, y1), (x2, y2) in zip(got, want):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert ahead.epoch == plain.epoch == 2


def test_prefetch_thread_stops_on_break_and_passes_errors() -> None:
    import threading

    from fastnn.data.loader import ahead

    images, labels = _ids_dataset(64)
    it = iter(DataLoader(images, labels, 4, prefetch=2))
    next(it)
    it.close()  # what a `break` out of the for loop does
    assert not any(t.name == "fastnn-prefetch" for t in threading.enumerate())

    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in ahead(failing(), 1):
            got.append(item)
    assert got == [1]
    assert not any(t.name == "fastnn-prefetch" for t in threading.enumerate())


def test_loader_without_augmentation_is_exact() -> None:
    images, labels = _ids_dataset(9)
    x = np.concatenate([b for b, _ in DataLoader(images, labels, 4)])
    raw = np.rint((x[:, 0] * MNIST_STD + MNIST_MEAN) * 255).astype(np.uint8)
    assert np.array_equal(raw, images)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_accepts_non_contiguous_images(shuffle: bool) -> None:
    rng = np.random.default_rng(4)
    wide = rng.integers(0, 256, (7, 6, 12), dtype=np.uint8)
    images, labels = wide[:, :, ::2], np.arange(7)  # a strided view
    loader = DataLoader(images, labels, 3, shuffle=shuffle, seed=1)
    for x, y in loader:
        want = (images[y].astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD
        np.testing.assert_array_equal(x[:, 0], want.astype(np.float32))


def test_loader_accepts_nchw_uint8() -> None:
    images, labels = _ids_dataset(4)
    ((x, _),) = list(DataLoader(images[:, None], labels, 4))
    assert x.shape == (4, 1, 6, 6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"augment_shift": -2}, ValueError, "augment_shift"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"images": np.zeros((3, 4, 4), np.float32)}, TypeError, "images"),
        ({"labels": np.zeros(2, np.int64)}, ValueError, "labels"),
        ({"labels": np.zeros(3, np.float32)}, TypeError, "labels"),
        ({"prefetch": -1}, ValueError, "prefetch"),
        ({"prefetch": 1.5}, ValueError, "prefetch"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    args = {
        "images": np.zeros((3, 4, 4), np.uint8),
        "labels": np.zeros(3, np.int64),
        "batch_size": 2,
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        DataLoader(**args)


def test_load_is_cached_until_files_change(tmp_path: Path) -> None:
    sums = write_split_files(tmp_path)
    a = load_mnist(tmp_path, download=False, checksums=sums)
    assert load_mnist(tmp_path, download=False, checksums=sums) is a
    assert not a.train_images.flags.writeable, "shared cached arrays must be read-only"
    # Rewrite one file (different content and size): the cache must not serve stale data.
    victim = tmp_path / f"{FILES['test_labels']}.gz"
    victim.write_bytes(gzip.compress(idx_labels(np.arange(7) % 10)))
    with pytest.raises(MNISTError, match="5 images but 7 labels"):
        load_mnist(tmp_path, download=False, checksums={**sums, FILES["test_labels"]: None})


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [0, 1])
def test_loader_cuda_matches_host(shift: int) -> None:
    import cupy

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 8, 8)).astype(np.uint8), np.arange(20)
    host = DataLoader(images, labels, 6, shuffle=True, seed=2, augment_shift=shift)
    dev = DataLoader(images, labels, 6, shuffle=True, seed=2, augment_shift=shift, device="cuda")
    for (xh, yh), (xd, yd) in zip(host, dev):
        assert isinstance(xd, cupy.ndarray) and xd.dtype == np.float32 and yd.dtype == np.int64
        np.testing.assert_array_equal(xh, xd.get())
        np.testing.assert_array_equal(yh, yd.get())


@pytest.mark.parametrize("shape", [(), (5,), (3, 4, 4), (2, 1, 3, 3)])
def test_normalize_matches_the_formula(shape: tuple) -> None:
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    want = ((images.astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    got = normalize(images)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)
    if images.ndim == 3:  # a strided view gives the same values
        np.testing.assert_array_equal(normalize(images[:, ::2]), want[:, ::2])
        np.testing.assert_array_equal(normalize(images, 0.5, 2.0),
                                      ((images / 255 - 0.5) / 2.0).astype(np.float32))


def test_loader_without_the_native_extension_gives_the_same_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where fastnn._C is not built the loader uses the NumPy reference's lookup_u8."""
    import fastnn.data.loader as loader_mod
    from fastnn import backends

    rng = np.random.default_rng(8)
    images, labels = rng.integers(0, 256, (30, 5, 7), dtype=np.uint8), np.arange(30)
    want = [x for x, _ in DataLoader(images, labels, 8, shuffle=True, seed=2)]
    get_backend = backends.get_backend

    def no_cpu(name: str):
        if name == "cpu":
            raise ImportError("fastnn._C is not built (simulated)")
        return get_backend(name)

    monkeypatch.setattr(backends, "get_backend", no_cpu)
    assert loader_mod._lookup("cpu") is get_backend("numpy").lookup_u8
    got = [x for x, _ in DataLoader(images, labels, 8, shuffle=True, seed=2)]
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
