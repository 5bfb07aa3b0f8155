"""What does KD from cached teacher top-k log-probs cost in quality, against full-vocabulary KD?

    OMP_NUM_THREADS=1 python benchmarks/topk_quality.py --student runs/zero-token/models/4x-rope-whitened

Two end-to-end KD runs from the same student with the same tokens, data order and schedule: one against the
live teacher (all 49,152 log-probs), one against the teacher's top-k cached once on disk (renormalised over
those k). Both are then evaluated by held-out KL to the full teacher and perplexities. The speed side of the
trade is measured by benchmarks/distill_speed.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ecomla.distill import DistillArgs, distill
from ecomla.eval.run import EvalArgs, evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", default="runs/topk-quality")
    a = p.parse_args()
    out = Path(a.out)
    runs = {"kd-full-vocab": 0, f"kd-top{a.k}": a.k}
    for name, k in runs.items():
        if not (out / name / "ecomla_train.json").is_file():
            distill(DistillArgs(student=a.student, out=str(out / name), stage="kd", max_tokens=a.tokens,
                                teacher_topk=k, eval_tokens=0, progress=False,
                                resume=(out / name / "checkpoints").is_dir()))
    res = evaluate(EvalArgs(models=[a.student] + [str(out / n) for n in runs], names=",".join(["start", *runs]),
                            teacher="default", tasks="none", max_tokens=a.max_tokens, out=str(out / "eval"),
                            teacher_row=False))
    print(f"\n{a.tokens} KD tokens from {a.student}")
    print("| run | KL to teacher | top-1 agree | ppl chat | ppl text |\n|---|---|---|---|---|")
    for m in res["models"]:
        print(f"| {m['name']} | {m['kl_to_teacher']:.3f} | {m['top1_agreement']:.3f} | {m['ppl']['chat']:.2f} | "
              f"{m['ppl']['text']:.2f} |")


if __name__ == "__main__":
    main()
