"""The cost estimate: calibrated on the first batch with 1 and 2 iterations, it projects the network evaluations a run
then counts (exactly, for attacks whose cost per iteration is fixed)."""

import json
import os

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
