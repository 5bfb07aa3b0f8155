"""What does KD from the teacher's cached top-k log-probs cost in quality, against full-vocabulary KD?

    OMP_NUM_THREADS=1 python benchmarks/topk_quality.py --out runs/topk-quality
    python benchmarks/topk_quality.py --start "--kv-rank 64 --rope-dim 32" --tokens 1024 \
        --eval "--tasks none --max-tokens 256"                                      # a quick look

Three rows from one start (`ecomla convert SRC OUT` with --start's flags): the start itself, then end-to-end KD on
--tokens tokens against the live teacher (all its log-probs), and the same against the teacher's top-k cached
once on disk (`ecomla distill --teacher-topk K`, renormalised over those k): same tokens, data order and
schedule. The speed side of the trade is benchmarks/distill_speed.py. Runs on benchmarks/study.py (its flags:
--out, --work, --src, --eval, --record).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root importable
from benchmarks.study import Variant, parser, run_cli  # noqa: E402


def main() -> None:
    p = parser(__doc__, "runs/topk-quality")
    p.add_argument("--start", default="--kv-rank 64 --rope-dim 32 --init fitted", help="`ecomla convert` flags")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    a = p.parse_args()
    start = shlex.split(a.start)
    kd = lambda k: ["--stage", "kd", "--max-tokens", str(a.tokens), "--teacher-topk", str(k)]  # noqa: E731
    run_cli(a, [Variant("start", convert=start), Variant("kd-full-vocab", convert=start, distill=kd(0)),
                Variant(f"kd-top{a.k}", convert=start, distill=kd(a.k))])


if __name__ == "__main__":
    main()
