"""Plot helpers every report uses (eval, bench, demo, benchmarks/): pyplot on the file-only Agg backend, and save."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on these machines); imported on first use
    because matplotlib adds about a second to every command's start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return True
