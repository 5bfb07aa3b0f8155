"""Per-layer ranks chosen by the error at the model's output (issue 18), measured at 0 tokens.

    OMP_NUM_THREADS=2 python benchmarks/layer_sensitivity.py --models runs/zero-token-fitted2/models --budget 4x \
        --out runs/layer-sens-4x

1. Sensitivity: for every layer l and every candidate (the fitted students at 2x / 4x / 8x, whose layer l has
   r_kv 160 / 64 / 16, all with the same 32 rotary dims), the teacher with only layer l's attention replaced by
   that student's; KL(teacher || it) per token on calibration tokens from the *train* split (not the held-out
   tokens the eval uses).
2. Allocation: per layer one of {the candidates, GQA (lossless, 2*G*d_h elements)}, minimising the summed
   per-layer KL within the budget's elements per token (an exact multiple-choice knapsack by dynamic programming).
3. The chosen mix: each layer's attention taken from the chosen student (GQA: the source's), everything else the
   source's, saved as one checkpoint and measured with `ecomla eval --tasks none` like RESULTS section 2.
With one-shot calibration (the fitted init's default) every layer is fitted on the teacher's own inputs, so a
layer's weights depend on its rank alone and the mix is exactly the conversion at those per-layer ranks; students
converted with --sequential would make it an approximation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ecomla.convert.calibrate import calibration_batches
from ecomla.eval.run import EvalArgs, evaluate
from ecomla.io import load_model, load_tokenizer
from ecomla.losses import token_kl
from ecomla.mla import EcoMLAConfig, EcoMLAForCausalLM
from ecomla.mla.config import SourceShape
from ecomla.convert.ranks import parse_budget

GQA = "gqa"


def hybrid(base: EcoMLAConfig, source_sd: dict, students: dict, choice: dict[int, str]):
    """The model whose layer l is student choice[l]'s attention (GQA: the source's), everything else the source's."""
    layers = [students[c].config.mla_layers[i] if c != GQA else None for i, c in sorted(choice.items())]
    config = EcoMLAConfig(**{**base.to_dict(), "mla_layers": layers})
    sd = dict(source_sd)
    for i, c in choice.items():
        if c == GQA:
            continue
        prefix = f"model.layers.{i}.self_attn."
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        sd.update({k: v for k, v in students[c].state_dict().items() if k.startswith(prefix)})
    with torch.device("meta"):
        model = EcoMLAForCausalLM(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.model.rotary.reset()
    return model.eval()


@torch.no_grad()
def kl(model, batches, teacher_lp) -> float:
    total, n = 0.0, 0
    for ids, t in zip(batches, teacher_lp):
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [B, T, V]
        k = token_kl(logits.flatten(0, 1), t.flatten(0, 1), "forward")
        total, n = total + float(k.sum()), n + k.numel()
    return total / n


def allocate(sens: dict[int, dict[str, float]], cost: dict[str, int], budget: int, unit: int) -> dict[int, str]:
    """Minimise sum_l sens[l][c_l] subject to sum_l cost[c_l] <= budget (costs in multiples of `unit`)."""
    cap = budget // unit
    best = {0: (0.0, {})}  # used units -> (summed KL, choice)
    for layer in sorted(sens):
        nxt = {}
        for used, (err, ch) in best.items():
            for c, e in sens[layer].items():
                u = used + cost[c] // unit
                if u <= cap and (u not in nxt or err + e < nxt[u][0]):
                    nxt[u] = (err + e, {**ch, layer: c})
        best = nxt
    return min(best.values(), key=lambda x: x[0])[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/zero-token-fitted2/models")
    p.add_argument("--candidates", default="2x,4x,8x")
    p.add_argument("--budget", default="4x")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--no-gqa", action="store_true", help="every layer stays MLA")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tpath = load_model("default", dtype="float32")
    tok = load_tokenizer(tpath)
    students = {c: load_model(str(Path(a.models) / f"{c}-fitted"), dtype="float32")[0] for c in a.candidates.split(",")}
    base = next(iter(students.values())).config
    shape = SourceShape.of(base)
    L = shape.num_layers
    source_sd = {k: v for k, v in teacher.state_dict().items()}
    cost = {c: s.config.mla_layers[0]["kv_lora_rank"] + s.config.mla_layers[0]["qk_rope_head_dim"]
            for c, s in students.items()}
    if not a.no_gqa:
        cost[GQA] = shape.kv_elements_per_layer
    budget = parse_budget(a.budget, shape.kv_elements)
    batches = calibration_batches(tok, "default", a.seqs, a.seq_len, seed=1, batch_size=4)
    with torch.no_grad():
        teacher_lp = [torch.log_softmax(teacher(input_ids=b, use_cache=False).logits.float(), -1) for b in batches]

    sens_file = out / "sensitivity.json"
    sens = {int(k): v for k, v in json.loads(sens_file.read_text()).items()} if sens_file.is_file() else {}
    todo = [(i, c) for i in range(L) for c in students if c not in sens.get(i, {})]
    for i, c in tqdm(todo, desc="layer sensitivity"):
        model = hybrid(base, source_sd, students, {j: (c if j == i else GQA) for j in range(L)})
        sens.setdefault(i, {})[c] = kl(model, batches, teacher_lp)
        sens_file.write_text(json.dumps(sens, indent=1))
    for i in range(L):
        if not a.no_gqa:
            sens[i][GQA] = 0.0
        print(f"layer {i:2d}: " + "  ".join(f"{c} {sens[i][c]:.4f}" for c in students))

    unit = 16
    choice = allocate({i: dict(sens[i]) for i in range(L)}, cost, budget, unit)
    used = sum(cost[c] for c in choice.values())
    print(f"budget {budget} elements/token, used {used}; choice: " + " ".join(choice[i] for i in range(L)))
    mixed = hybrid(base, source_sd, students, choice)
    folder = out / "models" / f"{a.budget}-alloc"
    mixed.save_pretrained(folder)
    tok.save_pretrained(folder)
    (out / "allocation.json").write_text(json.dumps({"budget": budget, "used": used, "cost": cost,
                                                     "choice": [choice[i] for i in range(L)]}, indent=1))
    uniform = str(Path(a.models) / f"{a.budget}-fitted")
    evaluate(EvalArgs(models=[uniform, str(folder)], names=f"{a.budget}-fitted,{a.budget}-alloc", teacher="default",
                      tasks="none", max_tokens=a.max_tokens, out=str(out / "eval")))


if __name__ == "__main__":
    main()
