"""The baseline users would pick instead of ecomla: the GQA source with a quantized KV cache (transformers'
`QuantizedCache`, quanto and HQQ backends; `pip install 'ecomla[kvquant]'`), measured as a user runs it.

    OMP_NUM_THREADS=1 python benchmarks/kv_quant_baselines.py --out runs/kv-quant-baselines
    python benchmarks/kv_quant_baselines.py --caches dynamic,quanto:4,hqq:2:axis=1 --blocks 32 --batch-size 32 --out DIR

Decode-style costs one forward pass per token and row, so the default is 8 blocks of 512 tokens per corpus, decoded
together (about 2,400 assistant tokens of chat and 4,088 tokens of text; the fake-quantization table of issue 27 used
2,040 tokens of held-out plain text).

For each --caches spec (`ecomla eval --kv-cache` syntax, ecomla/eval/kvcache.py): KL(teacher || model), top-1
agreement and perplexity on ecomla eval's held-out chat and plain-text batches, the model decoding one token at a
time through that cache (every position reads its keys and values from it); the teacher is the same model's full
forward. Every cache sees the same batches: some backends' groups depend on the batch shape (quanto's per-channel
axis -1 needs its group to divide rows x KV heads x tokens; HQQ's per-token axis 1 packs rows x KV heads x tokens
into bytes). Bytes per token are read from a live cache for the model in bf16 at --context tokens per sequence
(--bytes-batch sequences: per-channel groups must divide them too), as decoding leaves it (`kvcache.cache_at`: the
window then holds (C - 1) mod R tokens), with that window and without it, against the bytes of the bf16 `dynamic`
cache, read the same way.
A spec the backend refuses at these shapes gets a row with the backend's reason (`kvcache.check_runs`).

Writes OUT/results.jsonl (one line per spec, appended when it finishes; a rerun skips the specs already there),
OUT/results.json (the rows of --caches) and OUT/table.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ecomla.common import UserError
from ecomla.eval.fidelity import fidelity
from ecomla.eval.kvcache import KVCacheSpec, bytes_summary, cache_at, check_runs
from ecomla.eval.run import EvalArgs, heldout_batches
from ecomla.io import load_model, load_tokenizer

CACHES = ("quanto:4,quanto:2,quanto:4:key_axis=-1,quanto:4:key_axis=-1:group=24,quanto:2:key_axis=-1:group=24,"
          "hqq:8:axis=1,hqq:4:axis=1,hqq:3:axis=1,hqq:3,hqq:2:axis=1,hqq:1:axis=1,hqq:4,hqq:1,fp8,dynamic")


def corpora(tok, a) -> dict[str, list[dict]]:
    """The first --blocks blocks of ecomla eval's held-out chat and plain text, in batches of --batch-size."""
    args = EvalArgs(models=["default"], max_tokens=a.blocks * a.seq_len, seq_len=a.seq_len, batch_size=a.batch_size,
                    tasks="none")
    out = {}
    for corpus, bs in heldout_batches(tok, args).items():
        ids, mask = (torch.cat([b[k] for b in bs])[: a.blocks] for k in ("input_ids", "loss_mask"))
        out[corpus] = [{"input_ids": ids[i : i + a.batch_size], "loss_mask": mask[i : i + a.batch_size]}
                       for i in range(0, len(ids), a.batch_size)]
    return out


def measure(spec: KVCacheSpec, model, model_bf16, batches: dict, a) -> dict:
    """One row: the fidelity per corpus, decode-style through `spec`, and the bytes at --context."""
    row = {"spec": spec.text, "cache_config": spec.cache_config()}
    try:
        check_runs(spec, model, {len(b["input_ids"]) for bs in batches.values() for b in bs}, a.seq_len)
        row["bf16"] = bf16_bytes(spec, model_bf16, a)
    except UserError as err:
        return {**row, "refused": str(err)}
    for corpus, bs in batches.items():
        res = fidelity({spec.text: model}, model, bs, desc=f"{spec.text}/{corpus}", kv_cache=spec)
        row[corpus] = {k: res[spec.text][k] for k in ("kl", "top1_agreement", "ppl", "tokens", "kv_cache")}
        row[corpus]["teacher_ppl"] = res["teacher"]["ppl"]
    return row


def bf16_bytes(spec: KVCacheSpec, model_bf16, a) -> dict:
    return bytes_summary(cache_at(model_bf16, spec, a.context, batch=a.bytes_batch), batch=a.bytes_batch)


def table(rows: list[dict], context: int, ref: float) -> str:
    lines = [f"| cache (`--kv-cache`) | bytes/token at {context} (window) | vs bf16 | no window: bytes, vs bf16 | "
             "chat KL | chat ppl | chat top-1 | text KL | text ppl |", "|---" * 9 + "|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| `{r['spec']}` | refused: {r['refused'].split(': ', 2)[-1]} |" + " |" * 7)
            continue
        b = r["bf16"]
        vs = lambda x: f"{ref / x:.2f}x"  # noqa: E731
        lines.append(f"| `{r['spec']}` | {b['bytes_per_token']:.0f} ({b['window_tokens']} tokens) | "
                     f"{vs(b['bytes_per_token'])} | {b['bytes_per_token_no_window']:.0f}, "
                     f"{vs(b['bytes_per_token_no_window'])} | {r['chat']['kl']:.4f} | {r['chat']['ppl']:.2f} | "
                     f"{r['chat']['top1_agreement']:.3f} | {r['text']['kl']:.4f} | {r['text']['ppl']:.2f} |")
    done = [r for r in rows if "chat" in r]
    if done:
        lines.append(f"| teacher (full forward) | | | | 0 | {done[0]['chat']['teacher_ppl']:.2f} | 1 | 0 | "
                     f"{done[0]['text']['teacher_ppl']:.2f} |")
    return "\n".join(lines)


def instrument_args(p: argparse.ArgumentParser) -> None:
    """The held-out blocks and where bytes are read: the same for the baselines and for benchmarks/frontier.py."""
    p.add_argument("--blocks", type=int, default=8, help="blocks per corpus")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per block")
    p.add_argument("--batch-size", type=int, default=8, help="rows decoding together")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence where bytes are read")
    p.add_argument("--bytes-batch", type=int, default=8, help="sequences in the cache whose bytes are read")
    p.add_argument("--out", required=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a GQA model: folder, hub id or 'default'")
    p.add_argument("--caches", default=CACHES, help="comma-separated --kv-cache specs")
    instrument_args(p)
    a = p.parse_args(argv)
    specs = [KVCacheSpec.parse(s) for s in a.caches.split(",")]  # a bad spec stops here, before any model loads
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "results.jsonl"
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    model, path = load_model(a.model, dtype="float32")
    model_bf16, _ = load_model(a.model, dtype="bfloat16")
    batches = corpora(load_tokenizer(path), a)
    ref = bf16_bytes(KVCacheSpec.parse("dynamic"), model_bf16, a)["bytes_per_token"]
    for spec in specs:
        if any(r["spec"] == spec.text for r in rows):
            continue
        rows.append(measure(spec, model, model_bf16, batches, a))
        with done.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(table(rows[-1:], a.context, ref), flush=True)
    order = {s.text: i for i, s in enumerate(specs)}
    rows = sorted((r for r in rows if r["spec"] in order), key=lambda r: order[r["spec"]])
    (out / "table.md").write_text(table(rows, a.context, ref) + "\n")
    (out / "results.json").write_text(json.dumps({"bf16_bytes_per_token": ref, "context": a.context,
                                                  "rows": rows}, indent=1) + "\n")
    print(table(rows, a.context, ref))


if __name__ == "__main__":
    main()
