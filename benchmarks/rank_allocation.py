"""Where should a fixed KV budget go? Uniform ranks vs the paper's energy threshold vs budgeted allocation.

    OMP_NUM_THREADS=1 python benchmarks/rank_allocation.py --budget 4x --init rope-whitened --out runs/rank-alloc

All variants cache the same total (within one element per layer for the energy threshold, whose delta is
found by bisection to land on the budget) and start from the same init; they are compared at 0 training tokens
by held-out KL to the teacher and perplexities (`ecomla eval --tasks none`).
Variants: uniform r_kv; `--rank-energy delta` (paper Eq. 13-14, on the init's own K/V spectrum);
`--kv-budget` with absolute and with relative per-layer errors; `--kv-budget --allow-hybrid`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecomla.convert.convert import ConvertArgs, convert
from ecomla.convert.ranks import parse_budget
from ecomla.eval.run import EvalArgs, evaluate
from ecomla.io import load_config
from ecomla.mla.config import SourceShape

D_ROPE = 32


def conv(out: Path, **kw) -> dict:
    meta = out / "ecomla_convert.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    return convert(ConvertArgs(src="default", out=str(out), rope_dim=D_ROPE, overwrite=True, **kw), log=lambda *a: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="4x")
    p.add_argument("--init", default="rope-whitened")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", default="runs/rank-alloc")
    a = p.parse_args()
    out = Path(a.out)
    shape = SourceShape.of(load_config("default")[0])
    budget = parse_budget(a.budget, shape.kv_elements)
    uniform = budget // shape.num_layers - D_ROPE
    variants = {
        "uniform": dict(kv_rank=uniform),
        "budget-absolute": dict(kv_budget=a.budget),
        "budget-relative": dict(kv_budget=a.budget, budget_norm="relative"),
        "budget-hybrid": dict(kv_budget=a.budget, allow_hybrid=True),
    }
    metas = {name: conv(out / name, init=a.init, **kw) for name, kw in variants.items()}
    lo, hi = 0.05, 0.9999  # bisection on delta: the energy threshold that spends the same budget
    for step in range(12):
        delta = (lo + hi) / 2
        m = conv(out / f"energy-search-{step}", init=a.init, rank_energy=round(delta, 5))
        used = m["summary"]["kv_elements_per_token"]
        lo, hi = (delta, hi) if used < budget else (lo, delta)
        if abs(used - budget) <= shape.num_layers:
            break
    metas[f"energy-delta-{delta:.4f}"] = m
    names = list(metas)
    paths = [str(out / n) if not n.startswith("energy") else str(out / f"energy-search-{step}") for n in names]
    res_file = out / "eval" / "results.json"
    if res_file.is_file() and [m["name"] for m in json.loads(res_file.read_text())["models"]] == names:
        res = json.loads(res_file.read_text())  # already measured: reprint the table and redraw the plot
    else:
        res = evaluate(EvalArgs(models=paths, names=",".join(names), teacher="default", tasks="none",
                                max_tokens=a.max_tokens, out=str(out / "eval"), teacher_row=False))
    print(f"\n{a.init} at a {a.budget} budget ({budget} elements/token): 0 training tokens")
    print("| allocation | KV elements/token | GQA layers kept | KL to teacher | ppl chat | ppl text |")
    print("|---|---|---|---|---|---|")
    for name, row in zip(names, res["models"]):
        s = metas[name]["summary"]
        kept = shape.num_layers - len(s["mla_layers"])
        print(f"| {name} | {s['kv_elements_per_token']} | {kept} | {row['kl_to_teacher']:.3f} | "
              f"{row['ppl']['chat']:.1f} | {row['ppl']['text']:.1f} |")
    plot(names, paths, res["models"], out / "ranks.png", f"{a.init}, {a.budget} KV budget, 0 training tokens")


def plot(names: list[str], paths: list[str], rows: list[dict], path: Path, title: str) -> None:
    """r_kv per layer for each allocation (a kept-GQA layer drawn at 0), its KL in the legend."""
    from ecomla.eval.report import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, folder, row in zip(names, paths, rows):
        specs = json.loads((Path(folder) / "config.json").read_text())["mla_layers"]
        ranks = [0 if sp is None else sp["kv_lora_rank"] for sp in specs]
        ax.plot(range(len(ranks)), ranks, "o-", ms=3, label=f"{name} (KL {row['kl_to_teacher']:.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("r_kv (latent rank; + 32 rotary dims cached)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
