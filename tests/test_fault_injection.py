"""Fault injection on the long runs. Each resumable command is killed with SIGKILL at chosen points (right after its
first unit of work is saved, with all but one unit saved) and at seeded-random ones (after a random number of units, or
after a random share of the time an uninterrupted run took), then run again with the same command line, until it
finishes; its results must equal the uninterrupted run's: the same rows (wall times aside) and, for ``train-prior``,
the same weights bit for bit. Covered: ``attacks``, ``autoattack``, ``robustbench``, two ``--shard i/2`` runs killed
before their ``merge``, the ``merge`` itself, ``train-prior``.

Then the states a run must refuse by name rather than reuse (truncated, written with other settings or with another
prior) and a full disk during a checkpoint or result write (a small tmpfs; skipped where mounting is not allowed).

The commands run in forked children of this process (``tests/forked.py``), which spares each run the 5 s of importing
torch and ART again; the settings are the tiny ones of ``tests/test_sharding.py`` (the toy purifier on the Gaussian
prior, 4 images in batches of 2).
"""

import contextlib
import glob
import json
import os
import random
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sharding import ATTACKS, AUTOATTACK, ENTRY_OUTPUTS, OUTPUTS, ROBUSTBENCH, rows
from tiny import tiny_prior

import forked
from attacks_adaptive.files import WriteError, atomic_write

SEED = 23  # the number: the random kill points are drawn from it, the same on every run
TRAIN = ["train-prior", "--max-steps", "40", "--checkpoint-every", "4", "--batch-size", "2", "--base-channels", "8",
         "--psnr-n", "2", "--quiet"]
ATTACKS_OUT, AUTOATTACK_OUT = OUTPUTS[:3], OUTPUTS[3:]
ROBUSTBENCH_OUT = ENTRY_OUTPUTS[:2]
KILLS: dict[str, list[str]] = {}  # command -> the kill points that hit a running command (the test report's figures)


@pytest.fixture(scope="module", autouse=True)
def preloaded():
    forked.preload()
    yield
    print(f"\nkill points that hit a running command: {sum(map(len, KILLS.values()))}")
    for name, points in KILLS.items():
        print(f"  {name}: {len(points)}: {'; '.join(points)}")


# ---------------------------------------------------------------------------------------------------------------------
# What a run has saved, and the kill triggers

class Units:
    """The units of work a run has saved: the files matching ``pattern`` under its folder (per-batch states, results
    files), not counting the temporary file of a write in flight."""

    restarts = False  # whether a rerun does every unit again (else it resumes after the saved ones)

    def __init__(self, folder: str, pattern: str):
        self.folder, self.pattern = folder, pattern

    def done(self) -> int:
        return sum(not path.endswith(".tmp") for path in glob.glob(os.path.join(self.folder, self.pattern),
                                                                   recursive=True))

    def counter(self):
        """The units saved since now (polled while a run goes on)."""
        start = self.done()
        return lambda: self.done() - start


class Rewrites(Units):
    """The units of a run that rewrites its files from the start (``merge``: every rerun writes every results file
    again): the writes seen since the run started, each a new file or a new inode (an atomic rename over the old)."""

    restarts = True

    def done(self) -> int:
        return 0

    def counter(self):
        seen, writes = self._inodes(), [0]

        def count():
            for path, inode in self._inodes().items():
                if seen.get(path) != inode:
                    seen[path], writes[0] = inode, writes[0] + 1
            return writes[0]
        return count

    def _inodes(self) -> dict:
        found = {}
        for path in glob.glob(os.path.join(self.folder, self.pattern)):
            with contextlib.suppress(FileNotFoundError):  # renamed away between the listing and the look
                found[path] = os.stat(path).st_ino
        return found


class Checkpoints(Rewrites):
    """The units of ``train-prior``: its checkpoint, rewritten every ``every`` steps; ``done`` reads the step it
    holds."""

    restarts = False

    def __init__(self, path: str, every: int):
        super().__init__(os.path.dirname(path), os.path.basename(path))
        self.path, self.every = path, every

    def done(self) -> int:
        return int(torch.load(self.path, weights_only=True)["step"]) // self.every if os.path.exists(self.path) else 0


def kill_and_resume(name: str, argv: list[str], cwd: str, units: Units, total: int, seconds: float, points,
                    rng: random.Random) -> None:
    """Run ``argv`` once per kill point, each run killed at its point, then once more to the end (exit status 0).

    A point is ``"first"`` (once the run saved its first unit), ``"all-but-one"`` (once all units but the last are
    saved: the last point), ``"random"`` (after a random number of units, leaving units for the points after it) or
    ``"delay"`` (after a random share of the time the uninterrupted run took, scaled to the units left; at the latest
    where a ``"random"`` point could be). Every point must hit the command while it runs."""
    for k, point in enumerate(points):
        left = total - units.done()
        assert left >= 2, f"{name}: {left} units left for the kill points {points[k:]}"
        saved, most = units.counter(), max(1, (left - 1) // (1 if units.restarts else len(points) - k))
        if point == "delay":
            delay, began = rng.uniform(0.1, 0.9) * seconds * left / total, time.monotonic()
            trigger = lambda: time.monotonic() - began > delay or saved() >= most  # noqa: E731
            label = f"delay {delay:.2f} s"
        else:
            after = {"first": 1, "all-but-one": left - 1, "random": rng.randint(1, most)}[point]
            trigger = lambda: saved() >= after  # noqa: E731
            label = f"{point}: after {after} more of {left} units"
        run = forked.run(argv, cwd, trigger=trigger)
        assert run.killed, f"{name}, {label}: the run ended first ({run.returncode}): {run.stderr[-2000:]}"
        KILLS.setdefault(name, []).append(label)
    final = forked.run(argv, cwd)
    assert final.returncode == 0, final.stderr[-3000:]


def uninterrupted(argv: list[str], cwd: str) -> float:
    run = forked.run(argv, cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.seconds


def outputs(folder: str, names) -> dict:
    """The results files' rows without wall times (``tests/test_sharding.py``'s ``rows``) and the strongest examples
    of ``attacks`` (``*_worst_adv.npz``), exactly."""
    found = rows(folder, names)
    for path in sorted(glob.glob(os.path.join(folder, "*_worst_adv.npz"))):
        with np.load(path) as f:
            found[os.path.basename(path)] = {k: f[k].tolist() for k in f.files}
    return found


# ---------------------------------------------------------------------------------------------------------------------
# The uninterrupted runs

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each command run once to the end: ``{command: (folder, seconds)}``."""
    folder = str(tmp_path_factory.mktemp("reference"))
    out = {}
    for name, argv in (("attacks", ATTACKS), ("autoattack", AUTOATTACK), ("robustbench", ROBUSTBENCH)):
        out[name] = (os.path.join(folder, name), uninterrupted([*argv, "--out", os.path.join(folder, name)], folder))
    prior = os.path.join(folder, "train", "prior.safetensors")
    out["train-prior"] = (prior, uninterrupted([*TRAIN, "--out", prior], folder))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Killed and resumed: the same results

def test_attacks_killed_and_resumed_gives_the_uninterrupted_rows(reference, tmp_path):
    folder, seconds = reference["attacks"]
    units = Units(str(tmp_path / "out"), "attacks_state/**/b*.npz")
    kill_and_resume("attacks", [*ATTACKS, "--out", units.folder], str(tmp_path), units,
                    Units(folder, units.pattern).done(), seconds, ["first", "random", "delay", "random", "all-but-one"],
                    random.Random(SEED))
    assert outputs(units.folder, ATTACKS_OUT) == outputs(folder, ATTACKS_OUT)


def test_autoattack_killed_and_resumed_gives_the_uninterrupted_rows(reference, tmp_path):
    folder, seconds = reference["autoattack"]
    units = Units(str(tmp_path / "out"), "checkpoints/*/*_0*.pt")
    kill_and_resume("autoattack", [*AUTOATTACK, "--out", units.folder], str(tmp_path), units,
                    Units(folder, units.pattern).done(), seconds, ["delay", "first", "random", "all-but-one"],
                    random.Random(SEED + 1))
    assert outputs(units.folder, AUTOATTACK_OUT) == outputs(folder, AUTOATTACK_OUT)


def test_robustbench_killed_and_resumed_gives_the_uninterrupted_entry(reference, tmp_path):
    folder, seconds = reference["robustbench"]
    units = Units(str(tmp_path / "out"), "checkpoints/*/*_0*.pt")
    kill_and_resume("robustbench", [*ROBUSTBENCH, "--out", units.folder], str(tmp_path), units,
                    Units(folder, units.pattern).done(), seconds, ["first", "random", "delay"], random.Random(SEED + 2))
    assert outputs(units.folder, ROBUSTBENCH_OUT) == outputs(folder, ROBUSTBENCH_OUT)


@pytest.fixture(scope="module")
def sharded(reference, tmp_path_factory):
    """``attacks`` and ``autoattack`` as two shards each (``--shard 0/2``, ``--shard 1/2``) into one folder, every
    shard killed and resumed; not merged yet."""
    folder, cwd = str(tmp_path_factory.mktemp("sharded")), str(tmp_path_factory.mktemp("sharded_cwd"))
    rng = random.Random(SEED + 3)
    for name, argv, pattern, points in (("attacks", ATTACKS, "attacks_state/**/b*.npz", (["first"], ["delay"])),
                                        ("autoattack", AUTOATTACK, "checkpoints/*/*_0*.pt", (["delay"], ["first"]))):
        units = Units(folder, pattern)
        for shard, shard_points in zip(("0/2", "1/2"), points):
            # a shard saves every other batch, half the units: it ends with them beside the other shard's
            total = Units(reference[name][0], pattern).done() // 2 + units.done()
            kill_and_resume(f"{name} --shard", [*argv, "--out", folder, "--shard", shard], cwd, units, total,
                            reference[name][1] / 2, shard_points, rng)
    return folder


def test_two_shards_killed_before_merge_give_the_single_process_rows(reference, sharded, tmp_path):
    folder = str(tmp_path / "merged")
    shutil.copytree(sharded, folder)
    assert forked.run(["merge", folder, "--quiet"], str(tmp_path)).returncode == 0
    assert outputs(folder, OUTPUTS) == {**outputs(reference["attacks"][0], ATTACKS_OUT),
                                        **outputs(reference["autoattack"][0], AUTOATTACK_OUT)}


def test_merge_killed_and_rerun_gives_the_single_process_rows(reference, sharded, tmp_path):
    folder, timed = str(tmp_path / "merged"), str(tmp_path / "timed")
    for copy in (folder, timed):
        shutil.copytree(sharded, copy)
    seconds = forked.run(["merge", timed, "--quiet"], str(tmp_path)).seconds
    written = Rewrites(folder, "*.*")  # the results files, one after the other: attacks_<defense>.json and .npz, ...
    kill_and_resume("merge", ["merge", folder, "--quiet"], str(tmp_path), written, Units(timed, "*.*").done(),
                    seconds, ["first", "random", "random", "delay"], random.Random(SEED + 4))
    assert outputs(folder, OUTPUTS) == {**outputs(reference["attacks"][0], ATTACKS_OUT),
                                        **outputs(reference["autoattack"][0], AUTOATTACK_OUT)}


def test_train_prior_killed_and_resumed_gives_the_uninterrupted_weights(reference, tmp_path):
    prior, seconds = reference["train-prior"]
    out = str(tmp_path / "prior.safetensors")
    units = Checkpoints(out + ".ckpt.pt", every=4)
    kill_and_resume("train-prior", [*TRAIN, "--out", out], str(tmp_path), units, 40 // 4, seconds,
                    ["first", "random", "random", "delay"], random.Random(SEED + 5))
    expected, resumed = load_file(prior), load_file(out)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key
    cards = [json.load(open(os.path.splitext(p)[0] + ".json")) for p in (prior, out)]
    assert cards[0]["metrics"] == cards[1]["metrics"] and cards[0]["steps"] == cards[1]["steps"] == 40
    assert cards[1]["training_segments"] >= 2  # a segment counts once it saved a checkpoint


def test_at_least_twenty_kill_points_hit_a_running_command():
    if len(KILLS) < 7:
        pytest.skip("counts the kill points of the whole module's run")
    assert sum(map(len, KILLS.values())) >= 20, KILLS


# ---------------------------------------------------------------------------------------------------------------------
# States refused by name, never reused

def truncate(path: str) -> None:
    """Cut a file to half its size, as a crash outside the atomic writes (a copy, a full disk elsewhere) leaves it."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def refused(argv: list[str], cwd: str, *fragments: str) -> str:
    """Run a command that must refuse its state: status 1 and one error line holding every fragment."""
    line = forked.error_line(forked.run(argv, cwd), argv)
    assert line.startswith(f"python -m benchmarks {argv[0]}: error: "), line
    assert all(fragment in line for fragment in fragments), (fragments, line)
    return line


STATE_FILES = {  # a finished run's state file, cut in half: what the run again must say
    "attacks": ("attacks_state/tiny_make_toy/BlindPGD/b000002-000004.npz", "cannot read the batch state"),
    "attacks run.json": ("attacks_state/none/run.json", "is not readable JSON"),
    "autoattack": ("checkpoints/autoattack_make_toy/standard_00001.pt", "cannot read the batch checkpoint"),
    "autoattack run.json": ("checkpoints/autoattack_make_toy/run.json", "is not readable JSON"),
    "robustbench": ("checkpoints/robustbench_toy/rand_00000.pt", "cannot read the batch checkpoint"),
}
ARGV = {"attacks": ATTACKS, "autoattack": AUTOATTACK, "robustbench": ROBUSTBENCH}


@pytest.mark.parametrize("case", STATE_FILES)
def test_a_truncated_state_file_is_refused_naming_it(case, reference, tmp_path):
    command = case.split()[0]
    folder = str(tmp_path / "out")
    shutil.copytree(reference[command][0], folder)
    relative, fragment = STATE_FILES[case]
    path = os.path.join(folder, relative)
    truncate(path)
    size = os.path.getsize(path)
    refused([*ARGV[command], "--out", folder], str(tmp_path), fragment, path, "truncated or corrupt")
    assert os.path.getsize(path) == size  # left for the user to look at, not replaced behind their back


def test_a_truncated_training_checkpoint_is_refused_naming_it(reference, tmp_path):
    out = str(tmp_path / "prior.safetensors")
    shutil.copy(reference["train-prior"][0] + ".ckpt.pt", out + ".ckpt.pt")
    truncate(out + ".ckpt.pt")
    refused([*TRAIN, "--out", out], str(tmp_path), f"cannot read the prior checkpoint {out}.ckpt.pt",
            "truncated or corrupt")


@pytest.mark.parametrize("command, other, differs", [
    ("attacks", ["--seed", "1"], "settings.seed"),
    ("attacks", ["--eps", "0.2"], "configs.PGD"),
    ("autoattack", ["--eps", "0.2"], "['config.eps']"),
    ("robustbench", ["--n-iter", "3"], "['config.n_iter']"),
    ("train-prior", ["--base-channels", "16"], "base_channels: 8 there, 16 now"),
])
def test_a_state_of_other_settings_is_refused_naming_the_difference(command, other, differs, reference, tmp_path):
    if command == "train-prior":
        out = str(tmp_path / "prior.safetensors")
        shutil.copy(reference[command][0] + ".ckpt.pt", out + ".ckpt.pt")
        refused([*TRAIN, *other, "--out", out], str(tmp_path), f"{out}.ckpt.pt", "other settings", differs)
        return
    folder = str(tmp_path / "out")
    shutil.copytree(reference[command][0], folder)
    refused([*ARGV[command], *other, "--out", folder], str(tmp_path), "run.json", differs)


def save_tiny_prior(path: str, seed: int) -> None:
    from purifiers.priors.loading import save_builtin_prior

    save_builtin_prior(tiny_prior(torch.float32, seed=seed), path)


def test_a_state_of_another_prior_is_refused_naming_its_digest(reference, tmp_path):
    """The attacks runner's state names a digest of the weights it ran with; AutoAttack's names the prior file's
    SHA-256, so another file at the same path is caught too."""
    prior = str(tmp_path / "prior.safetensors")
    save_tiny_prior(prior, seed=1)
    folder = str(tmp_path / "attacks")
    shutil.copytree(reference["attacks"][0], folder)
    harness = os.path.join(folder, "attacks_state", "tiny_make_toy", "harness.json")
    before = open(harness).read()
    refused([*ATTACKS[:ATTACKS.index("--prior")], "--prior", prior, *ATTACKS[ATTACKS.index("--prior") + 2:], "--out",
             folder], str(tmp_path), "attacks_state/tiny_make_toy/run.json", "clean.model.sha256")
    assert open(harness).read() == before  # the finished run's labels (its prior) stay as they were
    folder = str(tmp_path / "autoattack")
    argv = [*AUTOATTACK[:AUTOATTACK.index("--prior")], "--prior", prior,
            *AUTOATTACK[AUTOATTACK.index("--prior") + 2:], "--out", folder]
    units = Units(folder, "checkpoints/*/*_0*.pt").counter()
    assert forked.run(argv, str(tmp_path), trigger=lambda: units() >= 1).killed
    save_tiny_prior(prior, seed=2)  # other weights at the same path
    refused(argv, str(tmp_path), "checkpoints/autoattack_make_toy/run.json", "['defense.prior_sha256']")


def test_a_shard_harness_cut_short_or_of_other_settings_is_refused(sharded, tmp_path):
    folder = str(tmp_path / "out")
    shutil.copytree(sharded, folder)
    refused([*AUTOATTACK, "--seed", "1", "--out", folder, "--shard", "1/2"], str(tmp_path), "['config.seed']")
    harness = os.path.join(folder, "checkpoints", "autoattack_make_toy", "harness_autoattack.json")
    truncate(harness)
    refused(["merge", folder, "--quiet"], str(tmp_path), harness, "is not readable JSON")
    refused([*AUTOATTACK, "--out", folder, "--shard", "1/2"], str(tmp_path), harness, "is not readable JSON")


# ---------------------------------------------------------------------------------------------------------------------
# A full disk

@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of that size under ``tmp_path`` (mounting needs root: skipped without it)."""
    mounted = []

    def mount(size: str) -> str:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
        except FileNotFoundError as err:
            pytest.skip(f"no mount command to make a small disk: {err}")
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root, CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(str(folder))
        return str(folder)

    yield mount
    for folder in mounted:
        subprocess.run(["umount", folder], check=True)


def test_a_full_disk_fails_a_write_by_name_and_keeps_the_previous_file(small_disk):
    from benchmarks.results import write_json

    disk = small_disk("64k")
    path = os.path.join(disk, "results.json")
    write_json(path, {"rows": []})
    too_big = {"json": lambda f: json.dump(list(range(50_000)), f), "numpy": lambda f: np.savez(f, x=np.zeros(50_000)),
               "torch": lambda f: torch.save(torch.zeros(50_000), f)}
    for name, write in too_big.items():
        with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device") as caught:
            atomic_write(path, write, mode="w" if name == "json" else "wb")
        assert caught.value.errno == 28 and isinstance(caught.value, OSError), name  # ENOSPC
        assert json.load(open(path)) == {"rows": []} and os.listdir(disk) == ["results.json"], name


def test_train_prior_on_a_full_disk_stops_by_name_and_resumes_to_the_same_weights(reference, small_disk, tmp_path):
    """Room for one checkpoint, not for the next beside it (an atomic write holds both until the rename): the run
    stops with the disk's error naming the file, the checkpoint before stays readable, and a run resumed from it on
    another disk reaches the uninterrupted weights."""
    size = os.path.getsize(reference["train-prior"][0] + ".ckpt.pt")
    disk = small_disk(f"{size * 3 // 2 // 1024}k")
    out, checkpoint = str(tmp_path / "prior.safetensors"), os.path.join(disk, "prior.ckpt.pt")
    refused([*TRAIN, "--out", out, "--checkpoint", checkpoint], str(tmp_path), f"cannot write {checkpoint}",
            "No space left on device", "the previous file, if any, is unchanged")
    assert torch.load(checkpoint, weights_only=True)["step"] == 4 and os.listdir(disk) == ["prior.ckpt.pt"]
    shutil.copy(checkpoint, out + ".ckpt.pt")
    assert forked.run([*TRAIN, "--out", out], str(tmp_path)).returncode == 0
    expected, resumed = load_file(reference["train-prior"][0]), load_file(out)
    assert all(torch.equal(tensor, resumed[key]) for key, tensor in expected.items())
