"""One evaluation split over processes: for each of `attacks`, `autoattack`, `robustbench` and `reproduce`, `--shard i/N`
+ `merge`, and torchrun with 2 gloo processes, give exactly the rows and files of one process (every random draw comes
from the seed and the batch's place in the data, never the rank)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks.harness.sharding import Shard, parse_shard

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# A stochastic toy purifier (tests/tiny.py) on the Gaussian prior; 4 test images in batches of 2 (two shards' worth).
ATTACKS = ["attacks", "--defenses", "none", "tiny:make_toy", "--prior", "gaussian", "--preset", "smoke", "--n", "4",
           "--attacks", "PGD", "BlindPGD", "BPDA+EOT", "--quiet"]
AUTOATTACK = ["autoattack", "--defense", "tiny:make_toy", "--prior", "gaussian", "--n", "4", "--batch-size", "2",
              "--versions", "rand", "standard", "--n-iter", "2", "--eot-iter", "2", "--n-target-classes", "1",
              "--n-queries", "5", "--rescore", "2", "--runs", "2", "--quiet"]
OUTPUTS = ("attacks.json", "attacks_none.json", "attacks_tiny_make_toy.json", "autoattack_make_toy.json")
# The same toy on 4 images in batches of 2: the AutoAttack step and the entry; the paper table's attacks at the
# scaled-down protocol and COUP's toy with a few paths (written by whoever joins: one process, rank 0 or merge).
ROBUSTBENCH = ["robustbench", "--defense", "tiny:make_toy", "--prior", "gaussian", "--n", "4", "--batch-size", "2",
               "--versions", "rand", "--n-iter", "2", "--eot-iter", "1", "--rescore", "2", "--name", "toy", "--quiet"]
REPRODUCE = ["reproduce", "--defenses", "tiny:make_toy", "--prior", "gaussian", "--n", "4", "--batch-size", "2",
             "--eps", "0.2", "--coup-toy-runs", "20", "--quiet"]
# Their files, the meta of the results files left out (it holds the time, the command line and the folder's path).
ENTRY_OUTPUTS = ("model_info/mnist/Linf/toy.json", "robustbench_toy.json", "reproduce_mnist.json",
                 "reproduce_mnist.md", "attacks_tiny_make_toy.json", "coup_toy/coup_toy.json")


TIMES = ("seconds", "cpu_seconds")


def rows(folder, names=OUTPUTS):
    """Every output without what no two runs share: the rows' wall and CPU times (``seconds``, ``cpu_seconds``), the
    results files' meta, the COUP toy's wall time; a model_info entry and markdown as they are."""
    out = {}
    for name in names:
        with open(os.path.join(folder, name)) as f:
            if name.endswith(".md"):
                out[name] = f.read()
                continue
            data = json.load(f)
        if "rows" in data:
            out[name] = [{k: v for k, v in row.items() if k not in TIMES} for row in data["rows"]]
        else:
            out[name] = {k: v for k, v in data.items() if k not in TIMES}
    return out


def _one_process(tmp_path_factory, name, commands, outputs=OUTPUTS):
    """The outputs of ``commands`` run one after the other by this process into one folder."""
    sys.path.insert(0, TESTS)
    folder = str(tmp_path_factory.mktemp(name))
    for command in commands:
        cli.main([*command, "--out", folder])
    return rows(folder, outputs)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _one_process(tmp_path_factory, "single", [ATTACKS, AUTOATTACK])


@pytest.fixture(scope="module")
def single_entry(tmp_path_factory):
    return _one_process(tmp_path_factory, "single_entry", [ROBUSTBENCH, REPRODUCE], ENTRY_OUTPUTS)


def test_shard_arguments_are_checked():
    assert parse_shard("1/4") == Shard(1, 4) and Shard(1, 4).owns(5) and not Shard(1, 4).owns(4)
    for bad in ("4/4", "x/2", "-1/2", "1"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)


def test_shards_then_merge_give_the_single_process_rows(single, tmp_path):
    folder = str(tmp_path)
    for shard in ("1/2", "0/2"):
        cli.main([*ATTACKS, "--out", folder, "--shard", shard])
        cli.main([*AUTOATTACK, "--out", folder, "--shard", shard])
    cli.main(["merge", folder, "--quiet"])
    assert rows(folder) == single


def test_merge_refuses_unfinished_and_mismatched_shards(single, tmp_path):
    folder = str(tmp_path)
    cli.main([*AUTOATTACK, "--out", folder, "--shard", "0/2"])
    with pytest.raises(ValueError, match="not finished"):
        cli.main(["merge", folder, "--quiet"])
    with pytest.raises(ValueError, match="different run"):
        cli.main([*AUTOATTACK[:-1], "--seed", "1", "--quiet", "--out", folder, "--shard", "1/2"])
    cli.main([*ATTACKS, "--out", folder, "--shard", "0/2"])
    with pytest.raises(ValueError, match="other settings"):
        cli.main([*ATTACKS, "--seed", "3", "--out", folder, "--shard", "1/2"])


def test_robustbench_and_reproduce_shards_then_merge_give_the_single_process_files(single_entry, tmp_path, capsys):
    folder = str(tmp_path)
    for shard in ("1/2", "0/2"):
        for command in (ROBUSTBENCH, REPRODUCE):
            cli.main([*command, "--out", folder, "--shard", shard])
            assert f"shard {shard} done" in capsys.readouterr().out
            assert not os.path.exists(os.path.join(folder, "reproduce_mnist.json"))  # no shard writes the results
    cli.main(["merge", folder, "--quiet"])
    joined = rows(folder, ENTRY_OUTPUTS)
    assert joined == single_entry
    # the clean accuracy, the AutoAttack rows and the paper table come from both shards' batches
    assert joined["robustbench_toy.json"][0]["n"] == 4 and {r["n"] for r in joined["reproduce_mnist.json"]} == {4}
    assert os.path.getsize(os.path.join(folder, "reproduce_mnist.png")) > 0


def test_merge_refuses_robustbench_and_reproduce_shards_of_other_settings(tmp_path, monkeypatch):
    folder = str(tmp_path)
    cli.main([*ROBUSTBENCH, "--out", folder, "--shard", "0/2"])
    with pytest.raises(ValueError, match="not finished"):
        cli.main(["merge", folder, "--quiet"])
    # settings only the harness holds (the entry's link, COUP's toy) and settings of the batches alike
    with pytest.raises(ValueError, match=r"other settings \(differs in \['paper'\]\)"):
        cli.main([*ROBUSTBENCH, "--link", "https://example.org", "--out", folder, "--shard", "1/2"])
    with pytest.raises(ValueError, match="different run"):
        cli.main([*ROBUSTBENCH, "--eps", "0.2", "--out", folder, "--shard", "1/2"])
    with pytest.raises(ValueError, match="leave --checkpoint-dir out"):  # merge would never find that shard
        cli.main([*ROBUSTBENCH, "--checkpoint-dir", str(tmp_path / "elsewhere"), "--out", folder, "--shard", "1/2"])
    cli.main([*REPRODUCE, "--out", folder, "--shard", "0/2"])
    with pytest.raises(ValueError, match=r"other settings \(differs in \['coup_toy_runs'\]\)"):
        cli.main([*REPRODUCE, "--coup-toy-runs", "10", "--out", folder, "--shard", "1/2"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the split is torchrun's, a --shard is refused
    for command in (ROBUSTBENCH, REPRODUCE):
        with pytest.raises(ValueError, match="--shard and torchrun"):
            cli.main([*command, "--out", folder, "--shard", "1/2"])


def torchrun(command, folder):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    # --standalone: a free local port of its own, so concurrent test runs on one machine do not collide
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "benchmarks", "--", *command, "--out", folder], check=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_gives_the_single_process_rows(single, tmp_path):
    for command in (ATTACKS, AUTOATTACK):
        torchrun(command, str(tmp_path))
    assert rows(str(tmp_path)) == single
    assert not torch.distributed.is_initialized()  # this process was never part of the group


@pytest.mark.slow
def test_torchrun_robustbench_and_reproduce_give_the_single_process_files(single_entry, tmp_path):
    for command in (ROBUSTBENCH, REPRODUCE):
        torchrun(command, str(tmp_path))
    assert rows(str(tmp_path), ENTRY_OUTPUTS) == single_entry
