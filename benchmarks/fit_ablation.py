"""Which parts of the fitted init pay off: each variant converted and measured at 0 tokens, one table.

    OMP_NUM_THREADS=2 python benchmarks/fit_ablation.py --out runs/fit-ablation
    python benchmarks/fit_ablation.py --variants default,no-refit --calib-seqs 16 --max-tokens 1024

Every variant is `ecomla convert default OUT --kv-rank R --rope-dim 32 --init fitted` with one FitChoice field
changed (or another init), on a smaller calibration set than the default (--calib-seqs) so the whole table takes
about 20 minutes on 2 cores. KL(teacher || student) and top-1 agreement on the first --max-tokens of RESULTS'
held-out chat tokens (the same packing as `ecomla eval`), perplexity there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ecomla.convert.convert import ConvertArgs, convert
from ecomla.eval.fidelity import fidelity
from ecomla.eval.run import EvalArgs, heldout_batches
from ecomla.io import load_config, load_model, load_tokenizer
from ecomla.mla.config import SourceShape

# name -> (init, FitChoice overrides)
VARIANTS = {
    "rope-whitened": ("rope-whitened", {}),
    "default": ("fitted", {}),
    "no-o-refit": ("fitted", {"o_target": "none"}),
    "plain-metric": ("fitted", {"query_aware": False, "output_aware": False}),
    "key-mean-kept": ("fitted", {"mean_weight": 1.0}),
    "alpha-1": ("fitted", {"key_weights": (1.0,)}),
    "alpha-16": ("fitted", {"key_weights": (16.0,)}),
    "alpha-per-layer": ("fitted", {"key_weights": (1.0, 2.0, 4.0, 8.0)}),
    "sequential": ("fitted", {"sequential": True}),
    "o-residual": ("fitted", {"sequential": True, "o_target": "residual"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratio", default="4x")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--out", default="runs/fit-ablation")
    a = p.parse_args()
    out = Path(a.out)
    kv_rank = SourceShape.of(load_config("default")[0]).kv_rank_for_ratio(float(a.ratio.removesuffix("x")), 32)
    teacher, _ = load_model("default", dtype="float32")
    batches = heldout_batches(load_tokenizer("default"), EvalArgs(models=["-"], max_tokens=a.max_tokens))["chat"]
    rows = []
    for name in a.variants.split(","):
        init, overrides = VARIANTS[name]
        folder = out / f"{a.ratio}-{name}"
        args = ConvertArgs(src="default", out=str(folder), kv_rank=kv_rank, rope_dim=32, init=init,
                           calib_seqs=a.calib_seqs, overwrite=True)
        if overrides:
            args.method = dataclasses.replace(args.method, fit=dataclasses.replace(args.method.fit, **overrides))
        t0 = time.time()
        convert(args, log=lambda *x: None)
        seconds = time.time() - t0
        student, _ = load_model(str(folder), dtype="float32")
        res = fidelity({"s": student}, teacher, batches)["s"]
        rows.append({"variant": name, "init": init, "changes": {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in overrides.items()},
                     "kl": res["kl"], "top1": res["top1_agreement"], "ppl_chat": res["ppl"], "tokens": res["tokens"],
                     "convert_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| variant | changed | KL | top-1 | ppl chat | convert s |", "|---|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or ("--init " + r["init"])
        lines.append(f"| {r['variant']} | {changed} | {r['kl']:.3f} | {r['top1']:.3f} | {r['ppl_chat']:.2f} | "
                     f"{r['convert_s']:.0f} |")
    print(f"\n{a.ratio}, {a.calib_seqs} calibration sequences, {rows[0]['tokens']} held-out chat tokens")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
