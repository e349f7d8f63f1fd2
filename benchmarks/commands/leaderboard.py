"""``python -m benchmarks leaderboard``: a folder of RobustBench model_info JSONs as markdown and HTML tables.

Entries are grouped by ``<dataset>/<threat_model>`` (the folder layout RobustBench and ``python -m benchmarks
robustbench`` write) and sorted as RobustBench's ``leaderboard/template.py`` sorts them (``ACC_FIELDS`` of Linf/L2 is
``("external", "autoattack_acc")``: ``external`` when the entry has it, else ``autoattack_acc``, descending). The
columns follow RobustBench's site: "Best known robust accuracy" shows ``external`` or ``autoattack_acc``; "AA eval.
potentially unreliable" shows ☑ / × / Unknown. robustbench 1.1.1's wheel lacks the jinja template its renderer needs,
so the tables are rendered here; footnotes are escaped, not trusted HTML.
"""

from __future__ import annotations

import argparse
import html
import json
import os

from benchmarks.harness.arguments import existing_path

SORT_FIELDS = ("external", "autoattack_acc")
COLUMNS = ("Rank", "Method", "Standard accuracy", "AutoAttack robust accuracy", "Best known robust accuracy",
           "AA eval. potentially unreliable", "Forward passes", "Extra data", "Architecture", "Venue")


def sort_key(entry: dict) -> float:
    """RobustBench's ordering key: the first of ``external``, ``autoattack_acc`` the entry has."""
    for name in SORT_FIELDS:
        if entry.get(name) is not None:
            return float(entry[name])
    raise ValueError(f"model_info entry {entry.get('name')!r} has neither 'external' nor 'autoattack_acc'.")


def load_entries(folder: str) -> dict[tuple[str, str], list[dict]]:
    """``{(dataset, threat_model): [entry, ...]}`` for every ``*.json`` below ``folder``, each list sorted."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for root, _, files in os.walk(folder):
        for file in sorted(files):
            if not file.endswith(".json"):
                continue
            with open(os.path.join(root, file)) as f:
                entry = json.load(f)
            if not isinstance(entry, dict) or "clean_acc" not in entry:
                continue  # not a model_info file (e.g. a checkpoint's run.json)
            entry.setdefault("_file", os.path.splitext(file)[0])
            dataset = entry.get("dataset") or os.path.basename(os.path.dirname(root))
            groups.setdefault((dataset, os.path.basename(root)), []).append(entry)
    if not groups:
        raise ValueError(f"no model_info JSON files below {folder}.")
    for entries in groups.values():
        entries.sort(key=sort_key, reverse=True)
    return groups


def _unreliable(entry: dict) -> str:
    if "unreliable" not in entry:
        return "Unknown"
    return "☑" if entry["unreliable"] else "×"


def _cells(rank: int, entry: dict) -> list[str]:
    best = entry.get("external") if entry.get("external") is not None else entry.get("autoattack_acc")
    return [str(rank), entry.get("name") or entry["_file"], _pct(entry.get("clean_acc")),
            _pct(entry.get("autoattack_acc")), _pct(best), _unreliable(entry),
            str(entry.get("number_forward_passes", "-")), "☑" if entry.get("additional_data") else "×",
            entry.get("architecture") or "-", entry.get("venue") or "-"]


def _pct(value) -> str:
    return "-" if value is None else f"{value}%"


def render_markdown(groups: dict) -> str:
    lines = []
    for (dataset, threat_model), entries in sorted(groups.items()):
        lines += [f"## {dataset}, {threat_model}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        notes = []
        for rank, entry in enumerate(entries, 1):
            cells = _cells(rank, entry)
            if entry.get("link"):
                cells[1] = f"[{cells[1]}]({entry['link']})"
            if entry.get("footnote"):
                notes.append(f"{rank}. {entry['footnote']}")
                cells[1] += f" ({rank})"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += [""] + (["Notes:", ""] + notes + [""] if notes else [])
    return "\n".join(lines)


def render_html(groups: dict) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>Leaderboard</title>",
             "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
             ".note{font-size:smaller;color:#555}</style></head><body>"]
    for (dataset, threat_model), entries in sorted(groups.items()):
        parts.append(f"<h2>{html.escape(dataset)}, {html.escape(threat_model)}</h2>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
        for rank, entry in enumerate(entries, 1):
            cells = [html.escape(c) for c in _cells(rank, entry)]
            if entry.get("link"):
                cells[1] = f"<a href=\"{html.escape(entry['link'], quote=True)}\">{cells[1]}</a>"
            if entry.get("footnote"):
                cells[1] += f"<br><span class=\"note\">{html.escape(entry['footnote'])}</span>"
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_leaderboard(folder: str, out: str) -> tuple[str, str]:
    """Render ``folder``'s model_info JSONs to ``<out>/leaderboard.md`` and ``<out>/leaderboard.html``."""
    groups = load_entries(folder)
    os.makedirs(out, exist_ok=True)
    paths = os.path.join(out, "leaderboard.md"), os.path.join(out, "leaderboard.html")
    for path, text in zip(paths, (render_markdown(groups), render_html(groups))):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return paths


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="model_info", type=existing_path,
                        help="model_info folder (searched recursively)")
    parser.add_argument("--out", default="results", help="where leaderboard.md and leaderboard.html go")
    args = parser.parse_args(argv[1:])
    md_path, html_path = write_leaderboard(args.folder, args.out)
    with open(md_path, encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {md_path} and {html_path}")
