"""The one shape of every results file of this package.

``{"rows": [row, ...], "meta": {...}}`` where each row is
``{defense, attack, gradient, scoring, eps, norm, n, seed, clean_acc, robust_acc, nfe_per_image, seconds}``
(accuracies as fractions in [0, 1], ``None`` where not applicable) and may carry more keys (e.g. ``eot``, ``iterations``,
``note``); ``meta`` holds versions, device, command line, dataset and split.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

from attacks_adaptive.files import atomic_write
from attacks_adaptive.rows import ROW_FIELDS, make_row

__all__ = ["ROW_FIELDS", "make_row", "collect_meta", "command_as_typed", "portable_path", "prior_fields", "file_sha256",
           "write_json", "write_results", "write_worst_case", "read_results", "format_table"]

def collect_meta(dataset: str, split: str, **extra) -> dict:
    """Versions, device, command line, dataset and split, plus ``extra``. A ``prior`` given as a path is named by
    :func:`prior_fields`: once a shipped prior is replaced, its path no longer says which weights made a result, and a
    resumed study must not mix two priors' rows."""
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    # Installed versions from the package metadata: importing diffusers just for its version costs seconds.
    for name, dist in (("art", "adversarial-robustness-toolbox"), ("pyautoattack", "pyautoattack"),
                       ("torchattacks", "torchattacks"), ("diffusers", "diffusers")):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    meta = {"versions": versions, "device": device, "command": command_as_typed(),
            "dataset": dataset, "split": split, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta.update(extra)
    if isinstance(meta.get("prior"), str):
        meta.update(prior_fields(meta["prior"]))
    return meta


def prior_fields(path: str) -> dict:
    """How results name a prior: ``prior``, its :func:`portable_path`, and for a file ``prior_sha256``, the SHA-256 of
    its bytes."""
    found = _in_repository(path)
    return {"prior": portable_path(path), **({"prior_sha256": file_sha256(found)} if os.path.isfile(found) else {})}


def command_as_typed() -> str:
    """The command line as a user types it: ``python -m benchmarks quickstart --out results`` rather than the path of
    the module file that Python ran (which names this machine's folders)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        program = "python -m " + spec.name.removesuffix(".__main__")
    else:
        program = "python " + os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([program, *sys.argv[1:]])


def portable_path(path: str | None) -> str | None:
    """A file of this package as its path inside the repository (``benchmarks/models/mnist_prior.safetensors``); any
    other path as given."""
    if path is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, root) if absolute.startswith(root + os.sep) else path


def _in_repository(path: str) -> str:
    """``path`` as given, or, where only the repository holds it (a :func:`portable_path`), inside the repository."""
    inside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    return path if os.path.exists(path) or os.path.isabs(path) or not os.path.exists(inside) else inside


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str, data) -> str:
    """Write JSON atomically: to a temporary file, then renamed, so a killed write never leaves a half file that a
    resumed run would trust."""
    return atomic_write(path, lambda f: json.dump(data, f, indent=2), mode="w")


def write_results(path: str, rows: list[dict], meta: dict) -> str:
    """Write ``{"rows": rows, "meta": meta}`` atomically (a crash never leaves a half-written file)."""
    missing = [key for row in rows for key in ROW_FIELDS if key not in row]
    if missing:
        raise ValueError(f"results rows lack fields {sorted(set(missing))}; build rows with make_row().")
    return write_json(path, {"rows": rows, "meta": meta})


def write_worst_case(report: dict, out: str, meta: dict) -> str:
    """Write a worst-case run (:func:`attacks_adaptive.run_worst_case`): its rows and ``meta`` to ``out`` and the
    strongest adversarial example per input to ``<out without .json>_worst_adv.npz``, both atomically."""
    write_results(out, report["rows"], meta)
    npz = os.path.splitext(out)[0] + "_worst_adv.npz"
    atomic_write(npz, lambda f: np.savez(f, x_adv=report["x_worst"], attack_index=report["worst_attack"],
                                         attack_names=np.array(report["attack_names"])))
    return out


def read_results(path: str) -> dict:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a results file: it is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("meta"), dict):
        raise ValueError(f"{path} is not a results file (needs a 'rows' list and a 'meta' object).")
    return data


def format_table(rows: list[dict]) -> str:
    """A markdown table of rows (accuracies in %)."""
    head = "| defense | attack | gradient | scoring | eps | n | clean % | robust % | NFE/img | s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        nfe = r.get("nfe_per_image")
        nfe = "-" if nfe is None else (f"{nfe:.0f}" if isinstance(nfe, (int, float)) else
                                       "/".join(f"{v:.0f}" for v in nfe.values()))
        lines.append(f"| {r['defense']} | {r['attack']} | {r['gradient'] or '-'} | {r['scoring'] or '-'} | "
                     f"{'-' if r['eps'] is None else r['eps']} | {r['n']} | {pct(r['clean_acc'])} | "
                     f"{pct(r['robust_acc'])} | {nfe} | {'-' if r['seconds'] is None else round(r['seconds'], 1)} |")
    return "\n".join(lines)
