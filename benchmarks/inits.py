"""Every init at each ratio, before any training and (with --distill) after the same distillation: one table.

    OMP_NUM_THREADS=1 python benchmarks/inits.py --out runs/inits                    # every init at 2x / 4x / 8x
    OMP_NUM_THREADS=2 python benchmarks/inits.py --ratios 4x --inits rope-whitened,fitted --eval "--tasks none" \
        --distill "--ild-tokens 0 --max-tokens 49152" --out runs/inits-kd              # the demo's KD budget
    python benchmarks/inits.py --ratios 4x --inits xecomla --eval "--tasks none --max-tokens 256"   # a quick look

Each student is `ecomla convert SRC OUT --kv-rank R --rope-dim 32 --init INIT`, with R the uniform rank of the
ratio (r_kv = 2*G*d_h / ratio - d_rope); the teacher is a row too. With --distill every student also gets
`ecomla distill` with exactly those flags (same budget, data order and schedule for every start), as a second row
named RATIO-INIT-trained. Runs on benchmarks/study.py (its flags: --out, --work, --src, --eval, --record).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ecomla.common import UserError
from ecomla.io import load_config
from ecomla.mla.config import SourceShape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root importable
from benchmarks.study import Variant, parser, run_cli  # noqa: E402

LIMIT = "arc_challenge=60,arc_easy=60,hellaswag=60,mmlu=200,openbookqa=60,piqa=60,winogrande=60"


def main() -> None:
    p = parser(__doc__, "runs/inits")
    p.set_defaults(eval=f"--tasks all --limit {LIMIT} --max-tokens 8192")
    p.add_argument("--ratios", default="2x,4x,8x")
    p.add_argument("--inits", default="xecomla,random,whitened,rope-aware,rope-whitened,fitted")
    p.add_argument("--rope-dim", type=int, default=32)
    p.add_argument("--distill", default=None, help="`ecomla distill` flags: each student also trained with them")
    a = p.parse_args()
    try:
        shape = SourceShape.of(load_config(a.src)[0])
    except UserError as err:
        p.error(str(err))
    variants = [Variant("teacher", model=a.src)]
    for ratio in a.ratios.split(","):
        kv_rank = shape.kv_rank_for_ratio(float(ratio.removesuffix("x")), a.rope_dim)
        for init in a.inits.split(","):
            flags = ["--kv-rank", str(kv_rank), "--rope-dim", str(a.rope_dim), "--init", init]
            variants.append(Variant(f"{ratio}-{init}", convert=flags))
            if a.distill is not None:
                variants.append(Variant(f"{ratio}-{init}-trained", convert=flags, distill=shlex.split(a.distill)))
    run_cli(a, variants)


if __name__ == "__main__":
    main()
