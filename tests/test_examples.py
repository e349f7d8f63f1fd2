"""The runnable examples of the documentation (docs/examples/) run as a user runs them: each in its own process with
this environment's python, from a folder outside the repository, and prints its key line."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")

# script -> lines its output must contain (each example takes well under a minute on 2 CPU cores)
EXPECTED = {
    "art_pipeline.py": ["purifier: ADPPyTorch, gradient=exact, eot_samples=2", "accuracy under PGD (2 iterations)"],
    "autoattack_rand.py": ["reported robust accuracy (AutoAttack's own flags)", "AutoAttack-rand"],
    "robustbench_entry.py": ["entry: model_info/mnist/Linf/adp_demo.json", "unreliable: True"],
    "authors_checkpoint.py": ["'format': 'ncsnv2'", "purified 3 images of shape (3, 32, 32)"],
}


def test_every_example_is_tested():
    assert sorted(name for name in os.listdir(EXAMPLES) if name.endswith(".py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # one torch thread unless told otherwise: two threads on a CPU shared with another job spin-wait for each other
    # (an example of ~15 s took 4 minutes that way), one thread costs a few seconds on an idle machine
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for line in EXPECTED[script]:
        assert line in proc.stdout, f"{script} did not print {line!r}:\n{proc.stdout[-3000:]}"
    assert os.listdir(tmp_path) == [], f"{script} wrote into the working folder: {os.listdir(tmp_path)}"
