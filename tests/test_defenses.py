"""The defense registry: one record per defense, one way to build a configured purifier."""

import pytest
import torch


def test_the_registry_builds_each_defense_with_its_settings_per_dataset():
    from purifiers import GaussianPrior

    from benchmarks.defenses import REGISTRY, defense, record

    prior, classifier = GaussianPrior(), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    for name, entry in REGISTRY.items():
        for dataset in ("mnist", "cifar10", "imagenet"):
            purifier = defense(name, dataset, prior=prior, classifier=classifier, gradient="bpda")
            for key, value in entry.settings_for(dataset).items():
                assert getattr(purifier, key) == value, (name, dataset, key)
    assert record("diffpure").settings_for("imagenet") == dict(t_star=0.15, dt=1e-3, resize_to=256)
    assert record("adp").settings_for("cifar10") == record("adp").paper_settings and record("adp").runs == 10
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        defense("nope")
