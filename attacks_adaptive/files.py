"""Files written whole or not at all, for every result, cache and checkpoint this project writes."""

from __future__ import annotations

import os
from typing import IO, Callable


def atomic_write(path: str, write: Callable[[IO], object], mode: str = "wb") -> str:
    """``write(f)`` fills a temporary file beside ``path``, which is then renamed over it: a killed write never leaves a
    half file that a resumed run would trust. The temporary name carries the process id, since several processes
    (torchrun's ranks) may write the same file at once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: the old file stays as it was
            os.remove(tmp)
    return path
