"""One picture of the initialisation study: held-out KL to the teacher against KV cache size, per init.

    python benchmarks/init_plot.py --out docs/img/inits.png

Reads the `results.json` files that `benchmarks/zero_token.py` (0 training tokens) and
`benchmarks/init_after_training.py` (after the same short distillation) wrote under `runs/`, so it plots
measured rows only; missing runs are skipped with a note. Filled markers: 0 tokens; hollow: trained (circles:
16k ILD + 32k KD tokens; squares: 49k KD tokens, the fitted init's recipe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecomla.eval.report import pyplot, save

ZERO = ["runs/zero-token/eval-2x", "runs/zero-token/eval-4x", "runs/zero-token/eval-8x",
        "runs/zero-token-8x-more/eval-8x", "runs/zero-token-baselines/eval-2x", "runs/zero-token-baselines/eval-4x",
        "runs/zero-token-baselines/eval-8x", "runs/zero-token-fitted2/eval-2x", "runs/zero-token-fitted2/eval-4x",
        "runs/zero-token-fitted2/eval-8x",
        # today's default (fitted with the attention metric): `ecomla convert ... --init fitted` + `ecomla eval`
        "runs/s11/eval-2x-final", "runs/s10/eval-4x-final", "runs/s10/eval-8x-final"]
TRAINED = ["runs/init-training-2x/eval", "runs/init-training/eval", "runs/init-training-8x/eval",
           "runs/init-training-fitted2-4x/eval"]
# fitted starts after KD only (49,152 tokens, no ILD: the demo's recipe), `init_after_training.py --ild-tokens 0`;
# their students are all named '<ratio>-fitted-trained', so the folder says which start they came from
TRAINED_KD = {"runs/init-training-fitted2-4x-kdonly/eval": "fitted",
              "runs/s10/itr-fit-att-kdonly/eval": "fitted-final", "runs/s11/itr-8x-fit-kdonly/eval": "fitted-final"}
LABELS = {"fitted": "fitted (before the attention metric)", "fitted-final": "fitted (attention metric, the default)"}


def init_name(model: str) -> str | None:
    """'4x-rope-whitened-trained' -> 'rope-whitened'; None for the teacher."""
    if model == "teacher" or "-" not in model:
        return None
    name = model.split("-", 1)[1].removesuffix("-trained")
    return LABELS.get(name, name)


def collect(folders: list[str] | dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    """init -> [(KV bytes/token, KL)], one point per measured student ({folder: init} names the init per folder)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            print(f"skipped (not run): {path}")
            continue
        for m in json.loads(path.read_text())["models"]:
            name = init_name(m["name"])
            if name and isinstance(folders, dict):
                name = LABELS.get(folders[folder], folders[folder])
            if name and m.get("kl_to_teacher") is not None:
                points.setdefault(name, []).append((m["kv_bytes_per_token"], m["kl_to_teacher"]))
    return {k: sorted(set(v)) for k, v in points.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img/inits.png")
    a = p.parse_args()
    zero, trained, trained_kd = collect(ZERO), collect(TRAINED), collect(TRAINED_KD)
    if not zero:
        raise SystemExit("no results found: run benchmarks/zero_token.py first (see docs/RESULTS.md section 2)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = {}
    for name, pts in sorted(zero.items()):
        line, = ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{name}, 0 tokens")
        colors[name] = line.get_color()
    for name, pts in sorted(trained.items()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o--", mfc="none", color=colors.get(name),
                label=f"{name}, after 16k ILD + 32k KD tokens")
    for name, pts in sorted(trained_kd.items()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], "s:", mfc="none", color=colors.get(name),
                label=f"{name}, after 49k KD tokens")
    ax.set_xscale("log", base=2)
    xs = sorted({x for pts in zero.values() for x, _ in pts})
    ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("KV cache bytes per token (fp32; the teacher's: 46,080)")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_title("SmolLM2-135M-Instruct: where each MLA init starts, and where it gets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save(fig, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
