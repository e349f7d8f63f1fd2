"""The cost estimate: calibrated on the first batch with 1 and 2 iterations, it projects the network evaluations a run
then counts (exactly, for attacks whose cost per iteration is fixed)."""

import json
import os

import pytest

from benchmarks.attacks_run import run_attacks


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
               "--n-target-classes", "1", "--n-queries", "4", "--rescore", "2", "--runs", "2", "--out", out, "--quiet"]
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
