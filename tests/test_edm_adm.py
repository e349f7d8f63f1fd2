"""The authors' checkpoints: EDM networks and pickles (read without running their code), guided-diffusion's ADM.

Fixtures (``tests/reference_fixtures/``), recorded from the reference implementations (repository and commit inside each file),
never from this package's code: ``{name: shape}`` of ``state_dict()`` per released configuration, and
``reference_outputs_*.json``, the outputs of small reference networks whose weights follow a fixed formula.
"""

import builtins
import collections
import copyreg
import io
import json
import math
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.commands import reproduce as reproduce_command
from purifiers import conventions
from purifiers.nets import adm, edm
from purifiers.priors.checkpoints.edm import EDM_PRESETS, PreconditionedPrior
from purifiers.priors.checkpoints.edm_pickle import ALLOWED_GLOBALS, RestrictedUnpickler, read_edm_pickle
from purifiers.priors.loading import load_prior

FIXTURES = Path(__file__).parent / "reference_fixtures"
GEN = torch.Generator().manual_seed(0)

# Small configurations (fast on CPU) of each EDM flavour; 16x16 images.
SMALL_DDPMPP = dict(class_name="EDMPrecond", img_resolution=16, img_channels=3, model_type="SongUNet",
                    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9,
                    dropout=0.13, embedding_type="positional", channel_mult_noise=1, resample_filter=[1, 1])
SMALL_NCSNPP = dict(SMALL_DDPMPP, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                    resample_filter=[1, 3, 3, 1])
SMALL_DHARIWAL = dict(class_name="EDMPrecond", img_resolution=16, img_channels=3, model_type="DhariwalUNet",
                      model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
SMALL_ADM = dict(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=[8], learn_sigma=True,
                 channel_mult=[1, 2], num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True)


def _build(config, precond=None):
    config = dict(config)
    cls = edm.PRECONDITIONERS[precond or config.pop("class_name")]
    config.pop("class_name", None)
    torch.manual_seed(0)
    net = cls(**config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1, generator=GEN)
    return net


def _images(n=2, side=16, channels=3):
    return 0.2 + 0.6 * torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------------
# Architectures against the reference-recorded fixtures
# ----------------------------------------------------------------------------------------------------------------------

def _fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["edm_cifar10_32x32_uncond_vp", "edm_cifar10_32x32_uncond_ve",
                                  "edm_imagenet_64x64_cond_adm", "adm_256x256_uncond", "adm_128x128_cond",
                                  "adm_64x64_cond"])
def test_state_dict_names_and_shapes_equal_the_reference(name):
    fixture = _fixture(name)
    assert len(fixture["commit"]) == 40
    config = dict(fixture["config"])
    with torch.device("meta"):  # full-size networks: shapes only
        if name.startswith("adm"):
            net = adm.ADMUNet(**adm.PRESETS[name.removeprefix("adm_")])
        else:
            net = edm.PRECONDITIONERS[config.pop("class_name")](**config)
    ours = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert ours == list(fixture["state_dict"].items())


@pytest.mark.parametrize("name, loader, preset", [
    ("adm_256x256_uncond", "adm", "256x256_uncond"), ("adm_128x128_cond", "adm", "128x128_cond"),
    ("adm_64x64_cond", "adm", "64x64_cond"),
    ("edm_cifar10_32x32_uncond_vp", "edm", "edm-cifar10-32x32-uncond-vp"),
    ("edm_cifar10_32x32_uncond_ve", "edm", "edm-cifar10-32x32-uncond-ve")])
def test_a_state_dict_shaped_like_the_released_file_is_recognised(name, loader, preset):
    """Without config=, the preset is found from the shapes: here those the reference recorded (meta tensors)."""
    from purifiers.priors.checkpoints import FORMATS
    from purifiers.priors.checkpoints import edm as edm_format
    from purifiers.priors.checkpoints import guided_diffusion
    from purifiers.priors.checkpoints.common import matching_preset

    state = {k: torch.empty(shape, device="meta") for k, shape in _fixture(name)["state_dict"].items()}
    if loader == "adm":
        assert matching_preset(state, adm.PRESETS, guided_diffusion._build_adm, "ADM") == adm.PRESETS[preset]
        assert [name for name, fmt in FORMATS.items() if fmt.matches(state)] == ["guided-diffusion"]
    else:
        assert matching_preset(state, EDM_PRESETS, edm_format._build_edm, "EDM") == EDM_PRESETS[preset]
        assert [name for name, fmt in FORMATS.items() if fmt.matches(state)] == ["edm-state-dict"]


def _formula_weights(net):
    """The weights the reference-output fixtures were recorded with (their "recorded_with" says the same)."""
    state = {}
    for i, (name, value) in enumerate(net.state_dict().items()):
        w = torch.sin(torch.arange(value.numel(), dtype=torch.float64) * 0.37 + i)
        if name.endswith("freqs"):
            w = 4.0 * w
        elif name.endswith("weight") and value.ndim == 1:  # normalisation gains
            w = 1.0 + 0.5 * w
        else:
            w = 0.15 * w
        state[name] = w.reshape(value.shape).to(value.dtype)
    net.load_state_dict(state)
    return net


def _formula_input():
    return torch.cos(torch.arange(2 * 3 * 8 * 8, dtype=torch.float64) * 0.11).reshape(2, 3, 8, 8).float()


@pytest.mark.parametrize("case", ["edm_ddpmpp", "ve_ncsnpp", "vp_ddpmpp", "edm_dhariwal"])
def test_edm_outputs_equal_the_reference_outputs(case):
    recorded = json.loads((FIXTURES / "reference_outputs_edm.json").read_text())["cases"][case]
    config = dict(recorded["config"])
    net = _formula_weights(edm.PRECONDITIONERS[config.pop("class_name")](**config).eval())
    with torch.no_grad():
        out = net(_formula_input(), torch.tensor(recorded["sigma"]))
    # The tolerance covers float32 summation order, which depends on the CPU's kernels (measured: 6e-6 on the machine
    # that recorded the fixture, 5.0e-5 on an Intel Xeon @ 2.80GHz with torch 2.14.1); a wrong attention scale moves
    # outputs by 2e-4.
    torch.testing.assert_close(out.flatten(), torch.tensor(recorded["output"]), rtol=1e-5, atol=1e-4)


def _adm_kwargs(flags):
    """Our ADMUNet arguments for guided-diffusion's ``create_model`` flags (as its README spells them)."""
    renamed = {"num_channels": "model_channels"}
    dropped = {"use_fp16", "class_cond", "attention_resolutions", "channel_mult"}
    kwargs = {renamed.get(k, k): v for k, v in flags.items() if k not in dropped}
    kwargs["attention_resolutions"] = [int(r) for r in flags["attention_resolutions"].split(",")]
    if flags.get("channel_mult"):
        kwargs["channel_mult"] = [int(m) for m in flags["channel_mult"].split(",")]
    if flags.get("class_cond"):
        kwargs["num_classes"] = 1000  # guided-diffusion's NUM_CLASSES
    return kwargs


@pytest.mark.parametrize("name", ["adm_256x256_uncond", "adm_128x128_cond", "adm_64x64_cond"])
def test_adm_presets_are_the_recorded_configs(name):
    preset = adm.PRESETS[name.removeprefix("adm_")]
    preset = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()}
    assert preset == _adm_kwargs(_fixture(name)["config"])


@pytest.mark.parametrize("case", ["adm_small", "adm_small_cond"])
def test_adm_outputs_equal_the_reference_outputs(case):
    recorded = json.loads((FIXTURES / "reference_outputs_adm.json").read_text())["cases"][case]
    unet = _formula_weights(adm.ADMUNet(**_adm_kwargs(recorded["config"])).eval())
    labels = torch.tensor(recorded["class_labels"]) if "class_labels" in recorded else None
    with torch.no_grad():
        out = unet(_formula_input(), torch.tensor(recorded["timesteps"]), labels)
    assert out.shape == (2, 6, 8, 8)
    # The tolerance covers float32 summation order, which depends on the CPU's kernels (measured: 6e-6 on the machine
    # that recorded the fixture, 5.0e-5 on an Intel Xeon @ 2.80GHz with torch 2.14.1); a wrong attention scale moves
    # outputs by 2e-4.
    torch.testing.assert_close(out.flatten(), torch.tensor(recorded["output"]), rtol=1e-5, atol=1e-4)


def test_edm_presets_are_the_recorded_configs():
    for preset, fixture in (("edm-cifar10-32x32-uncond-vp", "edm_cifar10_32x32_uncond_vp"),
                            ("edm-cifar10-32x32-uncond-ve", "edm_cifar10_32x32_uncond_ve")):
        recorded = _fixture(fixture)["config"]
        assert {k: v for k, v in EDM_PRESETS[preset].items() if k != "use_fp16"} == \
            {k: v for k, v in recorded.items() if k != "use_fp16"}


# ----------------------------------------------------------------------------------------------------------------------
# Preconditioning (EDM Table 1), hand-computed
# ----------------------------------------------------------------------------------------------------------------------

# sigma on [-1, 1]: (c_skip, c_out, c_in, c_noise), computed by hand from Table 1 (sigma_data = 0.5; VP beta_min 0.1,
# beta_d 19.9, M = 1000: c_noise = 999 (sqrt(0.01 + 39.8 ln(1 + s^2)) - 0.1) / 19.9).
HAND = {
    "EDMPrecond": {1.0: (0.2, 0.4472136, 0.8944272, 0.0), 0.2: (0.8620690, 0.1856953, 1.8569534, -0.4023595)},
    "VPPrecond": {1.0: (1.0, -1.0, 0.7071068, 258.70130), 0.2: (1.0, -0.2, 0.9805807, 57.901295)},
    "VEPrecond": {1.0: (1.0, 1.0, 1.0, -0.6931472), 0.2: (1.0, 0.2, 1.0, -2.3025851)},
}
COEFFICIENTS = {"EDMPrecond": conventions.edm_preconditioning, "VPPrecond": conventions.vp_preconditioning,
                "VEPrecond": conventions.ve_preconditioning}


@pytest.mark.parametrize("precond", sorted(HAND))
def test_preconditioning_coefficients_match_table_1(precond):
    for sigma, expected in HAND[precond].items():
        got = [float(c) for c in COEFFICIENTS[precond](torch.tensor(sigma, dtype=torch.float64))]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


class _RecordingNet(nn.Module):
    """Stands in for the U-Net: records its inputs and returns a fixed F."""

    def forward(self, x, c_noise, class_labels=None):
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, 0.3)


@pytest.mark.parametrize("precond", sorted(HAND))
def test_preconditioner_applies_its_coefficients(precond):
    net = _build(SMALL_DDPMPP, precond)
    net.model = _RecordingNet()
    x, sigma = torch.randn(2, 3, 16, 16, generator=GEN), torch.tensor([1.0, 0.2])
    out = net(x, sigma)
    for i, s in enumerate((1.0, 0.2)):
        c_skip, c_out, c_in, c_noise = HAND[precond][s]
        torch.testing.assert_close(net.model.seen[0][i], c_in * x[i], rtol=1e-5, atol=1e-6)
        assert float(net.model.seen[1][i]) == pytest.approx(c_noise, rel=1e-5, abs=1e-5)
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * 0.3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [SMALL_DDPMPP, SMALL_NCSNPP], ids=["ddpmpp", "ncsnpp"])
def test_prior_score_is_tweedie_on_the_pixel_scale(config):
    """Pixel sigma 0.1 is EDM sigma 0.2: D_pixel = (c_skip y + c_out F(c_in y, ln(0.2)/4) + 1)/2 with y = 2x - 1, and
    the score is (D_pixel - x) / 0.1^2."""
    net = _build(config)
    prior = PreconditionedPrior(net, "test")
    x = _images()
    y = 2 * x - 1
    c_skip, c_out, c_in, c_noise = HAND["EDMPrecond"][0.2]
    with torch.no_grad():
        f = net.model(c_in * y, torch.full((2,), c_noise))
        expected_d = (c_skip * y + c_out * f + 1) / 2
        torch.testing.assert_close(prior.denoise(x, 0.1), expected_d, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(prior.score(x, 0.1), (expected_d - x) / 0.01, rtol=1e-4, atol=1e-3)
    assert f.abs().max() > 0.1  # the network contributes


# ----------------------------------------------------------------------------------------------------------------------
# EDM pickles: a test-only writer of torch_utils.persistence's layout
# ----------------------------------------------------------------------------------------------------------------------

# What a real EDM pickle embeds is the source of training/networks.py; executing it is what a normal unpickle does.
# This one marks and refuses its own execution.
EMBEDDED_SOURCE = ("import builtins\nbuiltins._edm_embedded_source_ran = True\n"
                   "raise RuntimeError('the embedded source of the pickle was executed')\n")


def _fake_reconstruct(meta):
    """What torch_utils.persistence._reconstruct_persistent_obj does first: exec the embedded module source."""
    exec(meta["module_src"], {})  # the test's own harmless source, run only to prove a plain unpickle runs it


class _Persistent:
    """Pickles as EDM's persistent classes do: ``_reconstruct_persistent_obj({type, version, module_src, class_name,
    state})``, state being the module's ``__dict__``."""

    def __init__(self, class_name, state):
        self.meta = dict(type="class", version=6, module_src=EMBEDDED_SOURCE, class_name=class_name, state=state)

    def __reduce__(self):
        return _fake_reconstruct, (self.meta,)


class _ModuleDictState:
    """Pickles as a plain ``torch.nn.ModuleDict`` does (protocol >= 2: NEWOBJ of the class, then BUILD)."""

    def __init__(self, state):
        self.state = state

    # pickle writes NEWOBJ only for an object of the class it names, so this stand-in reports that class.
    __class__ = property(lambda self: nn.ModuleDict)

    def __reduce__(self):
        return copyreg.__newobj__, (nn.ModuleDict,), self.state


def _module_state(module, init_kwargs=None):
    state = {"training": False, "_parameters": collections.OrderedDict(module._parameters),
             "_buffers": collections.OrderedDict(module._buffers),
             "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
             "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
             "_modules": collections.OrderedDict((n, _persisted(c)) for n, c in module._modules.items()),
             "_init_args": (), "_init_kwargs": init_kwargs or {}}
    if isinstance(module, edm.UNetBlock):
        state["skip_scale"] = np.float64(module.skip_scale)  # EDM stores np.sqrt(0.5): a numpy scalar global
    return state


def _persisted(module, init_kwargs=None):
    if module is None:
        return None
    if type(module) is nn.ModuleDict:
        return _ModuleDictState(_module_state(module))
    return _Persistent(type(module).__name__, _module_state(module, init_kwargs))


@pytest.fixture
def fake_torch_utils(monkeypatch):
    """``torch_utils.persistence`` as pickle needs it to write the global (and a plain unpickle to resolve it)."""
    package, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _fake_reconstruct
    _fake_reconstruct.__module__, _fake_reconstruct.__qualname__ = persistence.__name__, "_reconstruct_persistent_obj"
    package.persistence = persistence
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    yield
    if hasattr(builtins, "_edm_embedded_source_ran"):
        del builtins._edm_embedded_source_ran


def _write_edm_snapshot(path, net, config, extra_ema=None):
    kwargs = {k: v for k, v in config.items() if k != "class_name"}
    ema = _persisted(net, kwargs) if extra_ema is None else extra_ema
    snapshot = {"ema": ema, "loss_fn": _Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
                "augment_pipe": _Persistent("AugmentPipe", {"p": 0.12}),
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "resolution": 16}}
    with open(path, "wb") as f:
        pickle.dump(snapshot, f, protocol=4)


@pytest.mark.parametrize("config", [SMALL_DDPMPP, SMALL_NCSNPP, dict(SMALL_DDPMPP, class_name="VPPrecond"),
                                    dict(SMALL_NCSNPP, class_name="VEPrecond"), SMALL_DHARIWAL],
                         ids=["edm-ddpmpp", "edm-ncsnpp", "vp-ddpmpp", "ve-ncsnpp", "edm-adm"])
def test_edm_pickle_loads_without_running_its_code(tmp_path, fake_torch_utils, config):
    net = _build(config)
    path = tmp_path / "edm-snapshot.pkl"
    _write_edm_snapshot(path, net, config)
    raw = path.read_bytes()
    assert b"torch_utils.persistence" in raw and b"_edm_embedded_source_ran" in raw
    with pytest.raises(RuntimeError, match="embedded source of the pickle was executed"):
        pickle.loads(raw)  # the layout is genuine: a normal unpickle runs the embedded source
    assert builtins.__dict__.pop("_edm_embedded_source_ran")

    prior = load_prior(str(path))
    assert not hasattr(builtins, "_edm_embedded_source_ran")
    assert isinstance(prior, PreconditionedPrior) and type(prior.precond) is edm.PRECONDITIONERS[config["class_name"]]
    assert prior.describe()["format"] == "edm-pickle"
    assert prior.describe()["parameters"] == sum(p.numel() for p in net.parameters())
    x, sigma = 2 * _images() - 1, torch.tensor([0.3, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(prior.precond(x, sigma), net(x, sigma), rtol=0, atol=0)
    if "augment_dim" in config:  # the augmentation-label layer of the released CIFAR-10 networks is kept
        noise_channels = config["model_channels"] * config["channel_mult_noise"]
        assert prior.precond.model.map_augment.weight.shape == (noise_channels, 9)


def test_both_numpy_spellings_of_the_scalar_global_are_accepted():
    value = np.float64(math.sqrt(0.5))
    written = pickle.dumps(value, protocol=3)  # protocol 3 names globals as text: "c<module>\n<name>\n"
    spelling = next(m for m in (b"numpy._core.multiarray", b"numpy.core.multiarray") if b"c" + m + b"\n" in written)
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):  # numpy < 2 and numpy >= 2
        crafted = written.replace(b"c" + spelling + b"\n", b"c" + module + b"\n")
        assert RestrictedUnpickler(io.BytesIO(crafted)).load() == value


@pytest.mark.parametrize("payload, name", [
    (b"cos\nsystem\n(S'echo pwned'\ntR.", "os.system"),
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
    (b"ctorch_utils.persistence\n_src_to_module\n(S'x'\ntR.", "torch_utils.persistence._src_to_module"),
])
def test_other_globals_are_refused(tmp_path, payload, name):
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_prior(str(path))


def test_unknown_persistent_class_is_refused_by_name(tmp_path, fake_torch_utils):
    net = _build(SMALL_DDPMPP)
    path = tmp_path / "unknown.pkl"
    _write_edm_snapshot(path, net, SMALL_DDPMPP, extra_ema=_Persistent("StealthNet", {"_init_kwargs": {}}))
    with pytest.raises(ValueError, match="unknown class 'StealthNet'"):
        load_prior(str(path))
    assert not hasattr(builtins, "_edm_embedded_source_ran")


def test_bad_edm_files_give_clear_errors(tmp_path, fake_torch_utils):
    net = _build(SMALL_DDPMPP)
    good = tmp_path / "good.pkl"
    _write_edm_snapshot(good, net, SMALL_DDPMPP)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable EDM pickle"):
        load_prior(str(truncated))
    text = tmp_path / "notes.pkl"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="not a readable EDM pickle"):
        load_prior(str(text))
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"loss": 1.0}, f)
    with pytest.raises(ValueError, match="without 'ema'"):
        load_prior(str(tmp_path / "plain.pkl"))
    # Constructor arguments that do not describe the stored tensors (another configuration).
    wrong = tmp_path / "wrong.pkl"
    kwargs = {k: v for k, v in SMALL_DDPMPP.items() if k != "class_name"}
    _write_edm_snapshot(wrong, net, SMALL_DDPMPP, extra_ema=_Persistent(
        "EDMPrecond", _module_state(net, dict(kwargs, model_channels=32))))
    with pytest.raises(ValueError, match="does not fit"):
        load_prior(str(wrong))
    assert isinstance(read_edm_pickle(str(good)), dict)


def test_allowed_globals_are_few_and_inert():
    assert not any(module in ("os", "posix", "subprocess", "builtins", "sys") for module, _ in ALLOWED_GLOBALS)
    assert all(module != "torch_utils.persistence" or name == "_reconstruct_persistent_obj"
               for module, name in ALLOWED_GLOBALS)


# ----------------------------------------------------------------------------------------------------------------------
# EDM and ADM state_dict files
# ----------------------------------------------------------------------------------------------------------------------

def test_edm_state_dict_files_load_with_a_config(tmp_path):
    from safetensors.torch import save_file

    net = _build(SMALL_NCSNPP)
    x, sigma = 2 * _images() - 1, torch.tensor([0.5, 5.0])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "edm.safetensors")
    torch.save(net.model.state_dict(), tmp_path / "inner.pt")  # the inner SongUNet's names, without "model."
    (tmp_path / "config.json").write_text(json.dumps(SMALL_NCSNPP))
    for path, config in ((tmp_path / "edm.safetensors", SMALL_NCSNPP),
                         (tmp_path / "inner.pt", tmp_path / "config.json")):
        prior = load_prior(str(path), config=config if isinstance(config, dict) else str(config))
        assert prior.describe()["format"] == "edm-state-dict"
        with torch.no_grad():
            torch.testing.assert_close(prior.precond(x, sigma), net(x, sigma), rtol=0, atol=0)
    with pytest.raises(ValueError, match="matches none of the known configurations"):
        load_prior(str(tmp_path / "edm.safetensors"))  # no config, and not a released configuration
    with pytest.raises(ValueError, match="does not fit"):
        load_prior(str(tmp_path / "edm.safetensors"), config=SMALL_DDPMPP)  # another architecture
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "edm.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prior(str(tmp_path / "cut.safetensors"), config=SMALL_NCSNPP)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="is not a edm-state-dict checkpoint.*a list of 2 entries"):
        load_prior(str(tmp_path / "list.pt"), format="edm-state-dict", config=SMALL_NCSNPP)
    conditional = _build(dict(SMALL_DDPMPP, label_dim=5))
    save_file({k: v.contiguous() for k, v in conditional.state_dict().items()}, tmp_path / "cond.safetensors")
    with pytest.raises(ValueError, match="class-conditional"):
        load_prior(str(tmp_path / "cond.safetensors"), config=dict(SMALL_DDPMPP, label_dim=5))


def _small_adm():
    torch.manual_seed(0)
    unet = adm.ADMUNet(**SMALL_ADM).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.05, generator=GEN)
    return unet


def test_adm_state_dict_fp16_loads_runs_float32_and_uses_the_epsilon_channels(tmp_path):
    unet = _small_adm()
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, tmp_path / "adm.pt")  # fp16 weights
    prior = load_prior(str(tmp_path / "adm.pt"), config=SMALL_ADM)  # detected from the names
    assert prior.describe()["format"] == "guided-diffusion"
    assert all(p.dtype == torch.float32 for p in prior.parameters())
    reference = adm.ADMUNet(**SMALL_ADM).eval()
    reference.load_state_dict({k: v.half().float() for k, v in unet.state_dict().items()})
    x_t, t = torch.randn(2, 3, 16, 16, generator=GEN), torch.tensor([50.0, 400.0])
    with torch.no_grad():
        full = reference(x_t, t)
        eps = prior.model(x_t, t)
    assert full.shape[1] == 6 and full.dtype == torch.float32
    torch.testing.assert_close(eps, full[:, :3], rtol=0, atol=0)
    # The prior's denoiser: D = (y - s eps(y / sqrt(1 + s^2), t(s)) + 1) / 2 with the DDPM timestep of s.
    x, sigma = _images(), 0.05
    y, s = 2 * x - 1, 0.1
    step = conventions.DDPMSchedule().timestep_of_sigma(torch.tensor([sigma] * 2)).float()
    with torch.no_grad():
        expected = (y - s * reference(y / math.sqrt(1 + s**2), step)[:, :3] + 1) / 2
        torch.testing.assert_close(prior.denoise(x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_adm_bad_input_gives_clear_errors(tmp_path):
    unet = _small_adm()
    torch.save(unet.state_dict(), tmp_path / "adm.pt")
    with pytest.raises(ValueError, match="matches none of the known configurations"):
        load_prior(str(tmp_path / "adm.pt"))
    with pytest.raises(ValueError, match="does not fit"):
        load_prior(str(tmp_path / "adm.pt"), config=dict(SMALL_ADM, model_channels=64))
    with pytest.raises(ValueError, match="is not a edm-state-dict checkpoint.*looks like guided-diffusion"):
        load_prior(str(tmp_path / "adm.pt"), format="edm-state-dict", config=SMALL_DDPMPP)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "adm.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="refusing to load|cut.pt"):
        load_prior(str(tmp_path / "cut.pt"), format="guided-diffusion", config=SMALL_ADM)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_prior(str(tmp_path / "adm.pt"), format="stylegan")
    conditional = adm.ADMUNet(**dict(SMALL_ADM, num_classes=10))
    torch.save(conditional.state_dict(), tmp_path / "cond.pt")
    with pytest.raises(ValueError, match="class-conditional"):
        load_prior(str(tmp_path / "cond.pt"), config=dict(SMALL_ADM, num_classes=10))


# ----------------------------------------------------------------------------------------------------------------------
# The papers' defenses end to end on tiny fakes (plumbing: random networks are no priors)
# ----------------------------------------------------------------------------------------------------------------------

def _tiny_cifar_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))


def test_cifar10_scoreopt_with_an_edm_pickle_prior(tmp_path, fake_torch_utils, monkeypatch):
    """``python -m benchmarks reproduce --dataset cifar10 --prior edm.pkl``: paper-default ScoreOpt (ScoreOpt-O) on a
    fake CIFAR-10 folder with a small random EDM network written in EDM's pickle layout."""

    config = dict(SMALL_DDPMPP, img_resolution=32, model_channels=8, attn_resolutions=[])
    net = _build(config)
    with torch.no_grad():  # a random F is O(1): keep its contribution small so the iterates stay in range
        net.model.dec["32x32_aux_conv"].weight.mul_(1e-2)
    _write_edm_snapshot(tmp_path / "edm.pkl", net, config)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 5]}, f)
    module = types.ModuleType("_edm_adm_fakes")
    module.classifier = _tiny_cifar_classifier
    monkeypatch.setitem(sys.modules, module.__name__, module)
    result = reproduce_command.reproduce(reproduce_command.build_parser().parse_args(
        ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--prior", str(tmp_path / "edm.pkl"),
         "--classifier", f"{module.__name__}:classifier", "--defenses", "scoreopt",
         "--attacks", "BlindPGD", "--n", "2", "--out", str(tmp_path / "rep"), "--quiet"]))
    assert {row["defense"] for row in result["rows"] if "defense" in row} >= {"scoreopt"}
    assert not hasattr(builtins, "_edm_embedded_source_ran")


def test_imagenet_style_diffpure_with_an_adm_prior_resizes_around_purification(tmp_path):
    """DiffPure's ImageNet convention on fakes: 12x12 inputs purified at the ADM network's 16x16, returned at 12x12.
    A random epsilon network denoises nothing, so the reverse SDE only adds noise: t* = 0.05 (not ImageNet's 0.15)
    keeps the iterates in the range the prior checks."""
    from purifiers import DiffPurePyTorch

    unet = _small_adm()
    with torch.no_grad():  # a random epsilon is O(1): keep it small so the reverse SDE stays in range
        unet.out[2].weight.mul_(1e-2)
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, tmp_path / "adm.pt")
    prior = load_prior(str(tmp_path / "adm.pt"), config=SMALL_ADM)
    seen = []
    prior.model.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    purifier = DiffPurePyTorch(prior, t_star=0.05, resize_to=16, seed=0, device_type="cpu")
    x = _images(side=12).numpy()
    purified, _ = purifier(x)
    assert purified.shape == x.shape and np.isfinite(purified).all()
    assert seen and set(seen) == {(2, 3, 16, 16)} and len(seen) == 50  # Euler steps at dt = 1e-3
    assert purifier.resize_to == 16


def test_resize_to_with_the_adjoint_solver():
    from purifiers.priors.backends import GaussianPrior
    from purifiers.vpsde import DiffPure

    purifier = DiffPure(GaussianPrior(), t_star=0.01, resize_to=8)
    x = _images(n=1, side=4)
    noise = purifier.draw_noise(x, torch.Generator().manual_seed(0))
    assert noise.start.shape == (1, 3, 8, 8)
    out = purifier.purify_adjoint(x, noise)
    assert out.shape == x.shape
    torch.testing.assert_close(out, purifier.purify(x, noise), rtol=0, atol=1e-4)


def test_resize_to_must_be_a_positive_side():
    from purifiers.priors.backends import GaussianPrior
    from purifiers.vpsde import DiffPure

    for bad in (0, -3, 2.5, "256", True):
        with pytest.raises(ValueError, match="resize_to"):
            DiffPure(GaussianPrior(), resize_to=bad)


def test_check_prior_prints_the_card_of_an_edm_pickle_and_an_adm_state_dict(tmp_path, fake_torch_utils, capsys):
    """`check-prior` on a random-init network of each format: it loads, prints the format and conventions, and runs
    the self-test (a random network is no prior: the test checks the plumbing, not the PSNR)."""
    from PIL import Image

    from benchmarks.harness.prior_check import check_prior

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    _write_edm_snapshot(tmp_path / "edm.pkl", _build(SMALL_DDPMPP), SMALL_DDPMPP)
    torch.save(_small_adm().state_dict(), tmp_path / "adm.pt")
    for path, config, fmt in ((tmp_path / "edm.pkl", None, "edm-pickle"),
                              (tmp_path / "adm.pt", SMALL_ADM, "guided-diffusion")):
        result = check_prior(str(path), config=config, data=str(tmp_path), n=2)
        printed = capsys.readouterr().out
        assert result["card"]["format"] == fmt and f"format: {fmt}" in printed
        assert "data_range: [-1, 1]" in printed and set(result["psnr"]) == {0.05, 0.1, 0.25, 0.5}
        assert result["known_checkpoint"] is None  # a small random network is none of the released files
