"""The package layout's import rules: the library (``purifiers``, ``attacks_adaptive``) never imports the harness
(``benchmarks``), and no module imports another that imports it back (read from the source, every import counted,
also those inside functions)."""

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


def test_no_two_modules_import_each_other():
    graph = _graph()
    mutual = sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, ()))
    # a package's __init__ re-exporting its modules is not a circle of the code
    mutual = [(a, b) for a, b in mutual if not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert mutual == []
