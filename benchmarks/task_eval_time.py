"""Wall-clock of one model's lm-eval task run on the demo's subsets, and the scores it gives.

    python benchmarks/task_eval_time.py                                  # the teacher, the demo's subsets
    python benchmarks/task_eval_time.py --model runs/demo/student-kd --out runs/task-time.json

Times `ecomla.eval.tasks.run_tasks` (writing the task folder, lm-eval's setup, the model's forward passes) and
writes the scores to --out, so two checkouts can be compared: run it in each, one after the other on an otherwise
idle machine, and compare the seconds (a paired ratio) and the two score files (they should be equal).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ecomla.demo import DemoArgs
from ecomla.eval.tasks import parse_tasks, run_tasks
from ecomla.io import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default="all")
    p.add_argument("--limit", default=DemoArgs().default_limit(), help="default: the demo's subsets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/task-eval-time.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, path = load_model(a.model, dtype="float32")
    tok = load_tokenizer(path)
    t0 = time.perf_counter()
    scores = run_tasks(model, tok, parse_tasks(a.tasks), a.limit, 1234, a.batch_size)
    seconds = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": round(seconds, 1), "limit": a.limit, "scores": scores}, indent=1,
                              sort_keys=True))
    print(f"{a.model}: tasks {a.tasks} with --limit {a.limit}: {seconds:.1f} s (scores in {out})")


if __name__ == "__main__":
    main()
