"""The ADP study on Fashion-MNIST (benchmarks.adp_eval --dataset fashion_mnist) on 4-image idx fixtures written here
(CI has no Debian package): its attack settings, its file names beside MNIST's, parts and merge, and bad input."""

import json

import numpy as np
import pytest

from benchmarks import adp_eval
from benchmarks.defenses import defense, record
from benchmarks.results import read_results
from benchmarks.tuning import BLIND_PGD, blind_adversarials, blind_pgd_config, cached_blind_pgd, load_models
from test_fashion_mnist import write_fashion_idx

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
    adp_eval.main(["adp-eval", "evaluate", "--dataset", "fashion_mnist", "--data-dir", data_dir, "--split", "val",
                   "--n", "2", "--runs", "1", "--settings", json.dumps(FAST), "--out", str(tmp_path),
                   "--cache-dir", str(tmp_path), "--quiet"])
    assert (tmp_path / "adp_fashion_mnist_val_0-2.json").exists()
    with pytest.raises(SystemExit):
        adp_eval.main(["adp-eval", "memory", "--dataset", "fashion_mnist"])


def test_the_registry_has_fashion_settings_of_their_own(prior32):
    fashion, mnist = record("adp").settings_for("fashion_mnist"), record("adp").settings_for("mnist")
    assert fashion != mnist and set(fashion) == set(adp_eval.SWEPT)
    purifier = defense("adp", "fashion_mnist", prior=prior32)
    assert {k: getattr(purifier, k) for k in fashion} == fashion
