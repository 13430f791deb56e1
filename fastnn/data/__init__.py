"""Datasets for fastnn: MNIST reading, downloading and batching."""

from __future__ import annotations

from fastnn.data.download import DEFAULT_MIRRORS, MNISTDownloadError, download_mnist
from fastnn.data.loader import MNIST_MEAN, MNIST_STD, DataLoader, normalize, share_bounds
from fastnn.data.mnist import (
    FILES,
    MNIST,
    RAW_SHA256,
    MNISTError,
    default_cache_dir,
    find_mnist_dir,
    load_mnist,
    read_idx,
)

__all__ = [
    "DEFAULT_MIRRORS",
    "FILES",
    "MNIST",
    "MNIST_MEAN",
    "MNIST_STD",
    "RAW_SHA256",
    "DataLoader",
    "MNISTDownloadError",
    "MNISTError",
    "default_cache_dir",
    "download_mnist",
    "find_mnist_dir",
    "load_mnist",
    "normalize",
    "read_idx",
    "share_bounds",
]
