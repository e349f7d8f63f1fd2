"""The documentation builds without a warning (Sphinx -W: a broken reference, page or docstring fails the build), and
the README keeps its shape: at most 200 lines, none over 120 characters but the marked main command, links into the
docs that exist, and every command of ``python -m benchmarks --help`` documented."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install -e '.[test]' installs it)")
    pytest.importorskip("myst_parser", reason="myst-parser is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", DOCS,
                           str(tmp_path / "html")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "html" / "index.html").exists()


def test_readme_shape():
    text = _readme()
    lines = text.splitlines()
    assert len(lines) <= 200
    main = re.search(r"<!-- main-command -->\n```\n(.*?)\n```\n<!-- /main-command -->", text, re.S)
    test = re.search(r"<!-- test-command -->\n```\n(.*?)\n```\n<!-- /test-command -->", text, re.S)
    assert main and test, "README.md lost a marked command block"
    long_lines = [line for line in lines if len(line) > 120 and line != main.group(1)]
    assert long_lines == []


def test_readme_and_docs_links_point_inside_the_repository():
    texts = {"README.md": _readme()}
    for name in os.listdir(DOCS):
        if name.endswith(".md"):
            with open(os.path.join(DOCS, name), encoding="utf-8") as f:
                texts[f"docs/{name}"] = f.read()
    for name, text in texts.items():
        base = os.path.dirname(os.path.join(ROOT, name))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = os.path.normpath(os.path.join(base, target.split("#")[0]))
            assert path.startswith(ROOT + os.sep), f"{name} links outside the repository: {target}"
            assert os.path.exists(path), f"{name} links to a missing file: {target}"
        assert not re.search(r"python -m benchmarks\.[a-z]", text), f"{name} names a module instead of a command"


def test_every_command_is_documented():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout.split("commands:\n", 1)[1].split("\n\n", 1)[0]  # the command table, up to a blank line
    commands = re.findall(r"^  (\S+)\s", listing, re.M)
    assert "quickstart" in commands
    with open(os.path.join(DOCS, "commands.md"), encoding="utf-8") as f:
        documented = f.read()
    assert [c for c in commands if f"`{c}`" not in documented] == []


def test_the_timed_smoke_commands_are_the_docs_smoke_lines():
    """`python -m benchmarks smoke-times` times what the docs call a smoke test: every code line ending in
    ``# smoke``, no more and no fewer."""
    from benchmarks.commands.smoke_times import SMOKE_COMMANDS

    shown = set()
    for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        with open(path) as f:
            shown |= {line.split("#")[0].strip() for line in f if line.rstrip().endswith("# smoke")}
    assert shown == set(SMOKE_COMMANDS)
