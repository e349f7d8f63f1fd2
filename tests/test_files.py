"""Atomic writes: a failed write leaves the previous file as it was and no temporary file behind."""

import os

import pytest

from attacks_adaptive.files import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "result.json")
    atomic_write(path, lambda f: f.write("old"), mode="w")

    def half_then_crash(f):
        f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, half_then_crash, mode="w")
    assert open(path).read() == "old" and os.listdir(tmp_path / "sub") == ["result.json"]
    atomic_write(path, lambda f: f.write("new"), mode="w")
    assert open(path).read() == "new"
