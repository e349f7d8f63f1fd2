"""One evaluation split over processes, GPUs and machines: every command that attacks images (``attacks``,
``autoattack``, ``robustbench``, ``reproduce``) runs the batches of one shard and writes their per-batch state beside
the others'.

* ``torchrun --nproc-per-node K -m benchmarks <command> ...``: rank ``r`` of ``K`` runs the batches ``b`` with
  ``b % K == r`` (process group NCCL on GPUs, gloo on CPU; each rank on its own GPU), then rank 0 gathers every batch
  from the shared output folder into the same results a single process writes.
* ``--shard i/N`` (a scheduler without torchrun, e.g. a SLURM job array): the same split, one shard per job;
  ``python -m benchmarks merge DIR`` joins the finished shards (and refuses shards written with other settings).

A batch's random draws come from the seed and the batch's place in the data, never from the rank or the number of
shards, so the rows do not depend on how the work was split. The output folder must be shared by all shards.

Beside its per-batch state, a run of ``autoattack``, ``robustbench`` or ``reproduce`` keeps a harness,
``<out>/checkpoints/<run>/harness_<command>.json``: whatever else its results files need (names, paper, protocol), so
that ``merge`` writes them from the folder alone, exactly as the single process does.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from attacks_adaptive.files import StateError, read_state_json
from benchmarks.results import write_json


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    distributed: bool = False  # started by torchrun: gather on rank 0 once every rank is done

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"a shard is i/N with 0 <= i < N, got {self.index}/{self.count}.")

    @property
    def pair(self) -> tuple[int, int]:
        return self.index, self.count

    def owns(self, batch: int) -> bool:
        return batch % self.count == self.index

    @property
    def gathers(self) -> bool:
        """Whether this process writes the joined results (torchrun's rank 0)."""
        return self.distributed and self.index == 0


def parse_shard(text: str) -> Shard:
    index, sep, count = text.partition("/")
    try:
        return Shard(int(index), int(count))
    except ValueError as err:
        raise ValueError(f"--shard takes i/N (e.g. 0/4), got {text!r}: {err}") from None


def current_shard(shard_arg: str | None = None) -> Shard | None:
    """The shard of this process: torchrun's rank (starting the process group) or ``--shard i/N``; ``None`` for a
    single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if shard_arg is not None:
            raise ValueError("--shard and torchrun both split the work; use one of them.")
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        return Shard(dist.get_rank(), dist.get_world_size(), distributed=True)
    return parse_shard(shard_arg) if shard_arg else None


def wait_for_all(shard: Shard | None) -> None:
    """Under torchrun, wait until every rank has finished its batches."""
    if shard is not None and shard.distributed:
        import torch.distributed as dist

        dist.barrier()


def writes_results(shard: Shard | None, out_dir: str) -> bool:
    """Whether this process writes the results once its batches are done (a single process, or torchrun's rank 0
    after every rank finished); any other shard says how to join the shards instead."""
    wait_for_all(shard)
    if shard is None or shard.gathers:
        return True
    print(f"shard {shard.index}/{shard.count} done; when every shard is, join them: python -m benchmarks merge "
          f"{out_dir}")
    return False


def harness_path(folder: str, command: str) -> str:
    return os.path.join(folder, f"harness_{command}.json")


def save_harness(out_dir: str, folder: str, command: str, harness: dict, shard: Shard | None) -> dict:
    """Write ``harness`` into ``folder`` (a run's folder under ``out_dir/checkpoints/``) and return it as it reads back
    (what the results are written from, whoever writes them). A shard refuses a folder whose harness another shard
    wrote with other settings: joined, they would be neither run. A single process replaces it (a rerun may relabel
    finished batches, e.g. another paper link)."""
    if shard is not None and not shard.distributed and \
            os.path.dirname(os.path.abspath(folder)) != os.path.abspath(os.path.join(out_dir, "checkpoints")):
        raise ValueError(f"with --shard the run's state must lie in {os.path.join(out_dir, 'checkpoints')}, where "
                         f"`merge {out_dir}` looks for it, not in {folder}: leave --checkpoint-dir out.")
    harness = json.loads(json.dumps(harness))
    path = harness_path(folder, command)
    if shard is not None and os.path.exists(path):
        saved = read_state_json(path)
        if saved != harness:
            changed = sorted(k for k in saved.keys() | harness.keys() if saved.get(k) != harness.get(k))
            raise StateError(f"{path} holds the harness of `{command}` shards run with other settings (differs in "
                             f"{changed}); run every shard with the same settings, or use another --out folder.")
    write_json(path, harness)
    return harness


def saved_harnesses(out_dir: str, command: str) -> list[tuple[str, dict]]:
    """``(folder, harness)`` of every ``command`` run under ``out_dir/checkpoints/`` (what ``merge`` joins)."""
    root = os.path.join(out_dir, "checkpoints")
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = harness_path(os.path.join(root, name), command)
        if os.path.exists(path):
            found.append((os.path.join(root, name), read_state_json(path)))
    return found


def _shard_text(text: str) -> str:
    """``--shard``'s type: refuses what is not ``i/N`` while the options are parsed; the text itself is kept, for
    :func:`current_shard` (which also checks it against torchrun's split)."""
    try:
        parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_shard_argument(parser) -> None:
    parser.add_argument("--shard", type=_shard_text, default=None, metavar="I/N",
                        help="run only shard I of N (batches b with b %% N == I) into the shared --out folder; join "
                             "the finished shards with `python -m benchmarks merge OUT`. Under torchrun the rank and "
                             "world size split the work instead.")
