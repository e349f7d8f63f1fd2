"""``python -m benchmarks <command>`` in a forked child of the test process, which can be killed (SIGKILL) at a chosen
point.

A fresh interpreter spends about 5 s importing torch and ART before a command does anything (measured on the 2-core CI
machine), which would make each of the many short runs of the fault-injection and command-line tests cost that much.
A forked child inherits the imported package and runs ``benchmarks/__main__.py`` as ``python -m benchmarks`` does
(:func:`runpy.run_module` with ``sys.argv`` set), ending the way the interpreter ends: an uncaught exception prints its
traceback and exits 1, ``SystemExit`` exits with its code (a message is printed to stderr, status 1). :func:`python_m`
runs the real ``python -m benchmarks`` for the cases that must not rest on that emulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@dataclasses.dataclass
class Finished:
    returncode: int        # -9 when killed
    stdout: str
    stderr: str
    seconds: float         # from the fork to the exit or the kill
    killed: bool = False   # the trigger fired while the command still ran


def preload() -> None:
    """Import what the commands import, and read the bundled MNIST once (2 s on first use), before the first fork:
    every child then starts with them."""
    import importlib

    from benchmarks.__main__ import COMMANDS
    from benchmarks.data import load_mnist
    from benchmarks.harness.rb_compat import import_robustbench

    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    import_robustbench()
    load_mnist("test", n=1)


def _interpreter_exit(err: BaseException) -> int:
    """The status the interpreter ends with on ``err`` uncaught, printing what it prints."""
    if isinstance(err, SystemExit):
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        print(err.code, file=sys.stderr)
        return 1
    traceback.print_exception(err)
    return 1


def _settle_after_each_file(seconds: float) -> None:
    """Pause ``seconds`` after every file the command puts in place (each write ends in ``os.replace``), so the parent,
    polling, sees each unit land before the next one: a command that writes its last files in a burst (``merge``)
    is then still running when the trigger fires, even on a loaded machine. Only the timing changes."""
    replace = os.replace

    def replace_then_pause(*args, **kwargs):
        replace(*args, **kwargs)
        time.sleep(seconds)

    os.replace = replace_then_pause


def _child(argv: list[str], cwd: str, out: str, err: str, env: dict | None, settle: float = 0.0) -> None:
    os.setpgid(0, 0)  # its own process group: a kill reaches whatever the command starts
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    # The parent's OpenMP thread pool does not survive fork (GNU libgomp is not fork-safe): a child that enters a
    # parallel region with more than one thread can hang. One thread runs torch's kernels without the pool.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    if settle:
        _settle_after_each_file(settle)
    # pytest's capture replaced sys.stdout and sys.stderr by its own files: write to the descriptors again
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
    sys.modules.pop("benchmarks.__main__", None)  # run afresh as __main__, as `python -m` does
    code = 1
    try:
        os.chdir(cwd)
        os.environ.update(env or {})
        sys.argv = [os.path.join(ROOT, "benchmarks", "__main__.py"), *argv]
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
        code = 0
    except BaseException as caught:  # noqa: B036 - the interpreter's own handling, emulated
        code = _interpreter_exit(caught)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def run(argv: list[str], cwd: str, trigger=None, poll: float = 0.002, timeout: float = 300.0,
        env: dict | None = None) -> Finished:
    """Run ``python -m benchmarks *argv`` in a forked child (in folder ``cwd``); kill its process group with SIGKILL as
    soon as ``trigger()`` returns True while it runs (checked every ``poll`` seconds; a child that is to be killed
    pauses 50 ms after each file it writes, :func:`_settle_after_each_file`)."""
    with tempfile.TemporaryDirectory() as capture:  # not in cwd: a command's folder holds only what it writes
        return _run(argv, cwd, trigger, poll, timeout, env, os.path.join(capture, "stdout"),
                    os.path.join(capture, "stderr"))


def _run(argv, cwd, trigger, poll, timeout, env, out, err) -> Finished:
    sys.stdout.flush()
    sys.stderr.flush()
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(argv, cwd, out, err, env, settle=0.05 if trigger is not None else 0.0)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # it may have ended (or set it) already
        os.setpgid(pid, pid)  # also here: the group must exist before the first kill, whichever process runs first
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif trigger is not None and trigger():
            with contextlib.suppress(ProcessLookupError):  # it may have ended between the poll and the kill
                os.killpg(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        elif time.monotonic() - began > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"python -m benchmarks {' '.join(argv)} ran past {timeout} s")
        else:
            time.sleep(poll)
    seconds = time.monotonic() - began
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # a child killed at once may not have opened its capture files yet: it printed nothing
    printed = [_read_text(path) for path in (out, err)]
    return Finished(os.waitstatus_to_exitcode(status), *printed, seconds, killed)


def python_m(argv: list[str], cwd: str, timeout: float = 120.0) -> Finished:
    """The real ``python -m benchmarks *argv`` in a fresh interpreter (tests/ on the path for the toy defense)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "benchmarks", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr, time.monotonic() - began)


def error_line(run: Finished, argv: list[str]) -> str:
    """The one ``error:`` line of a refused command (status 1 or 2, no traceback), checked and returned."""
    assert run.returncode in (1, 2), (argv, run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, (argv, run.stderr[-3000:])
    errors = [line for line in run.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, (argv, run.stderr[-3000:])
    return errors[0]
