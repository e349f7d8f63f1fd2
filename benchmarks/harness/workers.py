"""Worker processes that never outlive the command that started them.

A command's worker processes (the quickstart's defenses, the memory probes' fresh processes) end with it: Ctrl-C
reaches the whole process group, and a worker also asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to be sent
SIGTERM when its parent dies, so a parent killed by a timeout or SIGKILL leaves no orphan holding gigabytes.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int) -> None:
    """Call first in a worker process: it is sent SIGTERM when ``parent_pid`` ends."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that end when this process ends, however it ends."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=end_with_parent,
                               initargs=(os.getpid(),))
