"""The installed environment: every package imports, and robustbench 1.1.1 (not torchattacks' copy) imports through
the one compatibility shim."""

import importlib


def test_packages_import():
    for name in ("purifiers", "attacks_adaptive", "benchmarks", "pyautoattack", "torchattacks", "art"):
        importlib.import_module(name)


def test_robustbench_utils_and_data_through_the_shim():
    from benchmarks.harness.rb_compat import import_robustbench

    robustbench = import_robustbench()
    from robustbench.data import load_cifar10  # noqa: F401
    from robustbench.utils import clean_accuracy, update_json  # noqa: F401

    assert hasattr(robustbench, "benchmark")  # the vendored torchattacks copy has no benchmark()
    import autoattack
    import pyautoattack

    assert autoattack is pyautoattack


def test_robustbench_clean_accuracy_runs():
    import torch

    from benchmarks.harness.rb_compat import import_robustbench

    import_robustbench()
    from robustbench.utils import clean_accuracy

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]).view(2, 1, 2, 2)
    assert clean_accuracy(model, x, torch.tensor([0, 1])) == 1.0
    assert clean_accuracy(model, x, torch.tensor([1, 1])) == 0.5
