"""The evaluation harnesses: AutoAttack 'rand'/'standard' with resumable per-batch checkpoints, the RobustBench-style
model_info JSON, the leaderboard.

Most tests use a toy purifier (Gaussian noise, then the exact denoiser of a Gaussian prior) in front of the shipped
MNIST classifier, with scaled-down AutoAttack settings, so the whole file stays fast on a loaded 2-core CPU.
"""

import dataclasses
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from tiny import make_toy
from torch import nn

from benchmarks.commands import autoattack as autoattack_command
from benchmarks.commands import reproduce as reproduce_command
from benchmarks.commands import robustbench as robustbench_command
from benchmarks.data import load_mnist
from benchmarks.defenses import REGISTRY, build_purifier, deployed_model
from benchmarks.harness import autoattack as aa
from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_classifier
from purifiers import GaussianPrior

torch.set_num_threads(1)

SMALL = dict(batch_size=4, rescore_draws=3, n_iter=3, eot_iter=2, n_target_classes=1, n_queries=10)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(os.path.join(MODELS_DIR, REFERENCE_FILES["mnist"][0]))


@pytest.fixture(scope="module")
def data():
    x, y = load_mnist("val", n=8)
    return torch.from_numpy(x), torch.from_numpy(y)


def toy_model(classifier, runs=1, sigma=0.2):
    return deployed_model(make_toy(GaussianPrior(mean=0.13, std=0.3), sigma=sigma), classifier, runs=runs)


# ---------------------------------------------------------------------------------------------------------------------

def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="versions"):
        aa.AutoAttackConfig(versions=("rand", "plus"))
    with pytest.raises(ValueError, match="eps"):
        aa.AutoAttackConfig(eps=0.0)
    with pytest.raises(ValueError, match="n_iter"):
        aa.AutoAttackConfig(n_iter=0)
    with pytest.raises(ValueError, match="unknown defense"):
        build_purifier("nonexistent", None, None)
    assert not aa.AutoAttackConfig().scaled_down and aa.AutoAttackConfig(n_iter=5).scaled_down
    assert aa.parse_overrides(["sigma=0.25", "steps=5", "mode=x"]) == {"sigma": 0.25, "steps": 5, "mode": "x"}


def test_make_autoattack_uses_the_protocol_and_rescales_apgd_consistently(classifier):
    full = aa.make_autoattack(classifier, "rand", aa.AutoAttackConfig(), seed=0, device="cpu")
    assert full.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    assert (full.apgd.n_iter, full.apgd.eot_iter, full.apgd.n_restarts) == (100, 20, 1)
    small = aa.make_autoattack(classifier, "standard", aa.AutoAttackConfig(n_iter=10, n_queries=7), seed=0,
                               device="cpu")
    # pyautoattack computes these checkpoints from n_iter in its constructor (0.22, 0.06, 0.03 of the iterations).
    reference = type(full.apgd)(classifier, n_iter=10, eps=0.3)
    for apgd in (small.apgd, small.apgd_targeted):
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == \
            (10, reference.n_iter_2, reference.n_iter_min, reference.size_decr)
    assert small.square.n_queries == 7 and small.fab.n_iter == 10


def test_fixed_noise_makes_the_randomized_defense_deterministic(classifier, data):
    x, _ = data
    model = toy_model(classifier)
    model.purifier.set_params(seed=3)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # the deployed defense draws fresh noise per call
        fixed = aa.FixedNoise(model)
        assert torch.equal(fixed(x), fixed(x))


def test_autoattack_bookkeeping_on_the_undefended_classifier(classifier, data):
    """A deterministic model: every flagged point is really misclassified within the eps-ball, unflagged points are
    returned unchanged, re-scores agree with the flags, and AutoAttack is at least as strong as ART's PGD."""
    x, y = data
    eps = 0.12
    config = aa.AutoAttackConfig(eps=eps, versions=("standard",), **dict(SMALL, n_iter=20))
    result = aa.run_autoattack(deployed_model(None, classifier), x, y, config, device="cpu", verbose=False)
    res = result.versions["standard"]
    with torch.no_grad():
        pred = classifier(res.x_adv).argmax(1)
    assert torch.equal(res.robust, pred.eq(y))
    assert (res.x_adv - x).abs().amax() <= eps + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.equal(res.x_adv[res.robust], x[res.robust])
    assert torch.equal(res.rescore, res.robust.float())
    assert result.reported_accuracy() == result.robust_accuracy("standard") <= result.clean_accuracy()
    assert result.number_forward_passes == 1.0

    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    art_classifier = PyTorchClassifier(classifier, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                                       clip_values=(0.0, 1.0))
    pgd = ProjectedGradientDescent(art_classifier, eps=eps, eps_step=eps / 4, max_iter=20, verbose=False)
    pgd_acc = (art_classifier.predict(pgd.generate(x.numpy())).argmax(1) == y.numpy()).mean()
    assert 0 < result.clean_accuracy() and result.robust_accuracy("standard") <= pgd_acc


def test_a_purifier_that_erases_the_input_keeps_clean_accuracy_under_attack(classifier, data):
    """The toy with a near-zero-variance prior maps every input to (almost) the prior mean, so no perturbation can
    change the prediction: robust accuracy equals clean accuracy, the fraction of labels of the mean's class."""
    x, y = data
    mean = x[0]
    model = deployed_model(make_toy(GaussianPrior(mean=mean, std=1e-4), sigma=0.5), classifier)
    with torch.no_grad():
        mean_class = classifier(mean[None]).argmax(1).item()
    expected = y.eq(mean_class).float().mean().item()
    config = aa.AutoAttackConfig(eps=0.3, versions=("rand",), **SMALL)
    result = aa.run_autoattack(model, x, y, config, device="cpu", verbose=False)
    assert result.clean_accuracy() == expected
    assert result.robust_accuracy("rand") == expected
    assert result.worst_case().float().mean().item() == expected


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(classifier, data, tmp_path, monkeypatch):
    x, y = data
    config = aa.AutoAttackConfig(eps=0.15, **SMALL)  # 2 batches x (clean, rand, standard)
    reference = aa.run_autoattack(toy_model(classifier), x, y, config, checkpoint_dir=str(tmp_path / "a"),
                                  device="cpu", verbose=False)

    run_unit, calls = aa._run_unit, []

    def crash_after_first_batch(*args, **kwargs):
        calls.append(args[4])
        if len(calls) > len(config.versions) + 1:
            raise KeyboardInterrupt("injected after the first batch")
        return run_unit(*args, **kwargs)

    monkeypatch.setattr(aa, "_run_unit", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        aa.run_autoattack(toy_model(classifier), x, y, config, checkpoint_dir=str(tmp_path / "b"), device="cpu",
                          verbose=False)
    calls.clear()
    monkeypatch.setattr(aa, "_run_unit", lambda *a, **k: calls.append(a[4]) or run_unit(*a, **k))
    resumed = aa.run_autoattack(toy_model(classifier), x, y, config, checkpoint_dir=str(tmp_path / "b"), device="cpu",
                                verbose=False)
    assert calls == ["clean", "rand", "standard"]  # the first batch came from its checkpoints
    assert torch.equal(resumed.clean_draws, reference.clean_draws)
    for version in config.versions:
        a, b = reference.versions[version], resumed.versions[version]
        for name in ("robust", "x_adv", "y_adv", "rescore"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (version, name)
    assert aa.result_rows(resumed, "toy", "exact")[0]["robust_acc"] == aa.result_rows(reference, "toy", "exact")[0][
        "robust_acc"]

    with pytest.raises(ValueError, match="different run"):
        aa.run_autoattack(toy_model(classifier), x, y, dataclasses.replace(config, seed=1),
                          checkpoint_dir=str(tmp_path / "b"), device="cpu", verbose=False)


def test_autoattack_command_writes_rows(toy_defense, tmp_path, capsys):
    argv = ["autoattack", "--defense", toy_defense, "--prior", "gaussian", "--n", "4", "--runs", "2", "--out",
            str(tmp_path), "--versions", "rand", "--eps", "0.2", "--n-iter", "2", "--eot-iter", "1", "--rescore", "2",
            "--batch-size", "4", "--quiet"]
    autoattack_command.main(argv)
    data = json.loads((tmp_path / "autoattack_toy.json").read_text())
    attacks = [r["attack"] for r in data["rows"]]
    assert attacks[:3] == ["AutoAttack-rand"] * 3 and "AutoAttack min(rand)" in attacks
    assert all(r["scaled_down"] and r["n"] == 4 and r["eps"] == 0.2 and r["gradient"] == "exact" for r in data["rows"])
    # runs=2: two purifications (one denoiser call each) and two classifier passes per prediction
    assert data["meta"]["number_forward_passes"] == 4.0
    assert os.path.exists(tmp_path / "checkpoints" / "autoattack_toy" / "rand_00000.pt")


# ---------------------------------------------------------------------------------------------------------------------
# RobustBench-style entry and leaderboard

def test_eps_is_written_as_robustbench_writes_it():
    from benchmarks.harness.robustbench import format_eps

    assert [format_eps(e) for e in (8 / 255, 4 / 255, 0.5, 0.3, 0.2, 2 / 255)] == \
        ["8/255", "4/255", "0.5", "0.3", "0.2", "2/255"]


def test_robustbench_command_writes_an_entry_in_robustbench_schema(toy_defense, tmp_path, monkeypatch):
    from benchmarks.harness.rb_compat import import_robustbench
    from benchmarks.results import make_row, write_results

    import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import ModelInfo, update_json

    attacks_json = tmp_path / "attacks.json"
    rows = [make_row(defense="toy", attack="PGD+EOT", gradient="exact", eps=0.02, norm="Linf", n=4, robust_acc=0.25),
            make_row(defense="toy", attack="PGD+EOT", gradient="exact", eps=0.3, norm="Linf", n=4, robust_acc=0.0),
            make_row(defense="other", attack="PGD+EOT", gradient="exact", eps=0.02, norm="Linf", n=4, robust_acc=0.0)]
    write_results(str(attacks_json), rows, {})
    out = tmp_path / "rb"
    result = robustbench_command.evaluate(robustbench_command.build_parser().parse_args(
        ["--defense", toy_defense, "--prior", "gaussian", "--set", "sigma=0.05", "--n", "4", "--eps", "0.02",
         "--versions", "rand", "--n-iter", "2", "--eot-iter", "1", "--rescore", "2", "--batch-size", "4",
         "--out", str(out), "--name", "Toy_MnistCNN", "--attacks-json", str(attacks_json), "--quiet"]))
    path = out / "model_info" / "mnist" / "Linf" / "Toy_MnistCNN.json"
    entry = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    assert set(entry) == fields | {"external", "unreliable"}
    ModelInfo(**{k: entry[k] for k in fields})
    assert entry["eps"] == "0.02" and entry["dataset"] == "mnist" and entry["unreliable"] is True
    assert entry["number_forward_passes"] == 2  # one denoiser call and one classifier pass per prediction
    assert entry["external"] == "25.0" and "PGD+EOT" in entry["footnote"]  # the other rows' eps/defense differ
    for words in ("version='rand'", "EOT 1", "n=4", "seed=0", "gradient mode 'exact'", "SCALED-DOWN"):
        assert words in entry["footnote"]

    # Percentages as robustbench's own update_json writes them, from the same fractions.
    aa_result = result["result"]
    clean = result["rows"][0]["clean_acc"]
    monkeypatch.chdir(tmp_path)
    update_json(BenchmarkDataset.cifar_10, ThreatModel.Linf, "ref", clean, aa_result.reported_accuracy(), None)
    written = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" / "ref.json").read_text())
    assert (entry["clean_acc"], entry["autoattack_acc"]) == (written["clean_acc"], written["autoattack_acc"])


def test_external_picks_the_adaptive_worst_case_from_the_attacks_commands_output(toy_defense, tmp_path):
    """`python -m benchmarks attacks` writes the rows; `robustbench --attacks-json` reads them back: its
    ``external`` is the lowest robust accuracy of the defense at that eps and norm, adaptive or AutoAttack."""
    from benchmarks.harness import robustbench as rbe
    from benchmarks.harness.adaptive import run_attacks

    run_attacks(str(tmp_path / "attacks"), defenses=[toy_defense], preset_name="smoke", n=2, eps=0.3,
                prior_path="gaussian", attacks=["BlindPGD", "BPDA+EOT"], verbose=False)
    path = str(tmp_path / "attacks" / "attacks.json")
    rows = [r for r in rbe.read_results(path)["rows"] if r["defense"] == toy_defense]
    assert {r["norm"] for r in rows} == {"Linf"} and {r["scoring"] for r in rows} <= set(aa_scorings())
    lowest = min(rows, key=lambda r: r["robust_acc"])
    assert rbe.adaptive_worst_case(path, toy_defense, 0.3, "linf") == lowest
    result = robustbench_command.evaluate(robustbench_command.build_parser().parse_args(
        ["--defense", toy_defense, "--prior", "gaussian", "--n", "2", "--eps", "0.3", "--versions", "rand",
         "--n-iter", "1", "--eot-iter", "1", "--rescore", "2", "--batch-size", "2", "--out", str(tmp_path / "rb"),
         "--attacks-json", path, "--quiet"]))
    autoattack_worst = result["result"].worst_case().float().mean().item()
    assert result["model_info"]["external"] == rbe.format_accuracy(min(lowest["robust_acc"], autoattack_worst))
    if lowest["robust_acc"] < autoattack_worst:
        assert lowest["attack"] in result["model_info"]["footnote"]


def aa_scorings():
    from attacks_adaptive.scoring import SCORINGS

    return SCORINGS


def test_leaderboard_sorts_as_robustbench_and_escapes_footnotes(tmp_path):
    from benchmarks.commands.leaderboard import load_entries, write_leaderboard
    from benchmarks.harness.rb_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.enums import ThreatModel
    from robustbench.utils import ACC_FIELDS, get_key

    entries = {"a": {"clean_acc": "90.0", "autoattack_acc": "70.0", "external": "30.0", "unreliable": True,
                     "footnote": "<script>x</script>"},
               "b": {"clean_acc": "80.0", "autoattack_acc": "50.0"},
               "c": {"clean_acc": "85.0", "autoattack_acc": "60.0", "external": "55.0", "unreliable": False}}
    folder = tmp_path / "model_info" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    for name, entry in entries.items():
        (folder / f"{name}.json").write_text(json.dumps(dict(entry, name=name, dataset="cifar10")))
    ordered = [e["name"] for e in load_entries(str(tmp_path / "model_info"))[("cifar10", "Linf")]]
    expected = sorted(entries, key=lambda n: get_key(entries[n], ACC_FIELDS[ThreatModel.Linf]), reverse=True)
    assert ordered == expected == ["c", "b", "a"]
    md_path, html_path = write_leaderboard(str(tmp_path / "model_info"), str(tmp_path / "out"))
    markdown, page = open(md_path).read(), open(html_path).read()
    assert markdown.index("| 1 | c") < markdown.index("| 2 | b") < markdown.index("| 3 | a")
    assert "| Unknown |" in markdown  # b has no 'unreliable' key
    assert "<script>" not in page and "&lt;script&gt;" in page


# ---------------------------------------------------------------------------------------------------------------------
# Plots

def test_plots_draw_curves_grids_and_score_norms(classifier, data, toy_defense, tmp_path):
    import matplotlib.image

    from benchmarks.commands import plots
    from benchmarks.results import make_row
    from purifiers.adp import ADP

    rows = [make_row(defense=d, attack=a, scoring="single_shot", eps=e, clean_acc=0.95, robust_acc=r, n=4)
            for d in ("toy", "other") for a in ("BlindPGD", "PGDEOT") for e, r in ((0.1, 0.8), (0.3, 0.4))]
    rows.append(make_row(defense="toy", attack="none", clean_acc=0.95, n=4))
    curves = plots.plot_robustness_curves(rows, str(tmp_path / "curves.png"))
    assert matplotlib.image.imread(curves).ndim == 3
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_robustness_curves(rows[-1:], str(tmp_path / "none.png"))

    plots.main(["plots", "grid", "--defenses", toy_defense, "--prior", "gaussian", "--n", "3", "--steps", "2",
                "--out", str(tmp_path / "grid.png")])
    assert matplotlib.image.imread(str(tmp_path / "grid.png")).shape[0] > 100

    # ADP's score on a Gaussian prior N(m, s^2) at level c is -(1 - k)(x - m)/c with k = s^2/(s^2 + c^2).
    x, y = data
    prior = GaussianPrior(mean=0.3, std=0.2)
    norms, level = plots.score_norm_sets(ADP(prior), classifier, x, y, eps=0.2, steps=2)
    k = 0.2**2 / (0.2**2 + level**2)
    expected = (1 - k) / level * (x - 0.3).flatten(1).norm(dim=1)
    assert torch.allclose(torch.from_numpy(norms["natural"]), expected, rtol=1e-4)
    assert set(norms) == {"natural", "adversarial", "pur_n", "pur_a"}
    assert not torch.allclose(torch.from_numpy(norms["adversarial"]), expected)
    plots.plot_score_norms(norms, str(tmp_path / "norms.png"))


# ---------------------------------------------------------------------------------------------------------------------
# Reproduce

def test_reproduce_mnist_runs_every_attack_and_labels_scaled_settings(toy_defense, tmp_path, monkeypatch):
    from benchmarks.defenses import PublishedNumber
    from benchmarks.harness import protocols as reproduce

    toy = dataclasses.replace(REGISTRY["toy"], published=(
        PublishedNumber("mnist", "BlindPGD", 98.07, 96.41, "ADP supplement Table 9"),))
    monkeypatch.setitem(REGISTRY, "toy", toy)
    out = tmp_path / "rep"
    result = reproduce_command.reproduce(reproduce_command.build_parser().parse_args(
        ["--defenses", toy_defense, "--prior", "gaussian", "--n", "3", "--eps", "0.2", "--coup-toy-runs", "50",
         "--out", str(out), "--quiet"]))
    cells = result["summary"]["toy"]
    assert set(cells) == {*reproduce.ATTACKS, "worst-case (adaptive)", "worst-case"}
    for scoring in ("single_shot", "multi_draw"):
        assert cells["worst-case"][scoring] == min(v[scoring] for k, v in cells.items() if k != "worst-case")
    assert all(row["scaled_down"] and row["protocol"] == "scaled-down" for row in result["rows"])
    [comparison] = result["paper_vs_ours"]
    assert comparison["ours_robust"] == cells["BlindPGD"]["single_shot"] and comparison["robust"] == 96.41
    saved = json.loads((out / "reproduce_mnist.json").read_text())
    assert saved["meta"]["scaled_down"] and saved["meta"]["paper_vs_ours"] == result["paper_vs_ours"]
    markdown = (out / "reproduce_mnist.md").read_text()
    assert "Scaled-down settings" in markdown and "| toy | BlindPGD | 98.07 | 96.41 |" in markdown
    assert "COUP toy experiment" in markdown and (out / "coup_toy" / "coup_toy.png").exists()
    assert (out / "reproduce_mnist.png").stat().st_size > 0


def tiny_cifar_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))


def test_reproduce_cifar10_protocol_on_tiny_fakes(tmp_path, monkeypatch):
    """The CIFAR-10 path end to end: a fake CIFAR-10 folder (the official layout), a tiny random diffusers UNet2DModel
    saved with save_pretrained (last layer shrunk), a tiny classifier from a module:function factory."""
    import pickle

    from diffusers import UNet2DModel


    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    # A random network is no prior: its epsilon outputs are O(1) per pixel, so ten ADP steps carry the iterate out of
    # the image range and ADP rightly raises ADPDivergedError. Shrinking the last layer keeps the random "score"
    # small; this test is about the CIFAR-10 plumbing, not about purification.
    with torch.no_grad():
        unet.conv_out.weight.mul_(1e-2)
        unet.conv_out.bias.zero_()
    unet.save_pretrained(tmp_path / "unet")
    module = types.ModuleType("_harness_cifar_fakes")
    module.tiny_cifar_classifier = tiny_cifar_classifier
    monkeypatch.setitem(sys.modules, module.__name__, module)
    out = tmp_path / "rep"
    result = reproduce_command.reproduce(reproduce_command.build_parser().parse_args(
        ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--prior", str(tmp_path / "unet"),
         "--classifier", f"{module.__name__}:tiny_cifar_classifier", "--defenses", "adp", "--attacks", "BlindPGD",
         "--n", "2", "--out", str(out), "--quiet"]))
    assert {row["eps"] for row in result["rows"]} == {8 / 255}
    from benchmarks.defenses import published

    assert [(c["attack"], c["robust"]) for c in result["paper_vs_ours"]] == [
        (p.attack, p.robust) for name, p in published("cifar10") if name == "adp"]
    assert result["paper_vs_ours"][0]["ours_robust"] is not None  # ADP blind PGD was run
    assert (out / "reproduce_cifar10.md").exists()


def test_quickstart_table_has_every_defense_and_attack(toy_defense, tmp_path):
    from benchmarks.commands.quickstart import run_quickstart
    from benchmarks.harness.protocols import ATTACKS

    result = run_quickstart(str(tmp_path), n=2, n_clean=10, defenses=[toy_defense], prior="gaussian", verbose=False)
    assert set(result["summary"]) == {"none", "toy"}
    assert set(ATTACKS) <= set(result["summary"]["toy"]) and "BlindPGD" in result["summary"]["none"]
    assert all(row["scaled_down"] for row in result["rows"][2:]) and result["meta"]["scaled_down"]
    assert 0 < result["rows"][0]["clean_acc"] <= 1 and set(result["rows"][1]["psnr_db"]) == {"0.1", "0.25", "0.5"}
    text = (tmp_path / "quickstart.md").read_text()
    assert "SCALED-DOWN" in text and "| toy |" in text and "| none |" in text
    assert json.loads((tmp_path / "quickstart.json").read_text())["rows"] == result["rows"]


# ---------------------------------------------------------------------------------------------------------------------
# The real purifiers, through their developers' MNIST factories, with the shipped prior and classifier

FEWER_STEPS = {"adp": ["steps=2"], "scoreopt": ["inner_steps=1"], "coup": ["t_star=0.01"], "diffpure": ["t_star=0.01"]}


def test_quickstart_rows_do_not_depend_on_the_number_of_worker_processes(tmp_path):
    from benchmarks.commands.quickstart import run_quickstart

    def table_rows(result):
        return [{k: v for k, v in row.items() if k not in ("seconds", "cpu_seconds")} for row in result["rows"][2:]]

    inline = run_quickstart(str(tmp_path / "one"), n=2, n_clean=10, defenses=[], verbose=False)
    parallel = run_quickstart(str(tmp_path / "two"), n=2, n_clean=10, defenses=[], workers=2, verbose=False)
    assert table_rows(parallel) == table_rows(inline) and len(table_rows(inline)) > 0
    assert parallel["meta"]["workers"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("defense", sorted(FEWER_STEPS))
def test_autoattack_then_robustbench_on_each_purifier(defense, tmp_path):
    """Both commands end to end on bundled MNIST (cheap settings of each purifier: fewer steps); the robustbench
    command resumes the AutoAttack step from the autoattack command's checkpoints (same run, same fingerprint)."""
    from benchmarks.harness import robustbench as rbe

    common = ["--defense", defense, "--n", "2", "--batch-size", "2", "--versions", "rand", "--n-iter", "1",
              "--eot-iter", "1", "--rescore", "1", "--runs", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--quiet"]
    for item in FEWER_STEPS[defense]:
        common += ["--set", item]
    autoattack_command.main(["autoattack", *common, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / f"autoattack_{defense}.json").read_text())["rows"]
    assert rows[0]["attack"] == "AutoAttack-rand" and 0 <= rows[0]["robust_acc"] <= rows[0]["clean_acc"]
    stamp = os.path.getmtime(tmp_path / "ck" / "rand_00000.pt")
    result = robustbench_command.evaluate(robustbench_command.build_parser().parse_args([*common, "--out", str(tmp_path / "rb"), "--name", defense]))
    assert os.path.getmtime(tmp_path / "ck" / "rand_00000.pt") == stamp  # resumed, not recomputed
    entry = json.loads(open(result["path"]).read())
    assert set(entry) == set(rbe.model_info_fields()) and entry["unreliable"] is True
    assert entry["number_forward_passes"] > 1 and entry["autoattack_acc"] == str(round(100 * rows[0]["robust_acc"], 2))
