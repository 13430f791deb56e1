"""A small, seeded DataLoader for image classification arrays (MNIST-sized).

Images are kept as uint8 and converted per batch through a 256-entry lookup
table, which normalises and casts to float32 in a single gather. On the CPU the
shuffled rows are gathered and looked up in one native pass (the ``lookup_u8``
backend op: the cpu backend's kernel where it is built, else NumPy), about 6x
faster than NumPy's gather and ``take``. For ``device="cuda"`` the images and
labels are copied to the GPU (CuPy) once, in the constructor, so batches never
cross the bus.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastnn._array import array_module, is_cupy

__all__ = ["MNIST_MEAN", "MNIST_STD", "DataLoader", "normalize", "share_bounds"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def _lut(mean: float, std: float) -> np.ndarray:
    """float32 table: uint8 pixel -> ((pixel / 255) - mean) / std."""
    return ((np.arange(256, dtype=np.float64) / 255.0 - mean) / std).astype(np.float32)


def _lookup(device: str) -> Any:
    """The ``lookup_u8`` op of the backend that owns ``device``'s arrays: cuda's for
    CuPy batches; on the host the cpu backend's native one where the extension is
    built, else the NumPy reference's (the same values)."""
    from fastnn.backends import get_backend

    if device == "cuda":
        return get_backend("cuda").lookup_u8
    try:
        return get_backend("cpu").lookup_u8
    except ImportError:
        return get_backend("numpy").lookup_u8


def normalize(images: Any, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> Any:
    """uint8 images (any shape) -> float32 ``((x / 255) - mean) / std`` (NumPy or CuPy)."""
    lut = _lut(mean, std)
    if is_cupy(images):
        lut = array_module(images).asarray(lut)
        return lut[images]
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim == 0:
        return lut[images]  # NumPy's indexing, and its errors
    return _lookup("cpu")(np.ascontiguousarray(images), None, lut)


def share_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items split over ``size``
    ranks: the first ``n % size`` ranks get one item more, so the shares are
    disjoint, cover ``0..n`` in order, and differ in length by at most one."""
    for name, v in (("n", n), ("rank", rank), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= rank < size, got n={n}, rank={rank}, size={size}")
    q, r = divmod(int(n), int(size))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


class DataLoader:
    """Iterate over ``(x, y)`` batches: x float32 ``(B, 1, H, W)`` (NCHW), y int64 ``(B,)``.

    Parameters
    ----------
    images : uint8 array ``(n, H, W)`` or ``(n, 1, H, W)``, raw pixels 0..255.
    labels : integer array ``(n,)``.
    batch_size : samples per batch (the last one may be smaller unless ``drop_last``).
    shuffle : reshuffle every epoch with ``numpy.random.default_rng([seed, epoch])``,
        so epoch ``e`` has the same order in every run, including a resumed one.
    seed : non-negative int for the shuffle and augmentation generators.
    augment_shift : if > 0, shift every image by a random whole number of pixels
        in ``[-augment_shift, augment_shift]`` along each axis (zero fill, i.e.
        background), drawn from the same per-epoch generator.
    drop_last : drop the final incomplete batch.
    device : ``"cpu"`` yields NumPy arrays, ``"cuda"`` CuPy arrays (needs cupy).
    mean, std : normalisation applied after scaling pixels to [0, 1].
    prefetch : batches a background thread prepares ahead of the consumer (0: none,
        the batch is built when asked for). The thread gathers, augments and
        normalises the next batch while the training step runs (the gather and
        lookup release the GIL). It pays only where a core would otherwise idle:
        beside multithreaded kernels that use every core it slows them (the seed
        epoch ran 8-10% slower on 2 cores), so ``fastnn train`` leaves it at 0.
        The batches and their order are the same either way. ``device="cpu"``
        only: cuda batches are gathers on the GPU, queued on its stream already.
    shard : ``(rank, world_size)`` for data-parallel training: every global batch
        (``batch_size`` samples, same shuffle and augmentation as one process) is
        cut into ``world_size`` contiguous shares (:func:`share_bounds`) and only
        rank ``rank``'s share is yielded; it may be empty when the last batch has
        fewer samples than ranks. :meth:`global_batch_len` gives the full size.

    Iterating uses the current :attr:`epoch` and then advances it; call
    :meth:`set_epoch` to jump (e.g. when resuming training).
    """

    def __init__(
        self,
        images: Any,
        labels: Any,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment_shift: int = 0,
        drop_last: bool = False,
        *,
        device: str = "cpu",
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        shard: tuple[int, int] = (0, 1),
        prefetch: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if (
            isinstance(augment_shift, bool)
            or not isinstance(augment_shift, (int, np.integer))
            or augment_shift < 0
        ):
            raise ValueError(f"augment_shift must be a non-negative int, got {augment_shift!r}")
        if not isinstance(shard, tuple) or len(shard) != 2:
            raise TypeError(f"shard must be a (rank, world_size) tuple, got {shard!r}")
        share_bounds(0, *shard)  # validates rank and world_size
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or (
            prefetch < 0
        ):
            raise ValueError(f"prefetch must be a non-negative int, got {prefetch!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        images = np.asarray(images) if not is_cupy(images) else images
        labels = np.asarray(labels) if not is_cupy(labels) else labels
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 pixels, got dtype {images.dtype}")
        if images.ndim == 4 and images.shape[1] == 1:
            images = images.reshape(images.shape[0], *images.shape[2:])
        if images.ndim != 3:
            raise ValueError(f"images must be (n, H, W) or (n, 1, H, W), got {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (n,) with n = {images.shape[0]} images, got {labels.shape}"
            )
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")

        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment_shift = int(augment_shift)
        self.drop_last = bool(drop_last)
        self.device = device
        self.shard = (int(shard[0]), int(shard[1]))
        self.prefetch = int(prefetch)
        self.epoch = 0

        if device == "cuda":
            import cupy

            self._xp = cupy
        else:
            self._xp = np
        xp = self._xp
        # One transfer per dataset, not per batch.
        self._images = xp.ascontiguousarray(images)
        self._labels = xp.asarray(labels).astype(np.int64, copy=False)
        self._lut = xp.asarray(_lut(mean, std))
        self._lookup = _lookup(device)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images in the dataset (not counting any dropped last batch)."""
        return int(self._images.shape[0])

    def global_batch_len(self, step: int) -> int:
        """Samples in global batch ``step`` (all ranks' shares together)."""
        stop = (self.num_samples // self.batch_size) * self.batch_size if self.drop_last else (
            self.num_samples
        )
        return max(0, min(self.batch_size, stop - step * self.batch_size))

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use ``epoch``'s shuffle and augmentation."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    def _shift(self, batch: Any, shifts: np.ndarray) -> Any:
        """Shift each image in ``batch`` (B, H, W) by ``shifts[i] = (dy, dx)``, zero fill."""
        xp, s = self._xp, self.augment_shift
        b, h, w = batch.shape
        padded = xp.pad(batch, ((0, 0), (s, s), (s, s)))
        # Output pixel (r, c) of image i reads padded (r + s - dy, c + s - dx).
        off = xp.asarray(s - shifts)
        rows = off[:, 0, None, None] + xp.arange(h)[None, :, None]
        cols = off[:, 1, None, None] + xp.arange(w)[None, None, :]
        return padded[xp.arange(b)[:, None, None], rows, cols]

    def _epoch_plan(self) -> tuple[Any, Any, int]:
        """Start an epoch: (order on the device or None, shifts or None, stop)."""
        epoch = self.epoch
        self.epoch += 1
        n = self.num_samples
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else None
        shifts = (
            rng.integers(-self.augment_shift, self.augment_shift + 1, size=(n, 2))
            if self.augment_shift
            else None
        )
        order_dev = self._xp.asarray(order) if order is not None else None
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        return order_dev, shifts, stop

    def _ranges(self, stop: int) -> Iterator[tuple[int, int]]:
        """[start, end) of each batch in the epoch's order: with ``shard``, this
        rank's share of each global batch."""
        for first in range(0, stop, self.batch_size):
            start, end = first, min(first + self.batch_size, stop)
            if self.shard[1] > 1:
                lo, hi = share_bounds(end - start, *self.shard)
                start, end = first + lo, first + hi
            yield start, end

    def index_batches(self) -> Iterator[Any]:
        """Iterate over the rows of each batch instead of the batch: int64 index
        arrays (device arrays for ``device="cuda"``) into the dataset, in the
        order ``iter(self)`` would use (and advancing :attr:`epoch` the same way).
        Augmentation is not applied: ValueError when ``augment_shift`` is set.
        The fused cuda step reads the uint8 images through these rows."""
        if self.augment_shift:
            raise ValueError("index_batches: augment_shift must be 0")
        order_dev, _, stop = self._epoch_plan()
        if order_dev is None:
            order_dev = self._xp.arange(self.num_samples, dtype=np.int64)
        for start, end in self._ranges(stop):
            yield order_dev[start:end]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        batches = self._batches(*self._epoch_plan())
        if self.prefetch and self.device == "cpu":
            return ahead(batches, self.prefetch)
        return batches

    def _batches(self, order_dev: Any, shifts: Any, stop: int) -> Iterator[tuple[Any, Any]]:
        for start, end in self._ranges(stop):
            if order_dev is None:
                images, rows = self._images[start:end], None
                labels = self._labels[start:end]
            else:
                rows = order_dev[start:end]
                images = self._images
                labels = self._labels[rows]
            if shifts is not None:
                if rows is not None:
                    images, rows = images[rows], None
                images = self._shift(images, shifts[start:end])
            # The gather (when rows are given) and the normalisation in one pass.
            x = self._lookup(images, rows, self._lut)
            yield x.reshape(x.shape[0], 1, *x.shape[1:]), labels


class _Raised:
    """An exception from the producer thread, re-raised in the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Iterate over ``items`` with a background thread producing up to ``depth`` items
    ahead of the consumer. Same items, same order; an exception in the producer is
    raised in the consumer; closing the iterator early (``break``) stops the thread."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))

    worker = threading.Thread(target=produce, name="fastnn-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
