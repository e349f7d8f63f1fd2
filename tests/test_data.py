"""Bundled MNIST split, CIFAR-10 from a local folder (made here, tiny), and the errors for missing or bad data."""

import pickle

import numpy as np
import pytest

from benchmarks.data import MNIST_SPLITS, as_image_batch, load_cifar10, load_mnist


def test_mnist_splits_are_fixed_disjoint_and_well_formed():
    parts = {name: load_mnist(name) for name in MNIST_SPLITS}
    for name, (x, y) in parts.items():
        start, stop = MNIST_SPLITS[name]
        assert x.shape == (stop - start, 1, 28, 28) and x.dtype == np.float32
        assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    x_all, _ = load_mnist("all")
    assert x_all.shape[0] == 5000
    flat = {name: {row.tobytes() for row in x} for name, (x, _) in parts.items()}
    assert not (flat["train"] & flat["test"]) and not (flat["val"] & flat["test"])
    x_again, y_again = load_mnist("test", n=10)
    np.testing.assert_array_equal(x_again, parts["test"][0][:10])
    np.testing.assert_array_equal(y_again, parts["test"][1][:10])


def test_mnist_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def _write_fake_cifar(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_from_local_folder(tmp_path):
    folder = _write_fake_cifar(tmp_path)
    x, y = load_cifar10(str(tmp_path), "test")
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x.reshape(4, -1), raw["data"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, raw["labels"])
    assert load_cifar10(str(tmp_path), "train")[0].shape == (20, 3, 32, 32)
    assert load_cifar10(str(tmp_path), "train", n=7)[0].shape[0] == 7


def test_cifar10_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*test_batch.*Nothing is downloaded"):
        load_cifar10(str(tmp_path))


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_cifar10_refuses_batches_with_code(tmp_path):
    folder = _write_fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Payload(), "labels": []}, f)
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 batch .*refusing"):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize("bad, message", [
    (np.full((2, 1, 4, 4), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((2, 4, 4), dtype=np.float32), "4-D"),
    (np.zeros((2, 1, 4, 4), dtype=np.uint8), "dtype"),
    (np.full((2, 1, 4, 4), 200.0, dtype=np.float32), "0-255"),
    (np.zeros((0, 1, 4, 4), dtype=np.float32), "empty"),
    (np.zeros((2, 4, 4, 1), dtype=np.float32), "channels"),
])
def test_image_batch_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        as_image_batch(bad, channels=1)
