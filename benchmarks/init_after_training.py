"""Do better starts stay better after training? The same short distillation from several inits at one ratio.

    OMP_NUM_THREADS=1 python benchmarks/init_after_training.py --out runs/init-training
    python benchmarks/init_after_training.py --inits xecomla,rope-whitened --kd-tokens 16384 --ild-tokens 8192

Each student: `ecomla convert default --init INIT` (reusing runs/zero-token/models when present), then
`ecomla distill` with exactly the same budget (layer-wise alignment on --ild-tokens, end-to-end KD on
--kd-tokens, same data order and schedule), then all trained students are evaluated together against the
teacher (held-out KL, perplexities, the task subset). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecomla.convert.convert import ConvertArgs, convert
from ecomla.distill import DistillArgs, distill
from ecomla.eval.run import EvalArgs, evaluate

R_KV = {"2x": 160, "4x": 64, "8x": 16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", default="4x")
    p.add_argument("--inits", default="xecomla,whitened,rope-whitened")
    p.add_argument("--ild-tokens", type=int, default=32768)
    p.add_argument("--kd-tokens", type=int, default=65536)
    p.add_argument("--limit", default="arc_challenge=60,arc_easy=60,hellaswag=60,mmlu=200,openbookqa=60,piqa=60,"
                   "winogrande=60")
    p.add_argument("--tasks", default="all")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--zero-token-models", default="runs/zero-token/models")
    p.add_argument("--out", default="runs/init-training")
    p.add_argument("--precision", default="auto", help="distillation precision (auto: bf16 only where the CPU has "
                   "bf16 units; section 4's first tables were bf16)")
    p.add_argument("--lr", type=float, default=None, help="KD peak learning rate (default: ecomla distill's)")
    p.add_argument("--ild-lr", type=float, default=None, help="ILD peak learning rate (default: ecomla distill's)")
    p.add_argument("--trainable", default=None, help="KD trainable set (default: ecomla distill's)")
    p.add_argument("--warmup-ratio", type=float, default=None, help="warmup share of each stage (default: distill's)")
    p.add_argument("--text-data", default=None, help="plain text mixed into training (default: chat only)")
    p.add_argument("--text-share", type=float, default=None,
                   help="share of blocks from --text-data (default: distill's)")
    a = p.parse_args()
    out = Path(a.out)
    trained = {}
    overrides = {k: v for k, v in (("lr", a.lr), ("ild_lr", a.ild_lr), ("trainable", a.trainable),
                                                         ("warmup_ratio", a.warmup_ratio), ("text_data", a.text_data),
                                                         ("text_share", a.text_share)) if v is not None}
    for init in a.inits.split(","):
        start = Path(a.zero_token_models) / f"{a.ratio}-{init}"
        if not (start / "ecomla_convert.json").is_file():
            start = out / "start" / init
            if not (start / "ecomla_convert.json").is_file():
                convert(ConvertArgs(src="default", out=str(start), kv_rank=R_KV[a.ratio], rope_dim=32, init=init,
                                    overwrite=True), log=lambda *x: None)
        kd = out / "trained" / init
        if not (kd / "ecomla_train.json").is_file():
            distill(DistillArgs(student=str(start), out=str(kd), ild_tokens=a.ild_tokens, max_tokens=a.kd_tokens,
                                eval_tokens=0, progress=False, resume=(kd / "checkpoints").is_dir(),
                                precision=a.precision, **overrides))
        trained[f"{a.ratio}-{init}-trained"] = str(kd)
    res_file = out / "eval" / "results.json"
    if res_file.is_file():
        res = json.loads(res_file.read_text())
    else:
        res = evaluate(EvalArgs(models=list(trained.values()), names=",".join(trained), teacher="default",
                                tasks=a.tasks, limit=a.limit, max_tokens=a.max_tokens, out=str(out / "eval"),
                                teacher_row=False))
    from zero_token import table

    print(f"\nsame budget for every start: {a.ild_tokens} ILD tokens + {a.kd_tokens} KD tokens")
    print(table(res["models"]))
    (out / "table.md").write_text(table(res["models"]) + "\n")


if __name__ == "__main__":
    main()
