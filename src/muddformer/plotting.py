"""Matplotlib for files only: the headless backend and atomic PNG writes shared by every plot."""

from __future__ import annotations

from pathlib import Path

from muddformer._utils import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, never a window), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    """Write the figure as a PNG atomically and free it."""
    with atomic_path(str(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
