"""One evaluation split over processes: `--shard i/N` + `merge`, and torchrun with 2 gloo processes, give exactly the
rows of one process (every random draw comes from the seed and the batch's place in the data, never the rank)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks.sharding import Shard, parse_shard

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# A stochastic toy purifier (tests/tiny.py) on the Gaussian prior; 4 test images in batches of 2 (two shards' worth).
ATTACKS = ["attacks", "--defenses", "none", "tiny:make_toy", "--prior", "gaussian", "--preset", "smoke", "--n", "4",
           "--attacks", "PGD", "BlindPGD", "BPDA+EOT", "--quiet"]
AUTOATTACK = ["autoattack", "--defense", "tiny:make_toy", "--prior", "gaussian", "--n", "4", "--batch-size", "2",
              "--versions", "rand", "standard", "--n-iter", "2", "--eot-iter", "2", "--n-target-classes", "1",
              "--n-queries", "5", "--rescore", "2", "--runs", "2", "--quiet"]
OUTPUTS = ("attacks.json", "attacks_none.json", "attacks_tiny_make_toy.json", "autoattack_make_toy.json")


def rows(folder):
    """Every output's rows without the wall time (which no two runs share)."""
    out = {}
    for name in OUTPUTS:
        with open(os.path.join(folder, name)) as f:
            out[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in json.load(f)["rows"]]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    sys.path.insert(0, TESTS)
    folder = str(tmp_path_factory.mktemp("single"))
    cli.main([*ATTACKS, "--out", folder])
    cli.main([*AUTOATTACK, "--out", folder])
    return rows(folder)


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


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_gives_the_single_process_rows(single, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for command in (ATTACKS, AUTOATTACK):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29517", "-m", "benchmarks", "--", *command, "--out", str(tmp_path)], check=True, env=env, cwd=ROOT,
                       timeout=600)
    assert rows(str(tmp_path)) == single
    assert not torch.distributed.is_initialized()  # this process was never part of the group
