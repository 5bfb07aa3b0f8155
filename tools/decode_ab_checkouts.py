"""Decode speed of two checkouts of ecomla, paired: did a change (a refactor) move the absorbed decode step?

    git worktree add /tmp/ecomla-before <rev>
    python tools/decode_ab_checkouts.py --old /tmp/ecomla-before --new . --student /tmp/ecomla-smollm2-8x

Runs `benchmarks/bench_decode_cpu.py --runs absorbed,gqa-static --repeats 1` of each checkout in turn, in the
order old new new old old new ... (so drift hits both equally), each in a fresh process with that checkout on
PYTHONPATH, and prints per pair the absorbed step of each and new/old, then the medians. Run it on an idle
machine: a shared one drifts by more than the effect (docs/BENCH.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_run(checkout: Path, args, out: Path) -> dict[str, float]:
    """{run: step ms} of one bench_decode_cpu.py process of `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "benchmarks/bench_decode_cpu.py", "--student", args.student, "--threads",
           str(args.threads), "--runs", "absorbed,gqa-static", "--repeats", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=checkout, env=env, check=True, capture_output=True)
    return {r["run"]: r["step_ms"] for r in json.loads((out / "results.json").read_text())["rows"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="checkout before the change")
    p.add_argument("--new", type=Path, default=Path("."), help="checkout after the change")
    p.add_argument("--student", required=True, help="MLA checkpoint (bench_decode_cpu.py converts it if missing)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    order = [("old", "new"), ("new", "old")]
    ratios, steps = [], {"old": [], "new": []}
    print(f"{'pair':>4} {'old ms':>8} {'new ms':>8} {'new/old':>8}   (absorbed step; StaticCache old/new ms)")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            ms = {}
            for which in order[i % 2]:
                ms[which] = one_run(getattr(args, which).resolve(), args, Path(tmp) / f"{i}-{which}")
                steps[which].append(ms[which]["absorbed"])
            ratios.append(ms["new"]["absorbed"] / ms["old"]["absorbed"])
            print(f"{i:>4} {ms['old']['absorbed']:>8.1f} {ms['new']['absorbed']:>8.1f} {ratios[-1]:>8.2f}   "
                  f"({ms['old']['gqa-static']:.1f} / {ms['new']['gqa-static']:.1f})", flush=True)
    old, new = statistics.median(steps["old"]), statistics.median(steps["new"])
    print(f"median absorbed step: old {old:.1f} ms, new {new:.1f} ms; paired new/old {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
