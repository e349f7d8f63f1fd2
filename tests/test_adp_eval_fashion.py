"""The blind-PGD studies on Fashion-MNIST (benchmarks.studies.adp, scoreopt_eval, vpsde_eval with --dataset
fashion_mnist) on 4-image idx fixtures written here (CI has no Debian package): the attack settings, the file names
beside MNIST's, parts and merge, the refusal to test without chosen settings, and bad input."""

import json

import numpy as np
import pytest
from test_fashion_mnist import write_fashion_idx

from benchmarks.defenses import defense, record
from benchmarks.results import read_results
from benchmarks.studies import adp as adp_eval
from benchmarks.studies import scoreopt as scoreopt_eval
from benchmarks.studies import vpsde as vpsde_eval
from benchmarks.studies.tuning import (BLIND_PGD, MissingSettingsError, blind_adversarials, blind_pgd_config,
                                       cached_blind_pgd, eps_text, file_prefix, load_models, registry_line,
                                       shipped_prior_path)

FAST = {"sigma": 0.1, "lam": 0.2, "steps": 2}  # two purification steps: the bookkeeping, not the accuracy, is tested


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_idx(folder, n_train=48, n_test=8)  # val: the last twelfth of the training file, 4 images
    return str(folder)


def test_fashion_blind_pgd_is_the_8_over_255_attack_and_mnist_keeps_its_own():
    fashion = blind_pgd_config("fashion_mnist")
    assert fashion == dict(eps=8 / 255, norm="linf", steps=40, step=2 / 255, random_start=False)
    assert blind_pgd_config("mnist") == BLIND_PGD
    with pytest.raises(ValueError, match="no blind-PGD settings for dataset 'cifar10'"):
        blind_pgd_config("cifar10")


def test_the_cache_keeps_each_attack_apart(data_dir, tmp_path):
    classifier, _ = load_models("fashion_mnist")
    x, y, x_adv = blind_adversarials(classifier, "val", 2, str(tmp_path), dataset="fashion_mnist", data_dir=data_dir)
    assert np.abs(x_adv - x).max() <= 8 / 255 + 1e-6 and len(y) == 2
    mnist_attack = cached_blind_pgd(classifier, x, y, str(tmp_path))  # same images and weights, MNIST's eps 0.3
    assert len(list(tmp_path.glob("*.npy"))) == 2 and np.abs(mnist_attack - x).max() > 8 / 255 + 1e-6


def test_sweep_evaluate_and_merge_write_fashion_files(data_dir, tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    chosen = adp_eval.run_sweep(out, n=4, grid={k: [v] for k, v in FAST.items()}, cache_dir=cache, verbose=False,
                                dataset="fashion_mnist", data_dir=data_dir)
    sweep = read_results(str(tmp_path / "out" / "adp_fashion_mnist_val_sweep.json"))
    assert [r["defense"] for r in sweep["rows"]] == ["none", "adp"]
    assert all(r["eps"] == pytest.approx(8 / 255) and r["step"] == pytest.approx(2 / 255) for r in sweep["rows"])
    assert sweep["meta"]["attack"]["eps"] == pytest.approx(8 / 255) and "fashion_mnist" in sweep["meta"]["dataset"]
    registry = record("adp").settings_for("fashion_mnist")  # the swept keys left out of the grid come from here
    assert sweep["rows"][1]["settings"] == {**registry, **FAST}
    assert chosen is None or chosen["settings"] == sweep["rows"][1]["settings"]

    for start in (0, 2):
        adp_eval.run_evaluate(out, split="test", n=2, start=start, runs=1, settings=FAST, cache_dir=cache,
                              verbose=False, dataset="fashion_mnist", data_dir=data_dir, label="paper")
    merged = adp_eval.merge_parts(out, "test", "fashion_mnist", "paper")
    assert merged["path"].endswith("adp_fashion_mnist_paper_test.json")
    assert [r["n"] for r in merged["rows"]] == [4, 4] and merged["meta"]["parts"] == [
        "adp_fashion_mnist_paper_test_0-2.json", "adp_fashion_mnist_paper_test_2-4.json"]
    assert "93.19 standard / 86.62 clf pgd" in merged["meta"]["paper"]
    parts = [read_results(str(tmp_path / "out" / f)) for f in merged["meta"]["parts"]]
    for key in ("clean_acc", "robust_acc"):
        assert merged["rows"][1][key] == pytest.approx(np.mean([p["rows"][1][key] for p in parts]))
    with pytest.raises(ValueError, match="no parts"):  # MNIST's names never match Fashion's files
        adp_eval.merge_parts(out, "test")
    adp_eval.run_evaluate(out, split="test", n=2, start=1, runs=1, settings=FAST, cache_dir=cache, verbose=False,
                          dataset="fashion_mnist", data_dir=data_dir, label="paper")
    with pytest.raises(ValueError, match="adp_fashion_mnist_paper_test_0-2.json and adp_fashion_mnist_paper_test_1-3"
                                         ".json in .* overlap"):
        adp_eval.merge_parts(out, "test", "fashion_mnist", "paper")


def test_bad_input_is_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        adp_eval.run_sweep(str(tmp_path), n=4, dataset="cifar10", verbose=False)
    with pytest.raises(ValueError, match=r"unknown keys \['tau'\]"):
        adp_eval.run_sweep(str(tmp_path), n=4, grid={"tau": [0.1]}, dataset="fashion_mnist", verbose=False)
    with pytest.raises(ValueError, match="label 'Paper row'"):
        adp_eval.merge_parts(str(tmp_path), "test", "fashion_mnist", "Paper row")
    with pytest.raises(ValueError, match=r"images 6\.\.10 are outside Fashion-MNIST test \(0\.\.8\)"):
        adp_eval.run_evaluate(str(tmp_path), n=4, start=6, runs=1, settings=FAST, cache_dir=str(tmp_path),
                              verbose=False, dataset="fashion_mnist", data_dir=data_dir)


def test_the_cli_takes_the_dataset(data_dir, tmp_path):
    adp_eval.main(["adp-study", "evaluate", "--dataset", "fashion_mnist", "--data-dir", data_dir, "--split", "val",
                   "--n", "2", "--runs", "1", "--settings", json.dumps(FAST), "--out", str(tmp_path),
                   "--cache-dir", str(tmp_path), "--quiet"])
    assert (tmp_path / "adp_fashion_mnist_val_0-2.json").exists()
    with pytest.raises(SystemExit):
        adp_eval.main(["adp-study", "memory", "--dataset", "fashion_mnist"])


def test_the_registry_has_fashion_settings_of_their_own(prior32):
    fashion, mnist = record("adp").settings_for("fashion_mnist"), record("adp").settings_for("mnist")
    assert fashion != mnist and set(fashion) == set(adp_eval.SWEPT)
    purifier = defense("adp", "fashion_mnist", prior=prior32)
    assert {k: getattr(purifier, k) for k in fashion} == fashion


# ---------------------------------------------------------------------------------------------------------------------
# scoreopt_eval and vpsde_eval

# One Adam step / a 5-step diffusion (t* = 0.005 at dt 1e-3): the bookkeeping, not the accuracy, is tested.
SCOREOPT_TINY = {"O": [{"loss": ["diff"], "noise_range": [[0.1, 0.2]], "steps_lr": [[1, 0.02]]}],
                 "N": [{"loss": ["diff"], "noise_range": [[0.1, 0.1]], "steps_inner": [[1, 1]], "lr": [0.1]}]}
T_TINY = 0.005


def _assert_fashion_attack(data):
    assert all(r["eps"] == pytest.approx(8 / 255) and r["step"] == pytest.approx(2 / 255) and r["attack"] == "BlindPGD"
               for r in data["rows"])
    assert data["meta"]["blind_pgd"] == blind_pgd_config("fashion_mnist")
    assert data["meta"]["dataset"].startswith("fashion_mnist")


def test_mnist_names_stay_and_fashion_names_carry_the_dataset(tmp_path):
    assert [file_prefix(s, "mnist") for s in ("adp", "vpsde", "")] == ["adp_", "vpsde_", ""]
    assert [file_prefix(s, "fashion_mnist") for s in ("adp", "vpsde", "")] == [
        "adp_fashion_mnist_", "vpsde_fashion_mnist_", "fashion_mnist_"]
    assert scoreopt_eval.tuning_path("o", "N") == "o/val_tuning_N.json"
    assert scoreopt_eval.tuning_path("o", "N", "fashion_mnist") == "o/fashion_mnist_val_tuning_N.json"
    assert eps_text(blind_pgd_config("mnist")) == "0.3" and eps_text(blind_pgd_config("fashion_mnist")) == "8/255"


def test_fashion_grids_are_scaled_down_and_small():
    for variant, defense_name in scoreopt_eval.VARIANT_DEFENSE.items():
        grid = list(scoreopt_eval._grid(scoreopt_eval.GRID["fashion_mnist"][variant], variant))
        assert 8 <= len(grid) <= 12
        mnist = list(scoreopt_eval._grid(scoreopt_eval.GRID["mnist"][variant], variant))
        assert max(s["noise_range"][1] for s in grid) < min(s["noise_range"][0] for s in mnist)
    fashion_t, mnist_t = vpsde_eval.T_STARS["fashion_mnist"], vpsde_eval.T_STARS["mnist"]
    assert min(fashion_t) < min(mnist_t) and max(fashion_t) < max(mnist_t)
    assert len(fashion_t) + len(vpsde_eval.LAMBDAS["fashion_mnist"]) <= 12


def test_registry_line_spells_the_selection():
    line = registry_line("scoreopt", "fashion_mnist", {"variant": "O", "loss": "diff", "steps": 5, "lr": 0.02,
                                                       "noise_range": [0.1, 0.2], "optimizer": "adam"})
    assert line.endswith("REGISTRY['scoreopt'].settings['fashion_mnist'] = dict(variant='O', loss='diff', steps=5, "
                         "lr=0.02, noise_range=(0.1, 0.2))")
    coup = registry_line("coup", "fashion_mnist", {"t_star": 0.05, "guidance_scale": 2.0, "clean_acc": 1.0})
    assert coup.endswith("dict(t_star=0.05, guidance_scale=2.0, dt=0.001)")


def test_scoreopt_tune_writes_fashion_files_and_test_refuses_without_settings(data_dir, tmp_path, monkeypatch, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    tuned = scoreopt_eval.run_tune(out, n=4, grid=SCOREOPT_TINY, dataset="fashion_mnist", data_dir=data_dir,
                                   cache_dir=cache, verbose=False)
    for variant in ("O", "N"):
        data = read_results(str(tmp_path / "out" / f"fashion_mnist_val_tuning_{variant}.json"))
        _assert_fashion_attack(data)
        assert [r["defense"] for r in data["rows"]] == ["none", f"ScoreOpt-{variant}"]
        assert data["meta"]["grid"] == SCOREOPT_TINY[variant]
        assert tuned[variant]["rows"][1]["robust_acc"] == data["rows"][1]["robust_acc"]
    assert not (tmp_path / "out" / "val_tuning_O.json").exists()

    monkeypatch.delitem(record("scoreopt").settings, "fashion_mnist", raising=False)
    with pytest.raises(MissingSettingsError, match=r"REGISTRY\['scoreopt'\]\.settings\['fashion_mnist'\] is missing.*"
                       r"`python -m benchmarks scoreopt-study tune --dataset fashion_mnist --variants O`"):
        scoreopt_eval.run_test(out, n=2, dataset="fashion_mnist", data_dir=data_dir, cache_dir=cache, verbose=False)
    with pytest.raises(MissingSettingsError, match="REGISTRY"):
        scoreopt_eval.run_curves(out, n=2, dataset="fashion_mnist", data_dir=data_dir, cache_dir=cache, verbose=False)
    with pytest.raises(SystemExit):
        scoreopt_eval.main(["scoreopt-study", "test", "--dataset", "fashion_mnist", "--data-dir", data_dir,
                            "--out", out, "--quiet"])
    assert "REGISTRY['scoreopt'].settings['fashion_mnist'] is missing" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*test*"))  # refused before any work

    monkeypatch.setitem(record("scoreopt").settings, "fashion_mnist",
                        dict(variant="O", loss="diff", steps=1, lr=0.02, noise_range=(0.1, 0.2)))
    tested = scoreopt_eval.run_test(out, n=2, variants=("O",), table10=False, dataset="fashion_mnist",
                                    data_dir=data_dir, cache_dir=cache, verbose=False)
    data = read_results(str(tmp_path / "out" / "fashion_mnist_test_O.json"))
    _assert_fashion_attack(data)
    assert data["meta"]["split"] == "test[:2]" and tested["O"]["rows"][1]["settings"]["steps"] == 1


def test_vpsde_sweep_writes_fashion_files_and_test_refuses_without_settings(data_dir, tmp_path, monkeypatch,
                                                                           capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    swept = vpsde_eval.run_sweep(out, n=4, t_stars=[T_TINY], lambdas=[2.0], lambda_t_star=T_TINY,
                                 dataset="fashion_mnist", data_dir=data_dir, cache_dir=cache, verbose=False)
    data = read_results(str(tmp_path / "out" / "vpsde_fashion_mnist_val_sweep.json"))
    _assert_fashion_attack(data)
    assert (tmp_path / "out" / "vpsde_fashion_mnist_val_curves.png").exists()
    assert [(r["defense"], r["guidance_scale"]) for r in data["rows"]] == [
        ("none", None), ("coup", 1.0), ("coup-noguide", 0.0), ("diffpure", None), ("coup", 2.0)]
    assert set(swept["meta"]["selected"]) == set(vpsde_eval.METHODS)

    for method in ("coup", "diffpure"):
        monkeypatch.delitem(record(method).settings, "fashion_mnist", raising=False)
    monkeypatch.delitem(vpsde_eval.NOGUIDE_T_STAR, "fashion_mnist", raising=False)
    for method, entry in (("coup", r"REGISTRY\['coup'\]\.settings"), ("diffpure", r"REGISTRY\['diffpure'\]\.settings"),
                          ("coup-noguide", r"studies/vpsde\.py NOGUIDE_T_STAR")):
        with pytest.raises(MissingSettingsError, match=entry + r"\['fashion_mnist'\] is missing.*"
                           r"`python -m benchmarks vpsde-study sweep --dataset fashion_mnist`"):
            vpsde_eval.run_test(out, n=2, methods=(method,), dataset="fashion_mnist", data_dir=data_dir,
                                cache_dir=cache, verbose=False)
    with pytest.raises(SystemExit):
        vpsde_eval.main(["vpsde-study", "test", "--dataset", "fashion_mnist", "--data-dir", data_dir, "--out", out])
    assert "REGISTRY['coup'].settings['fashion_mnist'] is missing" in capsys.readouterr().err
    assert not (tmp_path / "out" / "vpsde_fashion_mnist_test.json").exists()

    monkeypatch.setitem(record("diffpure").settings, "fashion_mnist", dict(t_star=T_TINY, dt=1e-3))
    vpsde_eval.run_test(out, n=2, methods=("diffpure",), dataset="fashion_mnist", data_dir=data_dir, cache_dir=cache,
                        verbose=False)
    data = read_results(str(tmp_path / "out" / "vpsde_fashion_mnist_test.json"))
    _assert_fashion_attack(data)
    assert [r["defense"] for r in data["rows"]] == ["none", "diffpure"] and data["rows"][1]["t_star"] == T_TINY
    assert data["meta"]["settings"] == {"diffpure": {"t_star": T_TINY}}
    with pytest.raises(SystemExit):
        vpsde_eval.main(["vpsde-study", "gradients", "--dataset", "fashion_mnist"])


def _other_weights(path):
    """Rewrite the prior file at ``path`` with slightly different weights (same path, same metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors = {k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


def test_a_study_resumes_only_on_the_same_weights(data_dir, tmp_path):
    """Results name the prior by its bytes: a replaced prior at the same path starts a sweep over and its parts are
    never merged with the old ones."""
    import hashlib
    import shutil

    
    prior = tmp_path / "prior.safetensors"
    shutil.copy(shipped_prior_path("fashion_mnist"), prior)
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    sweep = tmp_path / "out" / "adp_fashion_mnist_val_sweep.json"
    grid = {k: [v] for k, v in FAST.items()}

    def run():
        adp_eval.run_sweep(out, prior_path=str(prior), n=4, grid=grid, cache_dir=cache, verbose=False,
                           dataset="fashion_mnist", data_dir=data_dir)
        return read_results(str(sweep))

    first = run()
    assert first["meta"]["prior_sha256"] == hashlib.sha256(prior.read_bytes()).hexdigest()
    marked = json.loads(sweep.read_text())
    marked["rows"][1]["note"] = "finished before the interruption"
    sweep.write_text(json.dumps(marked))
    assert run()["rows"][1]["note"] == "finished before the interruption"  # same weights: the finished row is kept

    adp_eval.run_evaluate(out, prior_path=str(prior), split="test", n=2, start=0, runs=1, settings=FAST,
                          cache_dir=cache, verbose=False, dataset="fashion_mnist", data_dir=data_dir)
    _other_weights(prior)
    again = run()
    assert again["meta"]["prior_sha256"] != first["meta"]["prior_sha256"]
    assert [r["defense"] for r in again["rows"]] == ["none", "adp"] and again["rows"][1].get("note") is None

    adp_eval.run_evaluate(out, prior_path=str(prior), split="test", n=2, start=2, runs=1, settings=FAST,
                          cache_dir=cache, verbose=False, dataset="fashion_mnist", data_dir=data_dir)
    with pytest.raises(ValueError, match="different priors"):
        adp_eval.merge_parts(out, "test", "fashion_mnist")
