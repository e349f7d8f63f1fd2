"""Figures with matplotlib's Agg backend (no display needed), for every command and study that draws one."""

from __future__ import annotations

import os

#: Where the commands put their figures by default (the docs show them).
FIGURES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "figures")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Write ``fig`` to ``path`` (PNG at 120 dpi, folders made), close it and return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path
