"""Fashion-MNIST from idx files written here (CI has no Debian package): splits, formats, and errors on bad folders."""

import gzip
import json
import os

import numpy as np
import pytest

from benchmarks.data import FASHION_MNIST_FILES, load_fashion_mnist

N_TRAIN, N_TEST = 24, 6  # the val split is the last twelfth of the training file: 2 images here, 5,000 of 60,000


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_idx(folder, n_train=N_TRAIN, n_test=N_TEST, gz=True, seed=0):
    """The four standard files with random pixels; returns {split file: (images, labels)} as written."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, array in zip(FASHION_MNIST_FILES[split], (images, labels)):
            data = _idx_bytes(array)
            if gz:
                with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_standard_files_with_fixed_splits(tmp_path, gz):
    written = write_fashion_idx(tmp_path, gz=gz)
    train_images, train_labels = written["train"]
    x_tr, y_tr = load_fashion_mnist("train", data_dir=str(tmp_path))
    x_val, y_val = load_fashion_mnist("val", data_dir=str(tmp_path))
    x_te, y_te = load_fashion_mnist("test", data_dir=str(tmp_path))
    assert x_tr.shape == (22, 1, 28, 28) and x_val.shape == (2, 1, 28, 28) and x_te.shape == (N_TEST, 1, 28, 28)
    for x, y in ((x_tr, y_tr), (x_val, y_val), (x_te, y_te)):
        assert x.dtype == np.float32 and y.dtype == np.int64 and 0.0 <= x.min() and x.max() <= 1.0
    # File order: train is the head of the training file, val its tail; values are bytes / 255.
    np.testing.assert_allclose(x_tr[:, 0] * 255, train_images[:22], atol=1e-4)
    np.testing.assert_allclose(x_val[:, 0] * 255, train_images[22:], atol=1e-4)
    np.testing.assert_array_equal(np.concatenate([y_tr, y_val]), train_labels)
    np.testing.assert_allclose(x_te[:, 0] * 255, written["test"][0], atol=1e-4)
    x3, y3 = load_fashion_mnist("test", data_dir=str(tmp_path), n=3)
    np.testing.assert_array_equal(x3, x_te[:3])
    np.testing.assert_array_equal(y3, y_te[:3])


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=str(tmp_path))


def test_missing_folder_names_the_files_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)t10k-images-idx3-ubyte.*does not exist.*"
                                                r"apt-get install dataset-fashion-mnist.*Nothing is downloaded"):
        load_fashion_mnist("test", data_dir=str(tmp_path / "nowhere"))


def test_missing_file_is_named(tmp_path):
    write_fashion_idx(tmp_path)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"(?s)train-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=str(tmp_path))
    assert load_fashion_mnist("test", data_dir=str(tmp_path))[0].shape[0] == N_TEST  # the test files are all there


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_is_named(tmp_path, gz):
    write_fashion_idx(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"{name}.*truncated"):
        load_fashion_mnist("test", data_dir=str(tmp_path))


def test_wrong_magic_is_named(tmp_path):
    write_fashion_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2:4] = b"\x08\x01"  # a labels magic where images belong
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is not an idx images file.*00000801"):
        load_fashion_mnist("val", data_dir=str(tmp_path))


def test_not_gzip_and_mismatched_counts_are_named(tmp_path):
    write_fashion_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a complete gzip file"):
        load_fashion_mnist("test", data_dir=str(tmp_path))
    other = tmp_path / "other"
    write_fashion_idx(other, n_test=5)
    os.replace(other / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz holds 6 images but .*t10k-labels.* holds 5"):
        load_fashion_mnist("test", data_dir=str(tmp_path))


# --- the shipped Fashion-MNIST reference models --------------------------------------------------------------------

def _have_fashion_data():
    try:
        load_fashion_mnist("val", n=1)
        return True
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have_fashion_data(),
                                reason="Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)")


def test_shipped_files_are_small_safetensors_with_honest_cards():
    from benchmarks.models import MODELS_DIR, REFERENCE_FILES, model_card

    for name in REFERENCE_FILES["fashion_mnist"]:
        path = os.path.join(MODELS_DIR, name)
        assert path.endswith(".safetensors") and os.path.getsize(path) < 10 * 2**20
        card = model_card(path)
        assert {"seed", "metrics", "command", "train_split", "dataset", "wall_minutes", "machine"} <= set(card)
        assert "55000" in card["train_split"] and "../" not in json.dumps(card)
    prior_card = model_card(os.path.join(MODELS_DIR, REFERENCE_FILES["fashion_mnist"][1]))
    assert prior_card["steps"] > 0 and set(prior_card["metrics"]) == {"psnr_val", "psnr_test"}


@needs_data
def test_shipped_classifier_accuracy_matches_its_card():
    from tiny import check_shipped_classifier

    check_shipped_classifier("fashion_mnist", *load_fashion_mnist("test"), minimum=0.92)


@needs_data
def test_shipped_prior_denoises_better_than_the_noisy_input():
    from benchmarks.harness.training import denoising_psnr
    from benchmarks.models import load_reference_models

    _, prior = load_reference_models("fashion_mnist")
    psnr = denoising_psnr(prior, load_fashion_mnist("test", n=100)[0])
    for sigma, value in psnr.items():
        assert value > -10 * np.log10(float(sigma) ** 2) + 3.0, (sigma, value)  # the noisy input's own PSNR + 3 dB
