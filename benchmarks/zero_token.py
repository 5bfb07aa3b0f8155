"""The 0-token table: every init at 2x / 4x / 8x on SmolLM2-135M-Instruct, before any training.

    OMP_NUM_THREADS=1 python benchmarks/zero_token.py --out runs/zero-token
    python benchmarks/zero_token.py --ratios 4x --inits xecomla,rope-whitened --limit 20 --max-tokens 2048

Converts `default` with `ecomla convert --init INIT` at each ratio (reusing finished conversions), evaluates all
students of a ratio in one `ecomla eval` run (the teacher runs once per batch) and prints one markdown table:
KL(teacher || student) and top-1 agreement on held-out chat, perplexities, and the task average.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecomla.convert.convert import ConvertArgs, convert
from ecomla.eval.run import EvalArgs, evaluate
from ecomla.io import load_config
from ecomla.mla.config import SourceShape

ROPE_DIM = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", default="2x,4x,8x")
    p.add_argument("--inits", default="xecomla,random,whitened,rope-aware,rope-whitened")
    p.add_argument("--limit", default="arc_challenge=60,arc_easy=60,hellaswag=60,mmlu=200,openbookqa=60,piqa=60,"
                   "winogrande=60")
    p.add_argument("--tasks", default="all")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", default="runs/zero-token")
    a = p.parse_args()
    out = Path(a.out)
    shape = SourceShape.of(load_config("default")[0])
    rows = []
    for ratio in a.ratios.split(","):
        names, paths = [], []
        for init in a.inits.split(","):
            folder = out / "models" / f"{ratio}-{init}"
            if not (folder / "ecomla_convert.json").is_file():
                kv_rank = shape.kv_rank_for_ratio(float(ratio.removesuffix("x")), ROPE_DIM)
                convert(ConvertArgs(src="default", out=str(folder), kv_rank=kv_rank, rope_dim=ROPE_DIM, init=init,
                                    overwrite=True), log=lambda *x: None)
            names.append(f"{ratio}-{init}")
            paths.append(str(folder))
        res_file = out / f"eval-{ratio}" / "results.json"
        if res_file.is_file():
            res = json.loads(res_file.read_text())
        else:
            res = evaluate(EvalArgs(models=paths, names=",".join(names), teacher="default", tasks=a.tasks,
                                    limit=a.limit, max_tokens=a.max_tokens, out=str(out / f"eval-{ratio}"),
                                    teacher_row=not rows))
        rows += res["models"]
    print(table(rows))
    (out / "table.md").write_text(table(rows) + "\n")


def table(rows: list[dict]) -> str:
    lines = ["| model | KV B/token | KL to teacher | top-1 agree | ppl chat | ppl text | task avg (%) |",
             "|---|---|---|---|---|---|---|"]
    for m in rows:
        ppl = m.get("ppl") or {}
        avg = m.get("average")
        lines.append(f"| {m['name']} | {m['kv_bytes_per_token']} | {m['kl_to_teacher']:.3f} | "
                     f"{m['top1_agreement']:.3f} | {ppl.get('chat', float('nan')):.1f} | "
                     f"{ppl.get('text', float('nan')):.1f} | {'-' if avg is None else f'{100 * avg:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
