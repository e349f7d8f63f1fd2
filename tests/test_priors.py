"""The prior layer against closed forms: Gaussian data, the VP-SDE integral, DDPM's schedule as diffusers defines it."""

import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from purifiers import DenoiserPrior, EDMDenoiser, EpsilonPrior, GaussianPrior, load_prior
from purifiers.conventions import DDPMSchedule, VPSchedule, pixel_sigma_to_pm1, pm1_sigma_to_pixel, to_01, to_pm1
from purifiers.nets.unet import SmallUNet
from purifiers.priors.backends import load_state_dict_safely
from purifiers.priors.loading import save_builtin_prior

MU, STD = 0.3, 0.15


def _images(n=4, c=1, size=8, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_gaussian_score_is_the_closed_form():
    # Data N(mu, s^2) plus noise sigma has marginal N(mu, s^2 + sigma^2): score = -(x - mu) / (s^2 + sigma^2).
    prior = GaussianPrior(MU, STD)
    x = _images() * 2 - 0.5
    for sigma in (0.05, 0.3, 1.0):
        expected = -(x - MU) / (STD**2 + sigma**2)
        torch.testing.assert_close(prior.score(x, sigma), expected, rtol=1e-5, atol=1e-5)


def test_score_is_tweedie_of_denoiser_with_per_image_sigma():
    prior = GaussianPrior(MU, STD)
    x, sigma = _images(), torch.tensor([0.1, 0.2, 0.4, 0.8])
    expected = (prior.denoise(x, sigma) - x) / sigma.view(-1, 1, 1, 1) ** 2
    torch.testing.assert_close(prior.score(x, sigma), expected)


def test_range_conversions_round_trip():
    x = _images()
    torch.testing.assert_close(to_01(to_pm1(x)), x)
    assert to_pm1(torch.tensor(0.0)) == -1 and to_pm1(torch.tensor(1.0)) == 1
    assert pm1_sigma_to_pixel(0.5) == 0.25 and pixel_sigma_to_pm1(0.25) == 0.5


def test_vp_alpha_bar_is_exp_of_integrated_beta():
    vp = VPSchedule()
    for t in (0.01, 0.1, 0.5, 1.0):
        grid = np.linspace(0, t, 20001)
        integral = np.trapezoid(vp.beta(grid), grid)
        assert math.isclose(vp.alpha_bar(t), math.exp(-integral), rel_tol=1e-6)


def test_vp_sigma_and_time_are_inverse_and_match_ve_form():
    vp = VPSchedule()
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    sigma = vp.sigma(t)
    # x_t / sqrt(a) = x + sqrt(1/a - 1) eps on [-1, 1]: pixel sigma is half of that.
    torch.testing.assert_close(sigma, torch.sqrt(1 / vp.alpha_bar(t) - 1) / 2, rtol=1e-10, atol=0)
    torch.testing.assert_close(vp.t_of_sigma(sigma), t, rtol=1e-7, atol=1e-10)
    # DiffPure's t* = 0.1 is [-1, 1] sigma ~ 0.34 (anchors.md §2): pixel sigma ~ 0.17.
    assert abs(pixel_sigma_to_pm1(vp.sigma(0.1)) - 0.34) < 0.01


def test_ddpm_schedule_matches_diffusers_and_interpolates():
    from diffusers import DDPMScheduler

    ours = DDPMSchedule()
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    steps = torch.tensor([0.0, 10.0, 499.0, 999.0])
    torch.testing.assert_close(ours.timestep_of_sigma(ours.sigma_of_timestep(steps)), steps.double(), rtol=0, atol=1e-6)
    halfway = ours.timestep_of_sigma(ours.sigma_of_timestep(torch.tensor(10.5)))
    assert abs(float(halfway) - 10.5) < 1e-6


class _ExactGaussianEps(nn.Module):
    """The exact noise predictor E[eps | x_t] for [-1, 1] data N(m, v), under the continuous VP-SDE at time 999 t."""

    def __init__(self, mean01, std01):
        super().__init__()
        self.m, self.v = 2 * mean01 - 1, (2 * std01) ** 2

    def forward(self, x_t, time):
        a = VPSchedule().alpha_bar(time / 999.0).to(x_t).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.m) / (a * self.v + 1 - a)


def test_epsilon_prior_with_exact_eps_model_is_the_gaussian_denoiser():
    exact = GaussianPrior(MU, STD)
    eps_prior = EpsilonPrior.vp(_ExactGaussianEps(MU, STD))
    x = _images() * 1.4 - 0.2
    for sigma in (0.02, 0.17, 0.6):
        torch.testing.assert_close(eps_prior.denoise(x, sigma), exact.denoise(x, sigma), rtol=1e-5, atol=1e-5)


def test_denoiser_adapter_pm1_converts_data_and_sigma():
    class PM1Gaussian(nn.Module):  # the Gaussian denoiser written on the [-1, 1] scale
        def forward(self, x, sigma):
            m, v = 2 * MU - 1, (2 * STD) ** 2
            return m + v / (v + sigma.view(-1, 1, 1, 1) ** 2) * (x - m)

    x = _images()
    torch.testing.assert_close(DenoiserPrior(PM1Gaussian(), "pm1").denoise(x, 0.3),
                               GaussianPrior(MU, STD).denoise(x, 0.3), rtol=1e-5, atol=1e-6)


def test_edm_preconditioning_with_zero_network_is_c_skip():
    class Zero(nn.Module):
        def forward(self, x, c_noise):
            return torch.zeros_like(x)

    x, sigma = _images(), 0.2
    s = 2 * sigma
    c_skip = 0.25 / (s**2 + 0.25)  # Karras et al. 2022, Table 1, sigma_data = 0.5
    torch.testing.assert_close(EDMDenoiser(Zero()).denoise(x, sigma), (c_skip * (2 * x - 1) + 1) / 2)


def _tiny_unet2d(channels=1):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_diffusers_round_trip_matches_the_ddpm_formula(tmp_path):
    from diffusers import DDPMScheduler

    unet = _tiny_unet2d(3)
    unet.save_pretrained(tmp_path / "ddpm")
    prior = load_prior(str(tmp_path / "ddpm"))
    assert isinstance(prior, EpsilonPrior)

    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    x = _images(c=3)
    for timestep in (20, 500):
        a = alphas_cumprod[timestep]
        sigma = float(torch.sqrt((1 - a) / a) / 2)  # pixel sigma of this DDPM step
        with torch.no_grad():
            y = 2 * x - 1
            eps = unet(a.sqrt().float() * y, timestep).sample
            expected = (y - 2 * sigma * eps + 1) / 2
            got = prior.denoise(x, sigma)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_pipeline_folder_with_unet_subfolder_and_scheduler(tmp_path):
    from diffusers import DDPMScheduler

    _tiny_unet2d().save_pretrained(tmp_path / "pipe" / "unet")
    assert isinstance(load_prior(str(tmp_path / "pipe")), EpsilonPrior)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "pipe" / "scheduler")
    with pytest.raises(ValueError, match="linear-beta"):
        load_prior(str(tmp_path / "pipe"))


def test_builtin_prior_save_load_round_trip(tmp_path):
    net = SmallUNet(1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    prior = EDMDenoiser(net).eval()
    path = str(tmp_path / "p.safetensors")
    save_builtin_prior(prior, path, card={"hello": 1})
    loaded = load_prior(path)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoise(x, 0.3), prior.denoise(x, 0.3))
    assert (tmp_path / "p.json").exists()


def test_nfe_counts_forward_and_backward_images():
    prior = GaussianPrior(MU, STD)
    x = _images(n=5).requires_grad_(True)
    prior.denoise(x, 0.1).sum().backward()
    prior.denoise(x.detach(), 0.1)
    assert (prior.nfe.forward, prior.nfe.backward) == (10, 5)


@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    (torch.rand(1, 8, 8), "4-D"),
    (torch.randint(0, 255, (2, 1, 8, 8)), "dtype"),
    (torch.rand(2, 1, 8, 8) * 255, "0-255"),
])
def test_prior_rejects_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        GaussianPrior().denoise(bad, 0.1)


def test_prior_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        GaussianPrior().denoise(_images(), -0.1)
    with pytest.raises(ValueError, match="entries"):
        GaussianPrior().denoise(_images(n=4), torch.ones(3))


class _Payload:
    """Unpickling this runs code (a reduce to print); a weights loader must refuse it."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_loader_refuses_pickles_with_code(tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict_safely(str(path))
    # The same through a diffusers folder whose weights are such a pickle.
    folder = tmp_path / "ddpm"
    _tiny_unet2d().save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="refusing to load"):
        load_prior(str(folder))


def test_load_prior_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prior(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="kind="):
        load_prior(nn.Identity())
    other = tmp_path / "x.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="cannot tell what checkpoint .*x.safetensors is: a dict with keys"):
        load_prior(str(other))
