"""Do two checkouts of ecomla write the same outputs? Conversions byte for byte, distillation runs row for row.

    git worktree add /tmp/ecomla-before <rev>
    python tools/same_outputs.py --old /tmp/ecomla-before --new . --work /tmp/same-outputs

For a change meant to keep behaviour (a refactor). Conversions: every --init (fitted on small calibration sets) and
most flags on the default model, and tiny Qwen2 (biases), Mistral and Llama-3-scaled sources (tests/helpers.py),
all with flags both checkouts know (a flag removed by the change cannot be compared); each checkpoint's
model.safetensors and config.json are compared by sha256. Distillation: a tiny student and tiny chat data,
several settings, eager loss; metrics.jsonl rows (timing fields left out) and ecomla_train.json are compared.
Every run is `python -m ecomla ...` in a fresh process with that checkout first on PYTHONPATH; finished outputs
are reused when the script is run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import make_source  # noqa: E402
from tests.test_data_eval import chat_rows  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CALIB = "--calib-seqs 8 --calib-len 32"
FIT = "--calib-seqs 24 --calib-len 32"  # enough tokens for the tiny sources' o_proj refit (8 per input)
CONVERSIONS = {  # name: (source, flags)
    "xecomla": ("default", "--kv-rank 64 --rope-dim 32"),
    "random": ("default", "--kv-rank 64 --init random"),
    "whitened": ("default", "--kv-rank 64 --init whitened"),
    "rope-aware": ("default", "--kv-rank 64 --init rope-aware"),
    "rope-whitened": ("default", "--kv-rank 64 --init rope-whitened"),
    "fitted": ("default", "--kv-rank 64 --init fitted --calib-seqs 20"),
    "fitted-energy-up-alpha": ("default", "--rank-energy 0.9 --init fitted --attention-metric up --key-weight 2 "
                                          "--calib-seqs 4 --calib-len 64"),
    "xecomla-qnone-nope16": ("default", "--kv-rank 16 --q-rank none --nope-dim 16"),
    "whitened-layers": ("default", "--kv-rank 32 --layers every:3 --init whitened"),
    "xecomla-energy": ("default", "--rank-energy 0.9 --q-rank-energy 0.9"),
    "xecomla-sigma-norm-layers": ("default", "--kv-rank 32 --sigma down --latent-norm --layers every:2"),
    "rope-aware-magnitude-mean": ("default", "--kv-rank 32 --init rope-aware --rope-select magnitude "
                                             "--rope-key-fit mean"),
    "random-energy": ("default", "--rank-energy 0.8 --init random"),
    "rope-whitened-energy": ("default", "--rank-energy 0.8 --init rope-whitened"),
    "whitened-nope16": ("default", "--kv-rank 64 --nope-dim 16 --init whitened"),
    "xecomla-bf16": ("default", "--kv-rank 64 --dtype bfloat16"),
    "rope-whitened-qrank-high": ("default", "--kv-rank 48 --q-rank 200 --init rope-whitened --rope-select high"),
    "qwen2-xecomla": ("qwen2", "--kv-rank 8 --rope-dim 4"),
    "qwen2-whitened": ("qwen2", f"--kv-rank 8 --rope-dim 4 --init whitened {CALIB}"),
    "qwen2-rope-whitened": ("qwen2", f"--kv-rank 8 --rope-dim 4 --init rope-whitened {CALIB}"),
    "qwen2-rope-aware-qnone": ("qwen2", f"--kv-rank 6 --rope-dim 4 --init rope-aware --q-rank none {CALIB}"),
    "qwen2-fitted": ("qwen2", f"--kv-rank 8 --rope-dim 4 --init fitted {FIT}"),
    "llama3-yarn": ("llama3", "--kv-rank 8 --rope-dim 4 --mla-rope yarn"),
    "llama3-rope-aware": ("llama3", f"--kv-rank 8 --rope-dim 4 --init rope-aware {CALIB}"),
    "llama3-fitted-norm-none": ("llama3", f"--kv-rank 8 --rope-dim 4 --init fitted --latent-norm "
                                          f"--attention-metric none {FIT}"),
    "mistral-layers": ("mistral", "--kv-rank 12 --rope-dim 8 --layers 0,2"),
    "mistral-fitted-layers": ("mistral", f"--kv-rank 12 --rope-dim 8 --init fitted --layers 0,2 {FIT}"),
}
DISTILL = ("--seq-len 16 --batch-size 4 --max-tokens 1280 --ild-tokens 256 --precision fp32 --eval-tokens 200 "
           "--lr 3e-3 --ild-lr 3e-3 --save-every 5 --no-progress --no-compile-loss")
DISTILLS = {
    "fp32": "",
    "bf16-accum2": "--precision bf16 --grad-accum 2 --batch-size 2",
    "jsd-ce-temperature": "--loss jsd --ce-weight 0.5 --temperature 2",
    "topk-mla": "--stage kd --teacher-topk 8 --trainable mla",
}
TIMING = {"tokens_per_s", "elapsed_s", "minutes"}


def ecomla(checkout: Path, cache: Path, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "ECOMLA_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "ecomla", *args], cwd=checkout, env=env, stdout=f, stderr=f, check=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def untimed(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    rows = [{k: v for k, v in r.items() if k not in TIMING and k != "final"} for r in rows]
    train = json.loads((run / "ecomla_train.json").read_text())
    train.pop("minutes")
    train["args"].pop("out")
    return rows, train


def prepare(work: Path, checkouts: dict[str, Path]) -> dict[str, Path]:
    """Tiny sources and chat data (once), one asset cache per checkout sharing the fetched default model."""
    sources = {"qwen2": work / "src-qwen2", "mistral": work / "src-mistral", "llama3": work / "src-llama3"}
    families = [("qwen2", 1, {}), ("mistral", 2, {}), ("llama", 3, {"rope_parameters": LLAMA3})]
    for (family, seed, kw), path in zip(families, sources.values()):
        if not (path / "config.json").is_file():
            make_source(family, path, seed=seed, **kw)
    (work / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    shared = Path(os.environ.get("ECOMLA_CACHE", Path.home() / ".cache" / "ecomla")).expanduser()
    ecomla(checkouts["new"], shared, ["assets", "--only", "model"], work / "assets.log")
    for name in checkouts:
        (work / name).mkdir(exist_ok=True)
        (work / f"cache-{name}").mkdir(parents=True, exist_ok=True)
        for sub in ("models", "assets", "wheels"):
            link = work / f"cache-{name}" / sub
            if not link.is_symlink() and (shared / sub).is_dir():
                link.symlink_to(shared / sub)
    return {**sources, "default": "default"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="checkout before the change")
    p.add_argument("--new", type=Path, default=ROOT, help="checkout after the change")
    p.add_argument("--work", type=Path, default=Path("/tmp/ecomla-same-outputs"), help="scratch folder")
    a = p.parse_args()
    checkouts = {"old": a.old.resolve(), "new": a.new.resolve()}
    a.work.mkdir(parents=True, exist_ok=True)
    sources = prepare(a.work, checkouts)
    same = 0
    for name, (src, flags) in CONVERSIONS.items():
        for which, checkout in checkouts.items():
            out = a.work / which / name
            if not (out / "config.json").is_file():
                args = ["convert", str(sources[src]), str(out), *flags.split(), "--overwrite"]
                ecomla(checkout, a.work / f"cache-{which}", args, a.work / which / f"{name}.log")
        hashes = {f: {w: sha(a.work / w / name / f) for w in checkouts} for f in ("model.safetensors", "config.json")}
        ok = all(h["old"] == h["new"] for h in hashes.values())
        same += ok
        print(f"convert {name:<32} {'same' if ok else 'DIFFERENT: ' + json.dumps(hashes)}", flush=True)
    student = a.work / "old" / "qwen2-xecomla"
    for name, flags in DISTILLS.items():
        runs = {w: a.work / w / f"distill-{name}" for w in checkouts}
        for which, checkout in checkouts.items():
            if not (runs[which] / "ecomla_train.json").is_file():
                args = ["distill", str(student), "--data", str(a.work / "chat.jsonl"), "--out", str(runs[which]),
                        *DISTILL.split(), *flags.split()]
                ecomla(checkout, a.work / f"cache-{which}", args, a.work / which / f"d-{name}.log")
        (rows_old, train_old), (rows_new, train_new) = untimed(runs["old"]), untimed(runs["new"])
        equal_rows = sum(x == y for x, y in zip(rows_old, rows_new))
        ok = len(rows_old) == len(rows_new) == equal_rows and train_old == train_new
        same += ok
        print(f"distill {name:<32} {equal_rows}/{len(rows_old)} rows equal, ecomla_train.json "
              f"{'equal' if train_old == train_new else 'DIFFERENT'}", flush=True)
    print(f"{same} of {len(CONVERSIONS) + len(DISTILLS)} outputs identical")


if __name__ == "__main__":
    main()
