"""The package layout's import rules, read from the source (every import counted, also those inside functions):

* three floors: ``purifiers`` (the methods and priors) below ``attacks_adaptive`` below ``benchmarks`` (the harness);
  no floor imports one above it;
* no module imports another that imports it back;
* a command (``benchmarks.commands.<name>``) imports the harness, the studies and the registry, never another command,
  and nothing but the command line imports a command."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("purifiers", "attacks_adaptive", "benchmarks")


def _modules():
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    yield module, path


def _imports(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _graph():
    modules = dict(_modules())
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_the_library_never_imports_the_harness():
    offenders = {m: sorted(i for i in deps if i.startswith("benchmarks")) for m, deps in _graph().items()
                 if not m.startswith("benchmarks")}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_methods_never_import_the_attacks():
    offenders = {m: sorted(i for i in deps if i.startswith("attacks_adaptive")) for m, deps in _graph().items()
                 if m.startswith("purifiers")}
    assert {m: i for m, i in offenders.items() if i} == {}


def _command_of(name: str) -> str | None:
    """``benchmarks.commands.<x>`` for ``name`` or anything inside it, else None."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["benchmarks", "commands"] and len(parts) > 2 else None


def test_no_command_imports_another_command():
    offenders = {m: sorted(i for i in deps if _command_of(i) not in (None, _command_of(m)))
                 for m, deps in _graph().items() if _command_of(m)}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_only_the_command_line_reaches_the_commands():
    """The harness, the studies, the registry and the library never import a command module: what two commands share
    lives in ``benchmarks.harness`` (or ``benchmarks.studies``)."""
    offenders = {m: sorted(i for i in deps if _command_of(i)) for m, deps in _graph().items()
                 if not _command_of(m) and m != "benchmarks.commands"}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_rules_see_the_commands():
    """Guards the rules above against a moved folder: the command modules exist where they look for them."""
    commands = {m for m in _graph() if _command_of(m)}
    assert {"benchmarks.commands.attacks", "benchmarks.commands.autoattack", "benchmarks.commands.merge"} <= commands


def test_no_two_modules_import_each_other():
    graph = _graph()
    mutual = sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, ()))
    # a package's __init__ re-exporting its modules is not a circle of the code
    mutual = [(a, b) for a, b in mutual if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert mutual == []
