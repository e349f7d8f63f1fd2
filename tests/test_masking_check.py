"""``python -m benchmarks masking-check``: the gradient-masking checks of :mod:`benchmarks.harness.masking` as pure
functions on hand-made accuracy tables (a masked profile fails, an honest one passes), the plan of cells, and the
command end to end in its ``smoke`` preset on the undefended classifier (files, keys, resuming, refusing other
settings). Bad command lines: ``tests/test_cli_errors.py``."""

import json
import math
import os

import pytest

from attacks_adaptive.files import StateError
from benchmarks import run_command
from benchmarks.harness import masking

N = 100


# ---------------------------------------------------------------------------------------------------------------------
# Tolerances

def test_tolerances_follow_the_binomial_standard_error():
    assert masking.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert masking.binomial_se(0.0, 100) == 0.0
    # two standard errors of a difference of two proportions at their mean, at least one image
    assert masking.difference_tolerance(0.4, 0.6, 100) == pytest.approx(2 * math.sqrt(2 * 0.25 / 100))
    assert masking.difference_tolerance(0.0, 0.0, 16) == pytest.approx(1 / 16)
    assert masking.zero_threshold(100) == pytest.approx(0.05 + 2 * math.sqrt(0.05 * 0.95 / 100))
    assert masking.zero_threshold(2) == 0.5  # one image of two
    assert masking.zero_threshold(10_000) < masking.zero_threshold(100) < masking.zero_threshold(16)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        masking.difference_tolerance(0.1, 0.2, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Masked versus honest profiles

HONEST = {"eps": {0.3: 0.42, 0.45: 0.20, 0.67: 0.05, 1.0: 0.0},
          "iterations": {10: 0.50, 50: 0.44, 200: 0.42},
          "eot": {1: 0.55, 5: 0.45, 20: 0.42},
          "white_box": {"PGD+EOT[exact]": 0.42}, "others": {"SPSA": 0.60, "Square+EOT": 0.50, "Transfer": 0.90},
          "exact": 0.42, "bpda": 0.55}
MASKED = {"eps": {0.3: 0.80, 0.45: 0.82, 0.67: 0.85, 1.0: 0.80},  # flat: the gradient leads nowhere
          "iterations": {10: 0.40, 50: 0.60, 200: 0.80},            # more iterations, more robust
          "eot": {1: 0.30, 5: 0.55, 20: 0.80},
          "white_box": {"PGD+EOT[exact]": 0.80}, "others": {"SPSA": 0.30, "Square+EOT": 0.78, "Transfer": 0.90},
          "exact": 0.80, "bpda": 0.30}


def _run_all(profile, n=N):
    return {"eps": masking.check_eps_sweep(profile["eps"], n, unbounded_eps=1.0),
            "iterations": masking.check_non_increasing(profile["iterations"], n, "steps"),
            "eot": masking.check_non_increasing(profile["eot"], n, "eot"),
            "not_stronger": masking.check_not_stronger(profile["white_box"], profile["others"], n),
            "bpda": masking.check_exact_vs_bpda(profile["exact"], profile["bpda"], n)}


def test_an_honest_profile_passes_every_check():
    results = _run_all(HONEST)
    assert {name: r["pass"] for name, r in results.items()} == dict.fromkeys(results, True)
    assert results["eps"]["reaches_zero"] is True and results["eps"]["violations"] == []


def test_a_masked_profile_fails_every_check():
    results = _run_all(MASKED)
    assert {name: r["pass"] for name, r in results.items()} == dict.fromkeys(results, False)
    assert results["eps"]["reaches_zero"] is False  # 80% at eps 1: any image was reachable
    assert {(v["from"], v["to"]) for v in results["iterations"]["violations"]} == {("10", "200"), ("10", "50"),
                                                                                   ("50", "200")}
    assert results["not_stronger"]["violations"] == ["SPSA"]  # Square+EOT 78% is within the tolerance of 80%
    assert results["not_stronger"]["others"]["Square+EOT"]["pass"] is True


def test_a_rise_within_the_tolerance_of_n_is_not_a_failure():
    # 3 images of 16 is within 2 standard errors; the same rise on 1,000 images is not
    assert masking.check_non_increasing({2: 0.50, 5: 0.5 + 3 / 16}, 16)["pass"] is True
    assert masking.check_non_increasing({2: 0.50, 5: 0.5 + 3 / 16}, 1000)["pass"] is False
    # and the fall to 0 allows the binomial margin around 5%, not more
    assert masking.check_eps_sweep({0.3: 0.5, 1.0: 2 / 16}, 16, 1.0)["pass"] is True
    assert masking.check_eps_sweep({0.3: 0.5, 1.0: 3 / 16}, 16, 1.0)["pass"] is False


def test_a_sweep_short_of_the_unbounded_radius_judges_the_fall_only():
    result = masking.check_eps_sweep({0.3: 0.6, 0.5: 0.4}, N, unbounded_eps=1.0)
    assert result["pass"] is True and result["reaches_zero"] is None and "short of the unbounded" in result["note"]


def test_skipped_checks_and_the_summary_line():
    assert masking.check_exact_vs_bpda(None, 0.3, N)["pass"] is None
    assert masking.check_not_stronger({"PGD": 0.2}, {}, N)["pass"] is None  # nothing to compare
    checks = [{"name": "a", "pass": True}, {"name": "b", "pass": False}, {"name": "c", "pass": None}]
    line = masking.summary_line(checks)
    assert line.startswith("1 of 2 checks pass; FAILED: b") and "skipped: c" in line
    assert masking.combine({"single_shot": {"pass": True}, "majority_vote": {"pass": False}}) is False
    assert masking.combine({"single_shot": {"pass": None}, "majority_vote": {"pass": None}}) is None


@pytest.mark.parametrize("bad, match", [({0.3: 1.2, 1.0: 0.0}, "fraction in"), ({0.3: 0.1}, "at least 2")])
def test_bad_accuracy_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        masking.check_eps_sweep(bad, N)


def test_evaluate_checks_from_cells():
    """The cells' roles feed the checks: a masked ADP-like table fails checks 1, 2, 4 and 5 under both scorings; the
    white-box reference of check 4 is the strongest PGD cell at the base eps."""
    def cell(kind, roles, eps=0.3, steps=5, eot=2, acc=0.5, gradient="exact"):
        return {"name": masking.cell_name(kind, gradient, eps, steps, eot), "kind": kind, "roles": roles, "eps": eps,
                "steps": steps, "eot": eot, "gradient": gradient,
                "accuracy": {"single_shot": acc, "majority_vote": acc}}

    cells = [cell("pgd", ["eps", "iterations", "eot", "white_box", "exact"], acc=0.8),
             cell("pgd", ["eps"], eps=1.0, acc=0.8), cell("pgd", ["iterations"], steps=10, acc=0.95),
             cell("pgd", ["eot"], eot=4, acc=0.8), cell("bpda", ["bpda"], acc=0.1),
             cell("spsa", ["gradient_free"], eot=None, acc=0.1), cell("transfer", ["transfer"], eot=None, acc=0.9),
             {"name": "Square+EOT", "kind": "square", "roles": ["gradient_free"], "eps": 0.3, "not_run": "x"}]
    checks = masking.evaluate_checks(cells, 100, 1.0)
    assert [c["pass"] for c in checks] == [False, False, True, False, False]
    assert checks[3]["scorings"]["single_shot"]["not_run"] == ["Square+EOT"]
    assert checks[3]["scorings"]["single_shot"]["reference_accuracy"] == 0.8


def test_the_plan_shares_the_base_cell_and_follows_the_purifier():
    preset = masking.settings_for("cpu", "adp")
    sweep = masking.eps_sweep(0.3, "linf", 4, 784)
    assert sweep[0] == 0.3 and sweep[-1] == 1.0 and len(sweep) == 4
    assert masking.eps_sweep(2.0, "l2", 3, 784)[-1] == pytest.approx(28.0)
    cells = masking.plan_cells(preset, 0.3, "linf", sweep, ("bpda", "exact"))
    names = [c["name"] for c in cells]
    assert len(names) == len(set(names))
    base = cells[0]
    assert set(base["roles"]) == {"eps", "iterations", "eot", "white_box", "exact"}
    assert {c["kind"] for c in cells} == {"pgd", "bpda", "transfer", "spsa", "square"}
    # ScoreOpt in the CPU preset: the sweeps through the surrogate, one exact cell for check 5
    cells = masking.plan_cells(masking.settings_for("cpu", "scoreopt"), 0.3, "linf", sweep,
                               ("bpda", "surrogate", "exact"))
    exact = [c for c in cells if c["gradient"] == "exact"]
    assert len(exact) == 1 and "exact" in exact[0]["roles"]
    assert masking.settings_for("cpu", "coup")["costly"] is True
    # the undefended classifier: no EOT sweep, no BPDA
    cells = masking.plan_cells(masking.settings_for("smoke", "none"), 0.3, "linf", [0.3, 1.0], ())
    assert not any("eot" in c["roles"] or c["kind"] == "bpda" for c in cells)


# ---------------------------------------------------------------------------------------------------------------------
# The command end to end

@pytest.mark.slow  # 15-30 s on the shared 2-core machine
def test_the_command_writes_json_and_markdown_resumes_and_refuses_other_settings(tmp_path, capsys):
    argv = ["masking-check", "--defense", "none", "--preset", "smoke", "--out", str(tmp_path), "--threads", "1"]
    run_command(argv)
    with open(tmp_path / "masking_none.json") as f:
        report = json.load(f)
    assert {"defense", "summary", "passed", "checks", "clean", "cells", "settings", "meta"} <= set(report)
    assert [c["number"] for c in report["checks"]] == [1, 2, 3, 4, 5]
    for check in report["checks"]:
        assert set(check["scorings"]) == {"single_shot", "majority_vote"}
        assert {"name", "source", "pass"} <= set(check)
    assert report["settings"]["eps_sweep"] == [0.3, 1.0] and report["settings"]["preset"] == "smoke"
    assert any(c["kind"] == "square" for c in report["cells"])
    markdown = (tmp_path / "masking_none.md").read_text()
    assert markdown.startswith("# Gradient-masking checks: none") and report["summary"] in markdown
    assert "## 4. gradient-free and transfer attacks" in markdown
    out = capsys.readouterr().out
    assert "6 cells, 6 to run" in out
    # a rerun loads every saved cell
    saved = {p: os.path.getmtime(p) for p in (tmp_path / "masking_state" / "none").iterdir()}
    run_command(argv)
    assert "6 cells, 0 to run" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in saved} == saved
    # other settings into the same folder are refused, not mixed
    with pytest.raises(StateError, match="other settings"):
        run_command(argv + ["--seed", "1", "--quiet"])
