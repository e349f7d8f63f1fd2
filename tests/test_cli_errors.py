"""Every command of ``python -m benchmarks`` under bad input: counts that are zero or negative, radii outside the image
range or not numbers, unknown defense, attack and command names, missing or unreadable files, priors whose channels or
image size do not fit the data. Each must end with exit status 2 (argparse: a bad option) or 1 (a value, file or
state refused while running), one ``error:`` line on stderr naming the problem, and no Python traceback.

Explicit cases per command, then ``hypothesis`` (derandomized, a few examples each) over the option types. The
commands run in forked children of this process (``tests/forked.py``: the imports are paid once); a few run in a
fresh ``python -m benchmarks`` to check that the command line itself ends the same way.
"""

import json
import os
import string

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TINY_SCORE_SDE, save_score_sde_checkpoint, tiny_score_sde

import forked
from benchmarks.__main__ import COMMANDS
from benchmarks.defenses import NO_DEFENSE, REGISTRY

pytestmark = pytest.mark.slow

TRIED: dict[str, int] = {}  # command -> bad command lines run (the figures of the test report)
TRACEBACKS: list[str] = []
# A bad option stops the command before it loads anything, so "--n -1" is enough; the cheap valid settings are only
# for the cases that fail later (a file or prior refused while the run starts).
TOY = ["--prior", "gaussian", "--n", "2", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The paths the cases name: {name: path}."""
    from PIL import Image

    from purifiers import EDMDenoiser
    from purifiers.nets.unet import SmallUNet
    from purifiers.priors.loading import save_builtin_prior

    forked.preload()
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)  # a three-channel built-in prior, and a three-channel authors' (score_sde) checkpoint
    save_builtin_prior(EDMDenoiser(SmallUNet(3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, emb_dim=16)),
                       str(root / "rgb.safetensors"))
    save_score_sde_checkpoint(tiny_score_sde("vp"), root / "score_sde.pth")
    (root / "vp.json").write_text(json.dumps({**TINY_SCORE_SDE["vp"], "image_size": 32}))
    (root / "images9").mkdir()  # RGB images of a side the built-in U-Net cannot halve
    for i in range(2):
        Image.fromarray(np.full((9, 9, 3), 100, dtype=np.uint8)).save(root / "images9" / f"{i}.png")
    (root / "garbage.pt").write_bytes(b"not a checkpoint, nor anything else")
    (root / "garbage.json").write_text("{\"rows\": [")
    (root / "empty").mkdir()
    (root / "cwd").mkdir()
    return {"rgb": str(root / "rgb.safetensors"), "score_sde": str(root / "score_sde.pth"),
            "vp_config": str(root / "vp.json"), "images9": str(root / "images9"), "garbage": str(root / "garbage.pt"),
            "garbage_json": str(root / "garbage.json"), "empty": str(root / "empty"), "missing": str(root / "missing"),
            "out": str(root / "out"), "cwd": str(root / "cwd")}


def refused(argv: list[str], files: dict, fragment: str | None = None, fresh: bool = False) -> forked.Finished:
    """Run the bad command line; check it ends with status 1 or 2, one ``error:`` line holding ``fragment``, no
    traceback."""
    argv = [a.format(**files) for a in argv]
    run = (forked.python_m if fresh else forked.run)(argv, files["cwd"])
    TRIED[argv[0]] = TRIED.get(argv[0], 0) + 1
    if "Traceback" in run.stderr:
        TRACEBACKS.append(" ".join(argv))
    line = forked.error_line(run, argv)
    assert fragment is None or fragment in line, (argv, fragment, line)
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Explicit cases: (argv, what the error line names)

NO_CUDA = [] if torch.cuda.is_available() else [(["check-prior", "gaussian", "--device", "cuda"], "no CUDA device")]
CASES = {
    "quickstart": [(["quickstart", "--n", "-1"], "argument --n: must be a positive integer"),
                   (["quickstart", "--workers", "0"], "argument --workers"),
                   (["quickstart", "--defenses", "adp", "nosuch"], "unknown defense 'nosuch'"),
                   (["quickstart", "--defenses", NO_DEFENSE], "unknown defense 'none'"),  # always evaluated first
                   (["quickstart", "--prior", "{missing}"], "no such file or folder"),
                   (["quickstart", "--prior", "{rgb}", "--n", "1", "--n-clean", "2", "--workers", "1", "--out",
                     "{out}"], "the prior cannot denoise the (1, 28, 28) images of bundled MNIST")],
    "train-classifier": [(["train-classifier", "--epochs", "0"], "argument --epochs"),
                         (["train-classifier", "--dataset", "cifar10"], "invalid choice"),
                         (["train-classifier", "--data-dir", "{missing}"], "no such file or folder")],
    "train-prior": [(["train-prior", "--max-steps", "0"], "argument --max-steps"),
                    (["train-prior", "--batch-size", "-2"], "argument --batch-size"),
                    (["train-prior", "--minutes", "abc"], "argument --minutes: expected a number"),
                    (["train-prior", "--checkpoint-every", "1.5"], "expected an integer"),
                    (["train-prior", "--export-only", "--checkpoint", "{missing}", "--out", "{out}/p.safetensors"],
                     "no prior checkpoint at {missing}"),
                    (["train-prior", "--export-only", "--checkpoint", "{garbage}", "--out", "{out}/p.safetensors"],
                     "cannot read the prior checkpoint {garbage}: it is truncated or corrupt")],
    "attacks": [(["attacks", "--n", "-3"], "argument --n: must be a positive integer, got '-3'"),
                (["attacks", "--eps", "2"], "an l_inf radius on [0, 1] images must be in (0, 1]"),
                (["attacks", "--eps", "eight"], "argument --eps: expected a number"),
                (["attacks", "--defenses", "nosuch"], "unknown defense 'nosuch'"),
                (["attacks", "--prior", "{missing}"], "argument --prior: no such file or folder"),
                (["attacks", "--shard", "2/2"], "argument --shard"),
                (["attacks", "--defenses", "none", "--preset", "smoke", "--attacks", "NoSuchAttack", *TOY],
                 "none of the attacks ['NoSuchAttack']"),
                (["attacks", "--defenses", "adp", "--preset", "smoke", "--out", "{out}", *TOY[2:], "--prior", "{rgb}"],
                 "1 channels on axis 1, expected 3")],
    "autoattack": [(["autoattack", "--n", "0"], "argument --n"),
                   (["autoattack", "--eps", "-0.1"], "argument --eps: must be above 0"),
                   (["autoattack", "--batch-size", "0"], "argument --batch-size"),
                   (["autoattack", "--versions", "plus"], "invalid choice"),
                   (["autoattack", "--defense", "nosuch"], "unknown defense 'nosuch'"),
                   (["autoattack", "--defense", "tiny:nosuch"], "cannot import the factory 'tiny:nosuch'"),
                   (["autoattack", "--defense", "no_such_module:make"], "cannot import the factory"),
                   (["autoattack", "--defense", "none", "--set", "steps=3"], "--set: options of a purifier"),
                   (["autoattack", "--defense", "adp", "--set", "stpes=3"], "--set stpes: not a setting of adp"),
                   (["autoattack", "--defense", "adp", "--prior", "{garbage}", "--out", "{out}", *TOY[2:]],
                    "is not a PyTorch checkpoint"),
                   (["autoattack", "--defense", "adp", "--prior", "{rgb}", "--n-iter", "1", "--out", "{out}",
                     *TOY[2:]], "1 channels on axis 1, expected 3")],
    "masking-check": [(["masking-check"], "the following arguments are required: --defense"),
                      (["masking-check", "--defense", "nosuch"], "unknown defense 'nosuch'"),
                      (["masking-check", "--defense", "adp", "--n", "0"], "argument --n: must be a positive integer"),
                      (["masking-check", "--defense", "adp", "--eps", "1.5"], "an l_inf radius on [0, 1] images"),
                      (["masking-check", "--defense", "adp", "--sweep-eps", "0.5", "2"], "an l_inf radius"),
                      (["masking-check", "--defense", "adp", "--sweep-eps", "0.1"], "the sweep starts at --eps 0.3"),
                      (["masking-check", "--defense", "adp", "--preset", "huge"], "invalid choice"),
                      (["masking-check", "--defense", "adp", "--prior", "{missing}"], "no such file or folder")],
    "merge": [(["merge", "{missing}"], "no such file or folder"),
              (["merge", "{empty}"], "holds no shards")],
    "robustbench": [(["robustbench", "--n", "-1"], "argument --n"),
                    (["robustbench", "--eps", "1.5"], "an l_inf radius"),
                    (["robustbench", "--attacks-json", "{missing}"], "no such file or folder"),
                    (["robustbench", "--dataset", "cifar10", "--data-dir", "{missing}"], "--data-dir")],
    "leaderboard": [(["leaderboard", "{missing}"], "no such file or folder"),
                    (["leaderboard", "{empty}"], "no model_info JSON files below")],
    "reproduce": [(["reproduce", "--n", "0"], "argument --n"),
                  (["reproduce", "--eps", "nan"], "expected a finite number"),
                  (["reproduce", "--defenses", NO_DEFENSE], "unknown defense 'none'"),
                  (["reproduce", "--coup-toy-runs", "-1"], "must be a non-negative integer"),
                  (["reproduce", "--dataset", "cifar10", "--out", "{out}"], "the CIFAR-10 protocol needs --data-dir")],
    "estimate": [(["estimate", "--n", "0"], "argument --n"),
                 (["estimate", "--defenses", "tiny:make_toy"], "unknown defense 'tiny:make_toy'"),
                 (["estimate", "--dataset", "mnist"], "invalid choice"),
                 (["estimate", "--device", "tpu"], "argument --device")],
    "speed": [(["speed", "--rows", "0"], "argument --rows"),
              (["speed", "--processes", "1"], "argument --processes"),
              (["speed", "--defenses", "nosuch"], "unknown defense 'nosuch'"),
              (["speed", "--row-batches", "8", "-1"], "argument --row-batches"),
              (["speed", "--set", "adp", "--out", "{out}"], "--set takes DEFENSE.KEY=VALUE"),
              (["speed", "--defenses", "adp", "--set", "coup.t_star=0.05"], "'coup' is not one of the --defenses"),
              (["speed", "--defenses", "coup", "--set", "coup.tstar=0.05"], "--set tstar: not a setting of coup")],
    "plots": [(["plots", "grid", "--n", "0"], "argument --n"),
              (["plots", "grid", "--eps", "1.5"], "argument --eps: must be in (0, 1]"),
              (["plots", "scorenorm", "--steps", "-4"], "argument --steps"),
              (["plots", "curves", "{missing}"], "no such file or folder"),
              (["plots", "curves", "{garbage_json}", "--out", "{out}/c.png"],
               "{garbage_json} is not a results file: it is not valid JSON"),
              (["plots", "histogram"], "invalid choice")],
    "check-prior": [(["check-prior", "{missing}"], "prior path '{missing}' does not exist"),
                    (["check-prior", "gaussian", "--n", "0"], "argument --n"),
                    (["check-prior", "{rgb}", "--device", "cpu"], "the prior takes 3-channel images: give --data"),
                    (["check-prior", "{rgb}", "--device", "cpu", "--data", "{images9}"],
                     "cannot denoise the (3, 9, 9) images"),
                    (["check-prior", "{score_sde}", "--config", "{vp_config}", "--device", "cpu", "--data", "mnist"],
                     "3-channel images but bundled MNIST (test split) has 1"),
                    (["check-prior", "{garbage}", "--device", "cpu"], "is not a PyTorch checkpoint"),
                    (["check-prior", "gaussian", "--data", "{missing}"], "--data"), *NO_CUDA],
    "smoke-times": [(["smoke-times", "--bogus"], "unrecognized arguments")],
    "certify": [(["certify", "--n", "0"], "argument --n"),
                (["certify", "--alpha", "0.7"], "argument --alpha: must be in (0, 0.5)"),
                (["certify", "--sigmas", "-0.5"], "argument --sigmas"),
                (["certify", "--sigmas", "0.5", "0.5"], "sigmas must be distinct"),
                (["certify", "--denoiser", "full"], "name one (e.g. --defense adp)"),
                (["certify", "--defense", "adp"], "leave --defense out"),
                (["certify", "--defense", "nosuch", "--denoiser", "full"], "unknown defense 'nosuch'"),
                (["certify", "--prior", "{missing}"], "no such file or folder")],
    "adp-study": [(["adp-study", "sweep", "--n", "-5"], "argument --n"),
                  (["adp-study", "evaluate", "--settings", "{{"], "argument --settings: not valid JSON"),
                  (["adp-study", "tune"], "invalid choice"),
                  (["adp-study", "memory", "--dataset", "fashion_mnist"], "measures the MNIST prior only")],
    "scoreopt-study": [(["scoreopt-study", "tune", "--grid", "["], "argument --grid: not valid JSON"),
                       (["scoreopt-study", "test", "--n", "0"], "argument --n"),
                       (["scoreopt-study", "memory", "--dataset", "fashion_mnist"], "measures the MNIST prior only")],
    "vpsde-study": [(["vpsde-study", "sweep", "--t-stars", "1.5"], "argument --t-stars: must be in (0, 1]"),
                    (["vpsde-study", "sweep", "--lambdas", "-1"], "argument --lambdas"),
                    (["vpsde-study", "gradients", "--dataset", "fashion_mnist"], "measures the MNIST prior only"),
                    (["vpsde-study", "test", "--prior", "{missing}"], "no such file or folder")],
    "coup-toy": [(["coup-toy", "--runs", "0"], "argument --runs"),
                 (["coup-toy", "--noise-levels", "-1"], "argument --noise-levels"),
                 (["coup-toy", "--seed", "-1"], "argument --seed")],
}


def test_every_command_has_bad_command_lines():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("argv, fragment", [case for cases in CASES.values() for case in cases],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_command_line_is_refused_on_one_line(argv, fragment, files):
    refused(argv, files, fragment.format(**files))


def test_an_unknown_command_is_named():
    run = forked.run(["bench"], os.getcwd())
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "python -m benchmarks: error: unknown command 'bench'; the commands are listed above"


def test_the_command_line_itself_ends_the_same_way_and_shows_the_traceback_on_request(files):
    """A fresh interpreter: argparse's refusal (2), a refused prior (1), and ``--traceback`` for the full story."""
    refused(["attacks", "--n", "-3"], files, "argument --n: must be a positive integer", fresh=True)
    refused(["check-prior", "{rgb}", "--device", "cpu"], files, "give --data", fresh=True)
    run = forked.python_m(["--traceback", "check-prior", files["rgb"], "--device", "cpu"], files["cwd"])
    assert run.returncode == 1 and "Traceback" in run.stderr and "ValueError: the prior takes 3-channel" in run.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Generated values: every example one bad command line

EXAMPLES = settings(max_examples=4, derandomize=True, deadline=None, database=None)
NOT_POSITIVE = st.integers(max_value=0).map(str) | st.sampled_from(["1.5", "ten", "", "0x10", "3e2"])
OUTSIDE_UNIT = (st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True)).map(repr) | \
    st.text(string.ascii_letters, min_size=1, max_size=6)
UNKNOWN_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda name: name not in REGISTRY and name != NO_DEFENSE)
MISSING = st.from_regex(r"[a-z][a-z0-9_]{0,10}(\.pt|\.json|\.safetensors)?", fullmatch=True)

COUNT_OPTIONS = [["attacks", "--n"], ["autoattack", "--batch-size"], ["autoattack", "--n-iter"],
                 ["robustbench", "--rescore"], ["reproduce", "--batch-size"], ["estimate", "--rows"],
                 ["speed", "--repeats"], ["quickstart", "--n-clean"], ["train-prior", "--psnr-n"],
                 ["train-classifier", "--epochs"], ["check-prior", "gaussian", "--n"], ["plots", "grid", "--steps"],
                 ["adp-study", "sweep", "--runs"], ["scoreopt-study", "tune", "--n"], ["vpsde-study", "sweep", "--n"],
                 ["coup-toy", "--runs"], ["masking-check", "--defense", "none", "--n"]]
UNIT_OPTIONS = [["attacks", "--eps"], ["autoattack", "--eps"], ["robustbench", "--eps"], ["reproduce", "--eps"],
                ["plots", "grid", "--eps"], ["plots", "scorenorm", "--eps"], ["vpsde-study", "sweep", "--t-stars"],
                ["masking-check", "--defense", "none", "--eps"]]
NAME_OPTIONS = [["attacks", "--defenses"], ["autoattack", "--defense"], ["robustbench", "--defense"],
                ["reproduce", "--defenses"], ["quickstart", "--defenses"], ["estimate", "--defenses"],
                ["speed", "--defenses"], ["plots", "grid", "--defenses"], ["masking-check", "--defense"]]
PATH_OPTIONS = [["attacks", "--prior"], ["autoattack", "--prior"], ["robustbench", "--attacks-json"],
                ["reproduce", "--data-dir"], ["quickstart", "--prior"], ["train-classifier", "--data-dir"],
                ["plots", "grid", "--prior"], ["adp-study", "sweep", "--prior"], ["scoreopt-study", "tune", "--prior"],
                ["vpsde-study", "sweep", "--prior"], ["merge"], ["leaderboard"], ["check-prior"],
                ["plots", "curves"]]


def _name(option):
    return " ".join(option)


@pytest.mark.parametrize("option", COUNT_OPTIONS, ids=_name)
@EXAMPLES
@given(value=NOT_POSITIVE)
def test_a_count_below_one_or_not_an_integer_is_refused(option, value, files):
    refused([*option[:-1], f"{option[-1]}={value}"], files, f"argument {option[-1]}")


@pytest.mark.parametrize("option", UNIT_OPTIONS, ids=_name)
@EXAMPLES
@given(value=OUTSIDE_UNIT)
def test_a_radius_outside_the_image_range_or_not_a_number_is_refused(option, value, files):
    refused([*option[:-1], f"{option[-1]}={value}"], files, "--eps" if "eps" in option[-1] else option[-1])


@pytest.mark.parametrize("option", NAME_OPTIONS, ids=_name)
@EXAMPLES
@given(name=UNKNOWN_NAME)
def test_an_unknown_defense_is_refused_naming_the_known_ones(option, name, files):
    refused([*option, name], files, f"unknown defense {name!r}: choose one of {sorted(REGISTRY)}")


@pytest.mark.parametrize("option", PATH_OPTIONS, ids=_name)
@EXAMPLES
@given(name=MISSING)
def test_a_missing_file_is_refused_naming_it(option, name, files):
    path = os.path.join(files["missing"], name)
    # "no such file or folder: '<path>'" from the parser, or check-prior's "prior path '<path>' does not exist"
    refused([*option, path], files, repr(path))


def test_figures(request):
    """The counts of the test report (run last: they sum what the tests above tried)."""
    print(f"\nbad command lines per command: {dict(sorted(TRIED.items()))}; total {sum(TRIED.values())}; "
          f"tracebacks: {len(TRACEBACKS)} {TRACEBACKS}")
    assert not TRACEBACKS
