"""Peak memory of one exact-gradient call, measured in a fresh process.

:func:`exact_gradient_peak_memory` spawns a child process that builds a purifier and a batch with a user's factory, runs
one no-gradient warm-up purification, then one forward and backward pass through the purifier's gradient mode (or
through an attack's loss, e.g. DiffAttack's, when the factory returns that gradient), and reports the peak resident set
size reached minus the resident size just before that pass. The peak is the kernel's high-water mark ``VmHWM``, reset to
the current size before the pass (``/proc/self/clear_refs``), so the warm-up's or the imports' peak does not mask the
pass's. In the child, glibc serves allocations of 8 KiB and more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=8192``,
:data:`MMAP_THRESHOLD`), so freed tensors leave the resident size at once and the peak follows the peak of live tensors
rather than the allocator's free lists. Why 8 KiB: an MNIST state of 8 or 16 images (25 or 50 KiB) is below the 64 KiB
used before, so each solver step's stored state came from the heap, whose fragmentation set the peak as much as the live
tensors did (DiffAttack's gradient at 4T against T: 1.23-1.28x with 64 KiB, 1.17x with 8 KiB, the exact gradient alone
1.16x).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable

#: glibc's ``M_MMAP_THRESHOLD`` in the measuring child (bytes): allocations of this size and more are ``mmap``-ed.
MMAP_THRESHOLD = 8192


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the high-water mark to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _measure(factory: Callable, args: tuple, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    purifier, x, *gradient = factory(*args)
    gradient = gradient[0] if gradient else partial(_purification_gradient, purifier)
    with torch.no_grad():
        purifier.purify(x, with_gradient=False)
    prior = purifier.algorithm.prior
    prior.nfe.reset()
    _reset_peak()
    before, peak_before = _current_rss(), _peak_rss()
    start = time.perf_counter()
    grad = gradient(x)
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return {"rss_before": before, "peak_rss": peak, "peak_rss_before_run": peak_before,
            "peak_above_before": peak - before, "raised_peak": peak > peak_before, "seconds": seconds,
            "rows": int(x.shape[0]), "prior_forward": prior.nfe.forward, "prior_backward": prior.nfe.backward,
            "grad_finite": bool(torch.isfinite(grad).all())}


def _purification_gradient(purifier, x):
    import torch

    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(purifier.purify(x, with_gradient=True).sum(), x)
    return grad


def exact_gradient_peak_memory(factory: Callable, *args, threads: int = 1) -> dict:
    """Measure one gradient call of ``purifier.purify(x, with_gradient=True)`` in a fresh (spawned) process.

    :param factory: a picklable (module-level) callable ``factory(*args) -> (purifier, x)``: a
        :class:`purifiers.PurifierPyTorch` set to the gradient mode to measure and an NCHW batch in [0, 1]; or
        ``(purifier, x, gradient)`` with ``gradient(x) -> Tensor`` the input gradient to measure instead of that of
        ``purify(x).sum()`` (an attack's loss gradient through the purifier).
    :returns: ``peak_above_before`` (bytes: peak RSS during the call minus the RSS just before it), ``raised_peak``
        (False when the warm-up had already reached a higher peak, so the figure is only an upper bound),
        ``seconds``, the prior's forward and backward evaluations (``prior_forward``, ``prior_backward``, images),
        and the raw RSS figures.
    """
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the child's allocator at start
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_measure, factory, args, threads).result()
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
