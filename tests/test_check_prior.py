"""check-prior (card and denoising self-test) and the CIFAR-10 paper defenses on the authors' checkpoint formats."""

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from tiny import TINY_SCORE_SDE, save_ncsnv2_checkpoint, save_score_sde_checkpoint, tiny_ncsnv2, tiny_score_sde

from benchmarks.commands import reproduce as reproduce_command
from benchmarks.commands.check_prior import main
from benchmarks.harness.prior_check import SIGMAS, check_prior
from purifiers import DenoiserPrior, load_prior

SHIPPED_PRIOR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "models", "mnist_prior.safetensors")


def test_check_prior_on_the_shipped_mnist_prior_prints_its_card_and_passes(capsys):
    main(["check-prior", SHIPPED_PRIOR, "--n", "4", "--device", "cpu"])  # returns (no SystemExit): the prior passes
    out = capsys.readouterr().out
    assert "format: art-purifiers/edm-small-unet" in out and "parameters: 984,161" in out
    assert "known checkpoint: art-purifiers built-in MNIST prior" in out and "OK: the prior beats the identity" in out


def test_check_prior_flags_a_good_prior_used_with_a_wrong_data_range(capsys, monkeypatch):
    good = load_prior(SHIPPED_PRIOR)
    wrong = DenoiserPrior(good, data_range="pm1")  # a [0, 1] denoiser fed [-1, 1] images: the classic mistake
    result = check_prior(wrong, n=4)
    # At sigma 0.5 the noisy image itself is so poor (about 6 dB) that even the misused prior may beat it.
    assert not result["ok"] and {0.05, 0.1, 0.25} <= set(result["worse_than_identity"])
    out = capsys.readouterr().out
    assert "WORSE THAN THE IDENTITY" in out and "FAILED" in out and "wrong convention" in out
    # Identity PSNR at pixel sigma s is close to -20 log10(s) (the noise is not clipped).
    for sigma in SIGMAS:
        assert abs(result["psnr"][sigma]["identity"] + 20 * np.log10(sigma)) < 0.5
    # The command exits with status 1 on the same prior.
    import purifiers.priors.loading

    monkeypatch.setattr(purifiers.priors.loading, "load_prior", lambda *a, **k: wrong)
    with pytest.raises(SystemExit) as exit_info:
        main(["check-prior", "wrong-convention", "--n", "4", "--device", "cpu"])
    assert exit_info.value.code == 1


def _fake_cifar10(folder, n=4):
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(batches / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}, f)
    return folder


def _small_output(net):
    """Random networks are no prior: shrink the last layer so that purification stays in the image range (the tests
    using them are about plumbing, not purification)."""
    last = net.end_conv if hasattr(net, "end_conv") else net.all_modules[-1]
    with torch.no_grad():
        last.weight.mul_(1e-2)
        last.bias.zero_()
    return net


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random CIFAR-sized (32x32) network in each container format: {name: (path, config)}."""
    folder = tmp_path_factory.mktemp("authors")
    out = {}
    for kind in ("vp", "ve"):
        save_score_sde_checkpoint(_small_output(tiny_score_sde(kind)), folder / f"score_sde_{kind}.pth")
        (folder / f"{kind}.json").write_text(json.dumps({**TINY_SCORE_SDE[kind], "image_size": 32}))
        out[f"score_sde_{kind}"] = (folder / f"score_sde_{kind}.pth", str(folder / f"{kind}.json"))
    save_ncsnv2_checkpoint(_small_output(tiny_ncsnv2()), folder / "checkpoint.pth")
    out["ncsnv2"] = (folder / "checkpoint.pth", None)
    out["data"] = _fake_cifar10(folder / "data")
    return out


@pytest.mark.parametrize("name", ["score_sde_vp", "score_sde_ve", "ncsnv2"])
def test_check_prior_prints_the_card_of_each_format(name, checkpoints, capsys):
    path, config = checkpoints[name]
    result = check_prior(str(path), config=config, data=str(checkpoints["data"]), n=2)
    out = capsys.readouterr().out
    assert f"format: {'ncsnv2' if name == 'ncsnv2' else 'score_sde'}" in out
    assert "data_range:" in out and "time_input:" in out and "parameters:" in out and "sha256:" in out
    assert result["card"]["weights"] == "ema" and set(result["psnr"]) == set(SIGMAS)
    assert result["known_checkpoint"] is None  # a tiny network is not the published one, whatever its file name
    with pytest.raises(ValueError, match="give --data"):
        check_prior(str(path), config=config, n=2)  # three-channel prior, no data: MNIST would not fit


def tiny_cifar_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 15 * 15, 10))


@pytest.mark.parametrize("name", ["score_sde_vp", "score_sde_ve", "ncsnv2"])
def test_reproduce_cifar10_paper_defenses_run_with_each_checkpoint_format(name, checkpoints, tmp_path, monkeypatch):
    """--prior PATH to an authors' checkpoint, detected by load_prior; the papers' CIFAR-10 defaults (plumbing only)."""

    path, config = checkpoints[name]
    if config is not None:  # the tiny network is not a named config: a checkpoint of a named one needs no config
        import purifiers.priors.loading

        real_load_prior = purifiers.priors.loading.load_prior
        monkeypatch.setattr(purifiers.priors.loading, "load_prior",
                            lambda source, **kw: real_load_prior(source, config=config, **kw))
    module = types.ModuleType("_authors_cifar_fakes")
    module.tiny_cifar_classifier = tiny_cifar_classifier
    monkeypatch.setitem(sys.modules, module.__name__, module)
    out = tmp_path / "rep"
    result = reproduce_command.reproduce(reproduce_command.build_parser().parse_args(
        ["--dataset", "cifar10", "--data-dir", str(checkpoints["data"]), "--prior", str(path),
         "--classifier", f"{module.__name__}:tiny_cifar_classifier", "--defenses", "adp",
         "--attacks", "BlindPGD", "--n", "2", "--out", str(out), "--quiet"]))
    assert "adp" in {row["defense"] for row in result["rows"]}
    assert (out / "reproduce_cifar10.md").exists()


def test_diffpure_and_coup_purify_cifar_images_with_the_score_sde_vp_checkpoint(checkpoints):
    """DiffPure and COUP on the loaded VP checkpoint (the papers' prior format), shortened to t* = 0.01 (10 steps of
    their dt = 1e-3) to stay fast; their CIFAR-10 defaults (t* = 0.1, 100 steps) are the classes' defaults."""
    from purifiers import COUPPyTorch, DiffPurePyTorch

    path, config = checkpoints["score_sde_vp"]
    prior = load_prior(path, config=config)
    x = np.random.default_rng(0).uniform(0.2, 0.8, (2, 3, 32, 32)).astype(np.float32)
    for purifier in (DiffPurePyTorch(prior, t_star=0.01, seed=0),
                     COUPPyTorch(prior, tiny_cifar_classifier().eval(), t_star=0.01, seed=0)):
        purified, _ = purifier(x)
        assert purified.shape == x.shape and np.isfinite(purified).all()
        assert 0 < np.abs(purified - x).max() < 0.5  # moved, but a shrunk random network keeps it near the input


def test_an_mnist_ncsnv2_checkpoint_loads_from_its_weights_alone_and_is_checked_on_bundled_mnist(tmp_path, capsys):
    """ADP's MNIST/FashionMNIST NCSNv2 networks have no config in the reference repositories: sizes come from the
    weights and the noise levels from the checkpoint's sigmas buffer (here ADP's supplement values for MNIST)."""
    from purifiers.nets.ncsnv2 import NCSNv2, NCSNv2Config

    torch.manual_seed(0)
    net = NCSNv2(NCSNv2Config(ngf=4, channels=1, image_size=28, num_classes=110, sigma_begin=15.0,
                              sigma_end=0.005253)).eval()
    # A bare (not DataParallel) state_dict, as a user who re-saved the network would write it.
    torch.save([net.state_dict(), {}, 1, 2, {k: p.detach().clone() for k, p in net.named_parameters()}],
               tmp_path / "checkpoint.pth")
    result = check_prior(str(tmp_path / "checkpoint.pth"), n=2)  # one channel: bundled MNIST by default
    assert result["data"].startswith("bundled MNIST") and result["card"]["format"] == "ncsnv2"
    assert "level index 0..109, sigmas 15 -> 0.005253" in capsys.readouterr().out


def test_check_prior_reads_a_folder_of_images(tmp_path):
    from PIL import Image

    from purifiers import GaussianPrior

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(80, 170, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    result = check_prior(GaussianPrior(mean=0.5, std=0.1), data=str(tmp_path), n=2, verbose=False)
    assert result["data"] == f"images in {tmp_path}" and result["ok"]  # the exact prior of roughly such images
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "3.png")
    with pytest.raises(ValueError, match="differ in size"):
        check_prior(GaussianPrior(), data=str(tmp_path), n=4, verbose=False)
