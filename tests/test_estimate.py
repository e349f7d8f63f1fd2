"""The cost estimate: calibrated on the first batch with 1 and 2 iterations, it projects the network evaluations a run
then counts (exactly, for attacks whose cost per iteration is fixed)."""

import json
import os

import pytest

from benchmarks.harness.adaptive import run_attacks


def test_the_estimate_projects_the_evaluations_the_run_counts(toy_defense, tmp_path):
    out = str(tmp_path)
    run_attacks(out, defenses=[toy_defense], preset_name="smoke", n=4, eps=0.3, prior_path="gaussian",
                attacks=["BlindPGD", "BPDA+EOT", "PGD+EOT[exact]"], verbose=False, estimate="first")
    with open(os.path.join(out, f"estimate_{toy_defense}.json")) as f:
        estimate = {r["attack"]: r for r in json.load(f)["meta"]["estimate"]}
    with open(os.path.join(out, f"attacks_{toy_defense}.json")) as f:
        counted = {r["attack"]: r for r in json.load(f)["rows"] if r["scoring"] == "single_shot"}
    for name in ("BlindPGD", "BPDA+EOT", "PGD+EOT[exact]"):
        per_image = counted[name]["nfe_per_image"]
        assert estimate[name]["network_evaluations"] == sum(per_image.values()) * counted[name]["n"], name
        assert estimate[name]["iterations"] == counted[name]["iterations"] and estimate[name]["projected_seconds"] > 0
    assert estimate["total"]["projected_seconds"] == sum(r["projected_seconds"] for k, r in estimate.items()
                                                         if k != "total")



@pytest.mark.parametrize("defense, name", [("none", "none"), ("tiny:make_toy", "make_toy")])
def test_the_autoattack_estimate_projects_the_evaluations_the_run_counts(defense, name, tmp_path):
    """Calibrated with 1 and 2 iterations (and 1 and 2 Square queries), the projection counts what a run costs when
    AutoAttack attacks every point for every iteration: exactly so on the bare classifier at a radius too small to flip
    a prediction; on the stochastic toy purifier, where AutoAttack skips points a noise draw already misclassifies,
    it bounds the run from above."""
    import sys

    from benchmarks import __main__ as cli

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path)
    command = ["autoattack", "--defense", defense, "--prior", "gaussian", "--n", "4", "--batch-size", "2",
               "--eps", "1e-4", "--versions", "rand", "standard", "--n-iter", "3", "--eot-iter", "2",
               "--n-target-classes", "1", "--n-queries", "4", "--rescore", "2", "--out", out, "--quiet"]
    if defense != "none":  # the bare classifier has no purifications to ensemble (--runs is refused there)
        command += ["--runs", "2"]
    cli.main([*command, "--estimate"])
    assert not os.path.exists(os.path.join(out, f"autoattack_{name}.json"))  # --estimate runs nothing
    cli.main(command)
    with open(os.path.join(out, f"estimate_autoattack_{name}.json")) as f:
        estimate = {r["attack"].split(" ")[0]: r for r in json.load(f)["meta"]["estimate"]}
    with open(os.path.join(out, f"autoattack_{name}.json")) as f:
        run = json.load(f)
    assert estimate["clean"]["network_evaluations"] == run["meta"]["number_forward_passes"] * 4
    for version in ("rand", "standard"):
        [row] = [r for r in run["rows"] if r["attack"] == f"AutoAttack-{version}" and r["scoring"] == "single_shot"]
        counted = sum(row["nfe_per_image"].values()) * 4
        projected = estimate[f"AutoAttack-{version}"]["network_evaluations"]
        assert projected == counted if defense == "none" else projected >= counted, version


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_fixtures")


@pytest.mark.parametrize("defense", ["adp", "scoreopt", "diffpure"])
def test_the_papers_networks_are_built_with_the_reference_parameter_shapes(defense):
    """What `estimate` times is the paper's network: its parameters equal, name for name and shape for shape, those
    recorded from the reference code (tests/reference_fixtures)."""
    from benchmarks.defenses import record
    from purifiers.priors.checkpoints import untrained_prior

    fmt, config = record(defense).paper_network
    fixture = {"ncsnv2": "ncsnv2_cifar10.json", "edm-state-dict": "edm_cifar10_32x32_uncond_vp.json",
               "score_sde": "score_sde_vp_cifar10_ddpmpp_deep_continuous.json"}[fmt]
    with open(os.path.join(FIXTURES, fixture)) as f:
        recorded = {k: list(v) for k, v in json.load(f)["state_dict"].items()}
    prior = untrained_prior(fmt, config)  # its state_dict holds the network under one attribute of the wrapper
    assert {k.split(".", 1)[1]: list(v.shape) for k, v in prior.state_dict().items()} == recorded


def test_pricing_multiplies_the_counts_by_the_time_of_one_evaluation():
    from benchmarks.commands.estimate import priced

    rows = [{"defense": "d", "attack": "a", "per_image": {"prior_forward": 10.0, "prior_backward": 4.0,
                                                          "classifier": 2.0}, "iterations": 3}]
    [row, total] = priced(rows, {"prior_forward": 0.5, "prior_backward": 1.0, "classifier": 0.25}, n=100)
    assert row["network_evaluations"] == 1600 and row["projected_seconds"] == 100 * (5.0 + 4.0 + 0.5)
    assert total["projected_seconds"] == row["projected_seconds"] and total["attack"] == "total"


@pytest.fixture
def tiny_protocol(monkeypatch):
    """The full protocol shrunk to 2-3 iterations x 1-2 EOT samples, AutoAttack 'rand' only."""
    import dataclasses

    from benchmarks.harness import protocols as reproduce

    full_protocol = reproduce.full_protocol

    def tiny(eps, seed=0):
        full = full_protocol(eps, seed)
        return dataclasses.replace(full, blind_pgd_steps=2, bpda_steps=2, bpda_eot=1, pgd_eot_steps=3, pgd_eot_eot=2,
                                   autoattack=dataclasses.replace(full.autoattack, versions=("rand",), n_iter=3,
                                                                  eot_iter=2, rescore_draws=1), draws=2)

    monkeypatch.setattr(reproduce, "full_protocol", tiny)


def test_protocol_counts_of_diffpure_follow_its_100_steps(tiny_protocol):
    """DiffPure's paper settings (t* = 0.1, dt = 1e-3) are 100 reverse-SDE steps; its exact gradient is one backward
    per step. On the shrunk protocol (3 iterations x 2 EOT), PGD+EOT must count 3 x 2 x 100 prior backward passes per
    image and BPDA+EOT none; AutoAttack-rand's projection at least its APGD iterations x EOT x 100 x 2 attacks."""
    from benchmarks.commands.estimate import protocol_counts

    rows = {r["attack"]: r["per_image"] for r in protocol_counts("diffpure")}
    assert rows["PGD+EOT"]["prior_backward"] == 3 * 2 * 100
    assert rows["BPDA+EOT"]["prior_backward"] == 0 and rows["BlindPGD"]["prior_forward"] == 0
    assert rows["AutoAttack-rand"]["prior_backward"] >= 2 * 3 * 2 * 100


@pytest.mark.slow
def test_the_estimate_command_prices_the_counts_with_the_paper_network(tiny_protocol, tmp_path):
    from benchmarks import __main__ as cli

    cli.main(["estimate", "--defenses", "diffpure", "--n", "10", "--rows", "1", "--device", "cpu", "--out",
              str(tmp_path), "--quiet"])
    with open(os.path.join(tmp_path, "estimate_cifar10.json")) as f:
        meta = json.load(f)["meta"]
    rows = meta["estimate"]
    assert meta["classifier"] == "WideResNet-28-10" and meta["device"]
    assert {r["network"] for r in rows if "network" in r} == {"score_sde/vp/cifar10_ddpmpp_deep_continuous"}
    for row in rows[:-1]:
        units = row["unit_seconds"]
        assert all(v > 0 for v in units.values())
        assert row["projected_seconds"] == pytest.approx(10 * sum(row["per_image"][k] * units[k] for k in units))
    assert rows[-1]["attack"] == "total" and rows[-1]["projected_seconds"] == pytest.approx(
        sum(r["projected_seconds"] for r in rows[:-1]))
