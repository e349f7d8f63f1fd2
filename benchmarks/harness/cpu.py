"""How a benchmark command sets up its process on a CPU: torch's thread count, and glibc's allocator.

glibc's ``malloc`` hands large freed blocks back to the kernel: blocks above its mmap threshold are unmapped when
freed, and the top of the heap is trimmed above its trim threshold. A purifier frees and reallocates the same
activation buffers at every network call (tens of MB for a batch of 250 MNIST images), so each call faults its pages
in again and the kernel zeroes them. Measured here (ADP, T = 20, one run over 50 MNIST test digits, batch 250, 1
thread, otherwise idle 2-core CPU): 5.2-5.5 s wall of which 0.8-1.3 s system time and 0.6-0.9 M minor page faults,
against 3.7-4.0 s, no system time and ~10 k faults with freed blocks kept (:func:`keep_freed_memory`). Beside a second
such job the system time grew to 40% of the run. Results are unchanged: only where memory comes from changes.

Not for memory measurements (:mod:`benchmarks.harness.profiling` measures in fresh processes with the opposite setting, so
that resident memory tracks live memory); the peak resident memory of a process that keeps freed blocks is still its
true peak.
"""

from __future__ import annotations

import ctypes
import sys

import torch

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Freed blocks up to this size stay in the process for reuse.
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed blocks of up to :data:`KEEP_FREED_BYTES` for reuse; ``True`` if it
    accepted. Elsewhere (another C library or OS) nothing changes and this returns ``False``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def set_up_cpu_process(threads: int | None) -> None:
    """Start of a benchmark command or worker: ``threads`` torch intra-op threads (``None`` or 0: torch's default)
    and :func:`keep_freed_memory`."""
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
