"""Files written whole or not at all, for every result, cache and checkpoint this project writes, and the errors of
the saved states a run resumes from."""

from __future__ import annotations

import io
import json
import os
from typing import IO, Callable


class StateError(ValueError):
    """A saved state that a run refuses to resume from (a run manifest, a per-batch result, a training checkpoint, a
    shard's harness): unreadable (truncated, corrupt) or written with other settings. The message names the file and
    what is wrong with it; nothing of such a state is reused."""


class WriteError(OSError):
    """A file that could not be written (a full disk, a missing permission); the file it was to replace, if any, is
    unchanged. ``errno`` is the system's."""


def atomic_write(path: str, write: Callable[[IO], object], mode: str = "wb") -> str:
    """``write(f)`` fills an in-memory buffer whose contents then go to a temporary file beside ``path``, which is
    renamed over it: a killed write never leaves a half file that a resumed run would trust, and a failed one raises
    :class:`WriteError` naming ``path`` and leaves the previous file as it was. The buffer keeps the two failures
    apart: an error of ``write`` is the writer's own, one of the file is the disk's (``torch.save`` straight into a
    full disk fails with an opaque "unexpected pos" RuntimeError). The temporary name carries the process id, since
    several processes (torchrun's ranks) may write the same file at once."""
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    write(buffer)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, mode) as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except OSError as err:
        error = WriteError(f"cannot write {path}: {err.strerror or err}; the previous file, if any, is unchanged.")
        error.errno = err.errno
        raise error from err
    finally:
        if os.path.exists(tmp):  # the write failed: the old file stays as it was
            os.remove(tmp)
    return path


def differing_keys(saved, now, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON values differ (``prefix`` itself where they are not both objects), to name what
    a refused state was written with."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return [] if saved == now else [prefix or "the value"]
    return [key for name in sorted(saved.keys() | now.keys())
            for key in differing_keys(saved.get(name), now.get(name), f"{prefix}.{name}" if prefix else name)]


def read_state_torch(path: str, what: str, remedy: str):
    """A torch state file of a run (weights only: tensors and plain values), or a :class:`StateError` naming it as
    ``what`` and saying ``remedy`` when it does not load (torch's errors for a damaged archive do not name the file)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise StateError(f"cannot read the {what} {path}: it is truncated or corrupt ({type(err).__name__}: "
                         f"{detail}); {remedy}") from err


def read_state_json(path: str):
    """A JSON state file of a run (its manifest, a shard's harness), or a :class:`StateError` naming it when it does not
    parse (a file truncated outside this package's atomic writes, or edited by hand)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not readable JSON ({err}): it is truncated or corrupt; delete it, or its run's "
                         "folder, to start that run over.") from err
