"""Every public entry of ``purifiers`` against arbitrary input (hypothesis): a purified batch in [0, 1] without NaN,
or a ``ValueError`` naming the problem; plus the entry contracts: input validated once, any float dtype accepted the
same way by every purifier, seeded purification independent of the batch size, the device convention, corrupt
weight files named, and the speed options exact within float rounding."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import SIZE, images, tiny_prior
from torch import nn

import purifiers.validation
from purifiers import (ADP, COUP, ADPPyTorch, COUPPyTorch, DiffPure, DiffPurePyTorch, PurifiedClassifier, ScoreOpt,
                       ScoreOptPyTorch, load_prior)
from purifiers.priors.backends import Prior
from purifiers.priors.loading import save_builtin_prior
from purifiers.priors.speed import SpeedOptions

PRIOR = tiny_prior(torch.float32)
torch.manual_seed(0)
# Takes any image size (the linear tiny classifier takes 8x8 only), so the purifiers' own checks are what is tested.
CLASSIFIER = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 10)).eval()
FAST = dict(seed=0, device_type="cpu")


def _wrappers(prior=PRIOR, **kwargs):
    kw = {**FAST, **kwargs}
    return {"adp": ADPPyTorch(prior, steps=1, **kw),
            "scoreopt": ScoreOptPyTorch(prior, steps=1, **kw),
            "coup": COUPPyTorch(prior, CLASSIFIER, t_star=0.004, dt=2e-3, **kw),
            "diffpure": DiffPurePyTorch(prior, t_star=0.004, dt=2e-3, **kw)}


WRAPPERS = _wrappers()
PROBLEM_WORDS = ("dtype", "empty", "4-D", "channels", "NaN", "outside", "255", "multiples", "numpy", "Tensor")
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


CORRUPTIONS = (None, "ndim3", "ndim5", "empty", "channels", "odd_side", "integer", "below", "above", "0-255", "nan",
               "inf")


@st.composite
def batches(draw):
    """Image-like arrays: a valid batch (1-3 images, sides 4/6/8, float32/64/16, values in [0, 1] or a sub-range) half
    of the time, else one corruption: 3-D or 5-D, empty, 3 channels, an odd side, an integer dtype, values below 0 or
    above 1, 0-255 data, a NaN or an infinity."""
    corruption = draw(st.sampled_from((None,) * (len(CORRUPTIONS) - 1) + CORRUPTIONS[1:]))
    n = 0 if corruption == "empty" else draw(st.integers(1, 3))
    c = 3 if corruption == "channels" else 1
    h, w = draw(st.sampled_from([4, 6, SIZE])), draw(st.sampled_from([4, 6, SIZE]))
    if corruption == "odd_side":
        w += 1
    dtype = np.int64 if corruption == "integer" else draw(st.sampled_from([np.float32, np.float64, np.float16]))
    low, high = draw(st.sampled_from([(0.0, 1.0), (0.2, 0.8), (0.0, 0.1), (0.9, 1.0)]))
    low, high = {"below": (-0.5, 0.5), "above": (0.5, 1.3), "0-255": (0.0, 255.0)}.get(corruption, (low, high))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = low + (high - low) * rng.random((n, c, h, w))
    if corruption in ("nan", "inf"):
        x.reshape(-1)[rng.integers(x.size)] = np.nan if corruption == "nan" else -np.inf * rng.choice([-1, 1])
    x = x.astype(dtype)
    if corruption == "ndim3":
        x = x[:, 0]
    elif corruption == "ndim5":
        x = x[..., None]
    if draw(st.booleans()):  # the same batch channels-last, flagged by the caller
        return np.moveaxis(x, 1, -1) if x.ndim == 4 else x, False
    return x, True


def _is_valid(x: np.ndarray, channels_first: bool = True) -> bool:
    if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4 or x.shape[0] == 0:
        return False
    n, c, h, w = x.shape if channels_first else (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
    xf = x.astype(np.float64)
    return c == 1 and h % 2 == 0 and w % 2 == 0 and bool(np.isfinite(xf).all()) and xf.min() >= -1e-4 \
        and xf.max() <= 1 + 1e-4


def _check_outcome(run, x, valid):
    try:
        out = run()
    except ValueError as err:
        assert not valid, f"valid input refused: {err}"
        assert any(word in str(err) for word in PROBLEM_WORDS), f"the error does not name the problem: {err}"
        return None
    assert valid, "invalid input accepted"
    out = np.asarray(out)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    return out


@pytest.mark.parametrize("name", sorted(WRAPPERS))
@HYPOTHESIS
@given(batch=batches())
def test_wrappers_purify_or_name_the_problem(name, batch):
    x, channels_first = batch
    purifier = WRAPPERS[name]
    purifier.set_params(channels_first=channels_first)
    try:
        _check_outcome(lambda: purifier(x)[0], x, _is_valid(x, channels_first))
        if x.ndim == 4:  # the tensor entry, with a gradient taken when the input is valid
            tensor = torch.from_numpy(x)
            _check_outcome(lambda: purifier.forward(tensor)[0].numpy(), x, _is_valid(x, channels_first))
    finally:
        purifier.set_params(channels_first=True)


@HYPOTHESIS
@given(batch=batches(), runs=st.integers(1, 2))
def test_purified_classifier_scores_or_names_the_problem(batch, runs):
    x = batch[0] if batch[1] else np.moveaxis(batch[0], -1, 1)  # the classifier takes NCHW
    model = PurifiedClassifier(WRAPPERS["adp"], CLASSIFIER, runs=runs)
    valid = _is_valid(x)
    try:
        with torch.no_grad():
            scores = model(torch.from_numpy(x))
    except ValueError as err:
        assert not valid, f"valid input refused: {err}"
        assert any(word in str(err) for word in PROBLEM_WORDS), str(err)
        return
    assert valid and scores.shape == (x.shape[0], 10) and torch.isfinite(scores).all()


@HYPOTHESIS
@given(batch=batches(), sigma=st.sampled_from([0.1, 0.5, 2.0, 0.1, 0.0, -0.1, float("nan"), float("inf")]))
def test_prior_denoise_denoises_or_names_the_problem(batch, sigma):
    x = batch[0] if batch[1] else np.moveaxis(batch[0], -1, 1)
    # The prior takes noisy images: values may leave [0, 1], but not NaN, 0-255 data or a bad sigma.
    valid_x = (np.issubdtype(x.dtype, np.floating) and x.ndim == 4 and x.shape[0] > 0
               and bool(np.isfinite(x.astype(np.float64)).all()) and x.shape[1] == 1
               and np.abs(x.astype(np.float64)).max() <= 2.0 + 10.0 * sigma and x.shape[2] % 2 == 0
               and x.shape[3] % 2 == 0)
    valid = valid_x and np.isfinite(sigma) and sigma > 0
    try:
        out = PRIOR.denoise(torch.from_numpy(x), sigma)
    except ValueError as err:
        assert not valid, f"valid input refused: {err}"
        assert any(w in str(err) for w in PROBLEM_WORDS + ("sigma",)), str(err)
        return
    except RuntimeError:  # odd sides or channels reach the network: denoise is not the purifiers' validator
        assert x.shape[1] != 1 or x.shape[2] % 2 or x.shape[3] % 2
        return
    assert valid and torch.isfinite(out).all() and out.dtype == torch.from_numpy(x).dtype


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 0.999), junk=st.binary(max_size=64))
def test_a_corrupt_prior_file_is_named(tmp_path_factory, cut, junk):
    folder = tmp_path_factory.mktemp("prior")
    good = folder / "good.safetensors"
    save_builtin_prior(tiny_prior(torch.float32), str(good))
    data = good.read_bytes()
    for name, content in (("truncated", data[:int(cut * len(data))]), ("junk", junk)):
        path = folder / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=str(path)):
            load_prior(str(path))
    assert isinstance(load_prior(str(good)), Prior)


# ---------------------------------------------------------------------------------------------------------------------
# validated once, at the entry

def test_input_is_validated_once_per_call_and_never_in_the_loops(monkeypatch):
    calls = []
    original = purifiers.validation.check_images

    def counting(*args, **kwargs):
        calls.append(kwargs.get("name"))
        return original(*args, **kwargs)

    for module in ("purifiers.art_base", "purifiers.priors.backends", "purifiers.adp", "purifiers.scoreopt", "purifiers.vpsde"):
        monkeypatch.setattr(f"{module}.check_images", counting)
    x = images(n=3, dtype=torch.float32)
    for name, purifier in _wrappers(batch_size=1).items():
        for with_gradient in (False, True):
            calls.clear()
            purifier.set_params(gradient="bpda")
            purifier.purify(x.clone().requires_grad_(with_gradient), with_gradient)
            assert calls == ["purifier input"], (name, calls)  # 3 chunks, 2+ steps: still one check
            purifier(x.numpy())
    calls.clear()
    with torch.no_grad():
        ADP(PRIOR, steps=3)(x)
        ScoreOpt(PRIOR, steps=2)(x)
        COUP(PRIOR, CLASSIFIER, t_star=0.006, dt=2e-3)(x)
    assert calls == ["ADP input", "ScoreOpt input", "purifier input"]


# ---------------------------------------------------------------------------------------------------------------------
# dtypes and devices: the same rule for every purifier

@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_any_float_dtype_is_computed_in_the_network_dtype_and_returned_in_its_own(name):
    x32 = images(n=2, dtype=torch.float32).numpy()
    outputs = {}
    for dtype in (np.float32, np.float64, np.float16):
        purifier = _wrappers()[name]
        outputs[dtype], _ = purifier(x32.astype(dtype))
        assert outputs[dtype].dtype == dtype
    np.testing.assert_allclose(outputs[np.float64], outputs[np.float32], rtol=0, atol=1e-6)
    # float16 input rounds the image (1e-3); Adam's first step (ScoreOpt) is lr * sign(gradient), which flips for a
    # pixel whose gradient is near zero, so compare almost every pixel rather than all.
    assert np.mean(np.abs(outputs[np.float16] - outputs[np.float32]) < 2e-2) > 0.95


def test_the_algorithms_accept_float64_input_with_a_float32_prior():
    x = images(n=2, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for algorithm in (ADP(PRIOR, steps=1), ScoreOpt(PRIOR, steps=1), COUP(PRIOR, CLASSIFIER, t_star=0.004, dt=2e-3),
                      DiffPure(PRIOR, t_star=0.004, dt=2e-3)):
        out = algorithm(x, generator=gen())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, algorithm(x.float(), generator=gen()).double(), rtol=0, atol=1e-6)


def test_device_type_follows_art_and_the_input():
    purifier = ADPPyTorch(PRIOR, steps=1)
    assert purifier.device_type == ("gpu" if torch.cuda.is_available() else "cpu")
    assert purifier.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    out, _ = purifier.forward(images(n=1, dtype=torch.float32))
    assert out.device.type == "cpu"  # the purification runs where the input lives
    with pytest.raises(ValueError, match="device_type"):
        ADPPyTorch(PRIOR, device_type="tpu")


# ---------------------------------------------------------------------------------------------------------------------
# seeds: per-image noise streams; bit-identical on CPU whatever the batch size with batch_invariant=True

@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_seeded_purification_is_bit_identical_whatever_the_batch_size(name):
    x = images(n=11, dtype=torch.float32).numpy()
    results = []
    prior = tiny_prior(torch.float32)
    for batch_size in (11, 4, 1):
        purifier = _wrappers(prior, batch_invariant=True, batch_size=batch_size)[name]
        results.append(purifier(x)[0])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    # the first rows purified alone draw the same noise as in the full batch (per-image streams)
    np.testing.assert_array_equal(_wrappers(prior, batch_invariant=True)[name](x[:3])[0], results[0][:3])


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_without_batch_invariance_batch_sizes_agree_to_float_rounding(name):
    x = images(n=9, dtype=torch.float32).numpy()
    full = _wrappers(batch_size=9)[name](x)[0]
    chunked = _wrappers(batch_size=2)[name](x)[0]
    close = np.abs(chunked - full) < 1e-5
    assert close.mean() > 0.98, close.mean()  # a ScoreOpt pixel may flip its first Adam step (lr * sign(gradient))


# ---------------------------------------------------------------------------------------------------------------------
# speed options

def test_no_grad_denoise_runs_in_inference_mode_and_returns_an_ordinary_tensor():
    x = images(n=2, dtype=torch.float32)
    with torch.no_grad():
        out = PRIOR.denoise(x, 0.2)
    assert not out.is_inference()
    torch.testing.assert_close(out, PRIOR.denoise(x, 0.2).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_channels_last_matches_the_default_layout_within_rounding(name):
    x = images(n=3, dtype=torch.float32).numpy()
    reference = _wrappers(tiny_prior(torch.float32))[name](x)[0]
    fast = _wrappers(tiny_prior(torch.float32), channels_last=True)[name](x)[0]
    # ADP's step size divides a score difference over a 1e-5 probe, which scales float32 rounding up ~100x.
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-4 if name == "adp" else 1e-5)


def test_compile_option_matches_eager_within_rounding():
    # torch.compile with the "eager" backend traces the denoiser (dynamo) without code generation: the test checks
    # the plumbing in seconds; compile=True (inductor) is the one to time.
    x = images(n=3, dtype=torch.float32).numpy()
    reference = ADPPyTorch(tiny_prior(torch.float32), steps=2, **FAST)(x)[0]
    prior = tiny_prior(torch.float32)
    compiled = ADPPyTorch(prior, steps=2, compile={"backend": "eager"}, **FAST)
    np.testing.assert_allclose(compiled(x)[0], reference, rtol=0, atol=1e-5)
    assert prior._compiled_denoise is not None
    prior.set_speed_options(SpeedOptions())  # default options leave the prior's as they are
    assert prior.speed_options.compile == {"backend": "eager"}


def test_mixed_precision_is_refused_on_cpu():
    with pytest.raises(ValueError, match="amp"):
        ADPPyTorch(PRIOR, amp="bf16", device_type="cpu")
    with pytest.raises(ValueError, match="amp must be"):
        ADPPyTorch(PRIOR, amp="fp8")
    purifier = ADPPyTorch(tiny_prior(torch.float32), amp="fp16", device_type="gpu")
    with pytest.raises(ValueError, match="CUDA"):
        purifier.forward(images(n=1, dtype=torch.float32))
