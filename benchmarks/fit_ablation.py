"""Which parts of the fitted init pay off: today's default and one change at a time, at 0 tokens, one table.

    OMP_NUM_THREADS=1 python benchmarks/fit_ablation.py --out runs/fit-ablation
    python benchmarks/fit_ablation.py --variants default,no-o-refit --calib-seqs 16 --max-tokens 1024 --out /tmp/fa

Every variant is `ecomla convert default OUT --kv-rank R --rope-dim 32 --init fitted` (R for --ratio) with one
FitChoice field changed in Python (most have no flag any more: they are the choices that lost), or another init,
on --calib-seqs calibration sequences (fewer than convert's 128, so that a variant converts in minutes).
KL(teacher || student), top-1 agreement and perplexity on the first --max-tokens of the held-out chat tokens that
`ecomla eval` reads. Writes OUT/results.json and OUT/table.md; a variant already converted in OUT is reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ecomla.convert.convert import ConvertArgs, convert
from ecomla.eval.fidelity import fidelity
from ecomla.eval.run import EvalArgs, heldout_batches
from ecomla.io import load_config, load_model, load_tokenizer
from ecomla.mla.config import SourceShape

VARIANTS = {  # name -> (init, FitChoice fields changed)
    "default": ("fitted", {}),
    "metric-up": ("fitted", {"attention_metric": "up"}),  # teacher's attention for the up-projections only
    "metric-none": ("fitted", {"attention_metric": "none"}),
    "alpha-2": ("fitted", {"key_weight": 2.0}),
    "alpha-8": ("fitted", {"key_weight": 8.0}),
    "plain-metric": ("fitted", {"query_aware": False, "output_aware": False}),  # K rows not by logits, V not via o
    "no-o-refit": ("fitted", {"o_target": "none"}),
    "sequential": ("fitted", {"sequential": True}),  # layer l on the converted layers' outputs, via the input map
    "o-residual": ("fitted", {"sequential": True, "o_target": "residual"}),
    "rope-whitened": ("rope-whitened", {}),
}


def measure(name: str, a, kv_rank: int, teacher, batches) -> dict:
    init, changes = VARIANTS[name]
    folder = Path(a.out) / f"{a.ratio}-{name}"
    args = ConvertArgs(src="default", out=str(folder), kv_rank=kv_rank, rope_dim=32, init=init,
                       calib_seqs=a.calib_seqs, overwrite=True)
    if changes:
        args.method = dataclasses.replace(args.method, fit=dataclasses.replace(args.method.fit, **changes))
    if not (folder / "ecomla_convert.json").is_file():
        convert(args, log=lambda *x: None)
    res = fidelity({"s": load_model(str(folder), dtype="float32")[0]}, teacher, batches)["s"]
    return {"variant": name, "init": init, "changes": changes, "kl": res["kl"], "top1": res["top1_agreement"],
            "ppl_chat": res["ppl"], "tokens": res["tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratio", default="4x")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    kv_rank = SourceShape.of(load_config("default")[0]).kv_rank_for_ratio(float(a.ratio.removesuffix("x")), 32)
    teacher, _ = load_model("default", dtype="float32")
    batches = heldout_batches(load_tokenizer("default"), EvalArgs(models=["-"], max_tokens=a.max_tokens))["chat"]
    rows, out = [], Path(a.out)
    for name in a.variants.split(","):
        rows.append(measure(name, a, kv_rank, teacher, batches))
        print(json.dumps(rows[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))  # the first convert made OUT
    lines = ["| variant | changed | KL | top-1 | ppl chat |", "|---|---|---|---|---|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or ("--init " + r["init"])
        lines.append(f"| {r['variant']} | {changed} | {r['kl']:.3f} | {r['top1']:.3f} | {r['ppl_chat']:.2f} |")
    print(f"\n{a.ratio} (r_kv {kv_rank} + d_rope 32), {a.calib_seqs} calibration sequences, {rows[0]['tokens']} "
          "held-out chat tokens")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
