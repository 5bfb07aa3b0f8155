"""What every stage shares, and nothing else: the user-error type, the cache folder, and the versions a result was
measured with. (Output folders have their own leaf, `outputs.py`.)

A leaf module: it imports nothing from ecomla, so any module may import it.

    raise UserError("--kv-rank must be >= 1")          # the CLI prints this one line and exits 2
    cache_dir() / "calibration"                         # $ECOMLA_CACHE, default ~/.cache/ecomla
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message alone, without a traceback. Anything else that
    escapes a stage is a bug and keeps its traceback."""


def fast_bf16(device: str | None = None) -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with bf16 units (AVX512-BF16 or AMX).
    Without them CPU autocast emulates bf16, which trains slower than fp32."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where bf16 is fast (`fast_bf16`), else 'fp32'; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16() else "fp32"


def cache_dir() -> Path:
    """Where fetched assets and reusable intermediate results live: $ECOMLA_CACHE, default ~/.cache/ecomla."""
    root = Path(os.environ.get("ECOMLA_CACHE", Path.home() / ".cache" / "ecomla")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def versions(*packages: str) -> dict:
    """Python, machine, torch's thread count and each package's installed version (None when it is missing)."""
    out = {"python": platform.python_version(), "machine": platform.machine(), "threads": torch.get_num_threads()}
    for pkg in packages:
        try:
            out[pkg.replace("-", "_")] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out
