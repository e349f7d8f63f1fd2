"""A RobustBench-style entry for a purified model, then a local leaderboard of the entries in the folder.

Run: ``python docs/examples/robustbench_entry.py [--out DIR] [--n 2]`` (well under a minute on 2 CPU cores).

``run_command([...])`` runs ``python -m benchmarks <command> ...`` in this process. The ``robustbench`` command
performs RobustBench's evaluation steps with AutoAttack 'rand' on the deployed defense and writes
``<out>/model_info/<dataset>/<threat_model>/<name>.json`` in RobustBench's schema (plus ``external`` and
``unreliable``); ``leaderboard`` renders such a folder as markdown and HTML, sorted as RobustBench sorts. The settings
here are scaled down (2 images, 1 iteration, EOT 1, one purification per prediction): the entry says so in its
footnote. The protocol: ``python -m benchmarks robustbench --defense adp --n 512 --device cuda --out .``
(docs/robustbench.md).
"""

import argparse
import json
import pathlib
import tempfile

from benchmarks import run_command


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one, removed at the end)")
    parser.add_argument("--n", type=int, default=2, help="MNIST test images")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.out or tmp)
        # ADP with the registry's MNIST settings, the shipped classifier and prior, l_inf eps 0.3 (MNIST's default).
        run_command(["robustbench", "--defense", "adp", "--name", "adp_demo", "--n", str(args.n), "--runs", "1",
                     "--versions", "rand", "--n-iter", "1", "--eot-iter", "1", "--rescore", "2",
                     "--device", "cpu", "--out", str(out), "--quiet"])
        entry_path = out / "model_info" / "mnist" / "Linf" / "adp_demo.json"
        entry = json.loads(entry_path.read_text())

        # The leaderboard prints its markdown table and writes leaderboard.md and leaderboard.html into --out.
        run_command(["leaderboard", str(out / "model_info"), "--out", str(out)])

        print(f"entry: {entry_path.relative_to(out)}")
        for key in ("name", "eps", "clean_acc", "autoattack_acc", "external", "number_forward_passes", "unreliable"):
            print(f"  {key}: {entry.get(key)}")
        print("  footnote:", entry.get("footnote"))


if __name__ == "__main__":
    main()
