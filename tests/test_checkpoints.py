"""The authors' networks and checkpoint containers: names and shapes against fixtures recorded from the reference
implementations (tests/reference_fixtures/README.md), containers written as the reference training loops write them,
the conventions against formulas computed by hand, and the errors for bad input."""

import dataclasses
import json
import math
import pathlib
import pickle

import pytest
import torch

from purifiers import GaussianPrior, load_prior
from purifiers.nets import ncsnv2, score_sde
from tiny import (TINY_NCSNV2, TINY_SCORE_SDE, save_ncsnv2_checkpoint, save_score_sde_checkpoint, tiny_ncsnv2,
                  tiny_score_sde)

FIXTURES = pathlib.Path(__file__).parent / "reference_fixtures"


def _fixture(name):
    return json.loads((FIXTURES / name).read_text())


def _names_and_shapes(net):
    return [(k, list(v.shape)) for k, v in net.state_dict().items()]


@pytest.mark.parametrize("name", list(score_sde.CONFIGS))
def test_score_sde_state_dict_equals_the_reference_entry_for_entry(name):
    fixture = _fixture(f"score_sde_{name.replace('/', '_')}.json")
    assert fixture["reference"] == "yang-song/score_sde_pytorch" and fixture["config_file"] == f"configs/{name}.py"
    with torch.device("meta"):  # the full-size network, shapes only
        net = score_sde.NCSNpp(score_sde.CONFIGS[name])
    assert _names_and_shapes(net) == [(k, v) for k, v in fixture["state_dict"].items()]
    # The EMA's shadow_params list follows this order.
    assert [k for k, p in net.named_parameters() if p.requires_grad] == fixture["trainable_parameters_in_order"]


def test_ncsnv2_state_dict_equals_the_reference_entry_for_entry():
    fixture = _fixture("ncsnv2_cifar10.json")
    assert fixture["reference"] == "ermongroup/ncsnv2" and fixture["config_file"] == "configs/cifar10.yml"
    with torch.device("meta"):
        net = ncsnv2.NCSNv2(ncsnv2.CONFIGS["cifar10"])
    assert _names_and_shapes(net) == [(k, v) for k, v in fixture["state_dict"].items()]
    assert [k for k, _ in net.named_parameters()] == fixture["trainable_parameters_in_order"]


@pytest.mark.parametrize("name", list(score_sde.CONFIGS))
def test_named_score_sde_configs_equal_the_reference_configs(name):
    """Every field, not only the shapes: data centring, scale_by_sigma, SDE and schedule constants, FIR, embedding."""
    reference = _fixture("score_sde_configs.json")["configs"][name]
    assert score_sde.ScoreSDEConfig.from_mapping(reference) == score_sde.CONFIGS[name]


def test_named_ncsnv2_config_equals_the_reference_config():
    reference = _fixture("ncsnv2_configs.json")["configs"]["cifar10"]
    assert ncsnv2.NCSNv2Config.from_mapping(reference) == ncsnv2.CONFIGS["cifar10"]


def _fill_as_recorded(net):
    """The deterministic weights of the tiny-forward fixtures: 0.2 sin(0.731 k + i), i the index in sorted keys."""
    state = net.state_dict()
    with torch.no_grad():
        for i, name in enumerate(sorted(state)):
            if name != "sigmas":
                t = state[name]
                t.copy_((0.2 * torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.731 + i)).reshape(t.shape))


def _probe():
    return (0.5 + 0.4 * torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.113)).reshape(2, 3, 8, 8).float()


@pytest.mark.parametrize("name", ["vp/cifar10_ddpmpp_continuous", "vp/cifar10_ncsnpp_continuous",
                                  "ve/cifar10_ncsnpp_continuous"])
def test_score_sde_forward_equals_the_reference_output(name):
    """Same weights, same input, the reference's recorded output: covers the FIR resampling written in torch."""
    record = _fixture("score_sde_tiny_forward.json")["configs"][name]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in record["overrides"].items()}
    net = score_sde.NCSNpp(dataclasses.replace(score_sde.CONFIGS[name], **overrides)).eval()
    _fill_as_recorded(net)
    with torch.no_grad():
        out = net(_probe(), torch.tensor(record["time_input"]))
    torch.testing.assert_close(out.reshape(-1), torch.tensor(record["output"]), atol=1e-4, rtol=1e-4)


def test_ncsnv2_forward_equals_the_reference_output():
    record = _fixture("ncsnv2_tiny_forward.json")
    net = ncsnv2.NCSNv2(dataclasses.replace(ncsnv2.CONFIGS["cifar10"], **record["overrides"])).eval()
    _fill_as_recorded(net)
    torch.testing.assert_close(net.sigmas, torch.tensor(record["sigmas"]))
    with torch.no_grad():
        out = net(_probe(), torch.tensor(record["labels"]))
    torch.testing.assert_close(out.reshape(-1), torch.tensor(record["output"]), atol=1e-4, rtol=1e-4)


def test_fir_resampling_keeps_constant_images_constant_and_matches_a_hand_computed_filter():
    x = torch.full((1, 2, 8, 8), 3.0)
    torch.testing.assert_close(score_sde.fir_upsample(x, (1, 3, 3, 1))[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 3.))
    torch.testing.assert_close(score_sde.fir_downsample(x, (1, 3, 3, 1))[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 3.))
    # An impulse at (4, 4) through the separable [1, 3, 3, 1]/8 filter with pad (1, 1), keeping every second sample:
    # along each axis the padded impulse sits at 5, the valid convolution puts 1/8, 3/8, 3/8, 1/8 at 2..5, and
    # positions 0, 2, 4, 6 survive.
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[..., 4, 4] = 1.0
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    out = score_sde.upfirdn2d(impulse, torch.outer(taps, taps), down=2, pad=(1, 1))
    per_axis = torch.tensor([0.0, 0.125, 0.375, 0.0])
    torch.testing.assert_close(out[0, 0], torch.outer(per_axis, per_axis))


# ---------------------------------------------------------------------------------------------------------------------
# Containers through load_prior

def _images(n=2, size=8, seed=0):
    return 0.2 + 0.6 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each container format with a tiny random network, and the network it was saved from."""
    folder = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("vp", "ve"):
        net = tiny_score_sde(kind, image_size=8)
        save_score_sde_checkpoint(net, folder / f"{kind}.pth")
        (folder / f"{kind}.json").write_text(json.dumps({**TINY_SCORE_SDE[kind], "image_size": 8}))
        out[kind] = (net, folder / f"{kind}.pth", str(folder / f"{kind}.json"))
    net = tiny_ncsnv2()
    save_ncsnv2_checkpoint(net, folder / "ncsnv2.pth")
    out["ncsnv2"] = (net, folder / "ncsnv2.pth", None)
    return out


def test_score_sde_vp_container_loads_with_the_ema_weights_and_the_vp_convention(saved):
    net, path, config = saved["vp"]
    prior = load_prior(path, config=config)
    x, t = _images(), torch.tensor([0.1, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(prior.model(x, 999 * t), net(x, 999 * t))
        raw = load_prior(path, config=config, ema=False)
        assert not torch.allclose(raw.model(x, 999 * t), net(x, 999 * t))  # the EMA weights were the default
    card = prior.describe()
    assert card["format"] == "score_sde" and card["weights"] == "ema" and card["data_range"] == "[-1, 1]"
    assert card["noise_parametrisation"] == "epsilon (VP)" and card["time_input"].startswith("999 t")
    assert card["parameters"] == sum(p.numel() for p in net.parameters())


def test_score_sde_ve_and_ncsnv2_containers_load_as_saved(saved):
    x = _images()
    net, path, config = saved["ve"]
    prior = load_prior(path, config=config)
    with torch.no_grad():
        torch.testing.assert_close(prior.net(x, torch.tensor([0.05, 0.3])), net(x, torch.tensor([0.05, 0.3])))
    assert prior.describe()["data_range"] == "[0, 1]" and prior.describe()["format"] == "score_sde"
    net, path, _ = saved["ncsnv2"]
    prior = load_prior(path)  # config inferred from the weights; sigmas from the checkpoint's buffer
    with torch.no_grad():
        torch.testing.assert_close(prior.net(x, torch.tensor([0, 7])), net(x, torch.tensor([0, 7])))
    card = prior.describe()
    assert card["format"] == "ncsnv2" and card["weights"] == "ema" and card["data_range"] == "[0, 1]"


def _vp_t_by_hand(sigma, beta_min=0.1, beta_max=20.0):
    """Solve alpha_bar(t) = 1 / (1 + (2 sigma)^2), log alpha_bar = -(beta_min t + (beta_max - beta_min) t^2 / 2)."""
    c = math.log(1 + (2 * sigma) ** 2)
    a = (beta_max - beta_min) / 2
    return (-beta_min + math.sqrt(beta_min**2 + 4 * a * c)) / (2 * a)


def test_vp_score_is_minus_eps_over_std_at_t_of_sigma(saved):
    net, path, config = saved["vp"]
    prior = load_prior(path, config=config)
    x, sigma = _images(n=1), 0.2
    t = _vp_t_by_hand(sigma)
    log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1  # score_sde's VPSDE.marginal_prob
    mean_coeff, std = math.exp(log_mean), math.sqrt(1 - math.exp(2 * log_mean))
    with torch.no_grad():
        eps = net(mean_coeff * (2 * x - 1), torch.tensor([999 * t]))
        score_xt = -eps / std
        # x_t = mean_coeff (2 x - 1): the chain rule gives the score in [0, 1] pixel units.
        torch.testing.assert_close(prior.score(x, sigma), 2 * mean_coeff * score_xt, rtol=1e-4, atol=1e-4)


def test_ve_score_is_the_network_output_and_ncsnv2_divides_by_the_level_sigma(saved):
    x = _images(n=1)
    net, path, config = saved["ve"]
    with torch.no_grad():
        torch.testing.assert_close(load_prior(path, config=config).score(x, 0.1), net(x, torch.tensor([0.1])),
                                   rtol=1e-4, atol=1e-4)
    net, path, _ = saved["ncsnv2"]
    prior = load_prior(path)
    with torch.no_grad():
        level = 4
        sigma = float(net.sigmas[level])
        torch.testing.assert_close(prior.score(x, sigma), net(x, torch.tensor([level])), rtol=1e-4, atol=1e-4)
        # ADP's sigma-unconditional use: f(x) = net(x, i) sigma_i approximates -eps, so D = x + sigma f(x) at any sigma.
        minus_eps = net(x, torch.tensor([0])) * net.sigmas[0]
        torch.testing.assert_close(prior.denoise(x, 0.123), x + 0.123 * minus_eps, rtol=1e-4, atol=1e-4)


class _ExactGaussianScore(torch.nn.Module):
    """Exact networks for data N(m, s^2 I) on [0, 1], each in one of the authors' parametrisations."""

    def __init__(self, kind, m=0.4, s=0.15, sigmas=None):
        super().__init__()
        self.kind, self.m, self.s = kind, m, s
        if sigmas is not None:
            self.register_buffer("sigmas", sigmas)

    def forward(self, x, time):
        if self.kind == "vp":  # x_t = sqrt(ab) y + sqrt(1 - ab) eps, y ~ N(2m - 1, (2s)^2)
            t = time / 999
            ab = torch.exp(-0.1 * t - 0.5 * (20.0 - 0.1) * t**2).reshape(-1, 1, 1, 1)
            var = ab * (2 * self.s) ** 2 + 1 - ab
            return (1 - ab).sqrt() * (x - ab.sqrt() * (2 * self.m - 1)) / var
        if self.kind == "ve":  # the score of N(m, s^2 + sigma^2)
            return -(x - self.m) / (self.s**2 + time.reshape(-1, 1, 1, 1) ** 2)
        sigma = self.sigmas[time].reshape(-1, 1, 1, 1)  # NCSNv2: the score at level `time`
        return -(x - self.m) / (self.s**2 + sigma**2)


def test_wrappers_of_exact_gaussian_networks_give_the_closed_form_denoiser():
    from purifiers import EpsilonPrior, NCSNv2Prior, VEScorePrior

    exact = GaussianPrior(mean=0.4, std=0.15)
    x = _images(n=2)
    sigmas = torch.tensor([0.5, 0.2, 0.05])
    for prior, sigma in ((EpsilonPrior.vp(_ExactGaussianScore("vp")), 0.17),
                         (VEScorePrior(_ExactGaussianScore("ve")), 0.17),
                         (NCSNv2Prior(_ExactGaussianScore("ncsnv2", sigmas=sigmas)), 0.2)):  # 0.2: a training level
        torch.testing.assert_close(prior.denoise(x, sigma), exact.denoise(x, sigma), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input

class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_container_holding_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "ema": {"shadow_params": []}, "step": 0, "hook": _RunsCode()}, path)
    with pytest.raises(ValueError, match="refusing to load .*arbitrary code"):
        load_prior(path)
    with open(tmp_path / "evil_plain.pkl", "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_prior(tmp_path / "evil_plain.pkl")


def test_wrong_truncated_and_missing_files_get_clear_errors(tmp_path, saved):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_prior(tmp_path / "notes.pth")
    data = saved["vp"][1].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_prior(tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_prior(tmp_path / "absent.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="cannot tell what checkpoint .* score_sde .* ncsnv2"):
        load_prior(tmp_path / "plain.pth")


def test_a_checkpoint_of_another_architecture_fails_naming_the_format_and_the_keys(saved):
    vp_path = saved["vp"][1]
    with pytest.raises(ValueError, match=r"score_sde checkpoint: no known config .* closest .* missing keys"):
        load_prior(vp_path)  # a tiny network matches none of the named configs
    with pytest.raises(ValueError, match=r"score_sde \(vp/cifar10_ddpmpp_continuous\).*missing keys \(first: \["):
        load_prior(vp_path, config="vp/cifar10_ddpmpp_continuous")
    with pytest.raises(ValueError, match=r"is not a ncsnv2 checkpoint .* it looks like score_sde"):
        load_prior(vp_path, format="ncsnv2")
    with pytest.raises(ValueError, match="ambiguous"):
        load_prior(vp_path, config="cifar10_ncsnpp_continuous")


def test_configs_read_safely(tmp_path, saved):
    _, path, _ = saved["ncsnv2"]
    (tmp_path / "config.yml").write_text("!!python/object:argparse.Namespace\ndata: {}\n")
    with pytest.raises(ValueError, match="needs unsafe YAML"):
        load_prior(path, config=str(tmp_path / "config.yml"))
    import yaml

    (tmp_path / "plain.yml").write_text(yaml.safe_dump({"data": {"rescaled": True, "channels": 3},
                                                        "model": {**TINY_NCSNV2, "ema": True}}))
    assert load_prior(path, config=str(tmp_path / "plain.yml")).describe()["data_range"] == "[-1, 1]"
    (tmp_path / "typo.json").write_text(json.dumps({"model": {"ngff": 8}}))
    with pytest.raises(ValueError, match=r"unknown keys \['ngff'\]"):
        load_prior(path, config=str(tmp_path / "typo.json"))
