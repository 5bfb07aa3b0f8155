"""Offline preference pairs: chosen = the teacher's greedy answer, rejected = the student's own sampled answer.

    ecomla dpo runs/kd-4x --make-pairs --pairs 128 --out runs/dpo-4x     # builds OUT/pairs.jsonl, then trains
    pairs, stats = build_pairs(PairSpec(...), student, teacher, tok, split_chat(load_chat("default"))["train"])

Prompts are first user turns of the *train* split of `split_chat`; the held-out split that `ecomla eval` and
the stage-1 check read is never used. They are taken in a seeded shuffled order, skipping duplicates and
prompts longer than `max_prompt_length` tokens. The teacher answers greedily; the student (before DPO)
samples at `temperature` with a fixed seed per batch, so the same inputs give the same pairs. Pairs whose
two answers are identical (or empty) carry no preference and are dropped. Pairs and the settings that made
them are cached in OUT/pairs.jsonl + OUT/pairs.json, so a resumed run does not regenerate them.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..generate.generate import encode
from ..common import UserError
from ..outputs import temp_path
from .data import prompt_lengths


@dataclass
class PairSpec:
    """Everything that decides the pairs; a cache built with other settings is not reused."""
    student: str
    teacher: str
    chat_data: str
    pairs: int
    max_new_tokens: int
    temperature: float
    max_prompt_length: int
    gen_batch_size: int
    seed: int


def first_user_turn(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user"), None)


def select_prompts(train, tok, n: int, seed: int, max_prompt_length: int) -> list[tuple[str, str]]:
    """(conversation id, first user turn) for n conversations of `train`, in a seeded order; no duplicates."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    seen, out = set(), []
    for lo in range(0, len(order), max(4 * n, 64)):
        rows = train.select(order[lo:lo + max(4 * n, 64)])
        cands = [(i, t) for i, t in zip(rows["id"], (first_user_turn(m) for m in rows["messages"]))
                 if t and t.strip() and t.strip() not in seen]
        lengths = prompt_lengths(tok, [[{"role": "user", "content": t}] for _, t in cands]) if cands else []
        for (cid, text), length in zip(cands, lengths):
            if length <= max_prompt_length and text.strip() not in seen:
                seen.add(text.strip())
                out.append((cid, text))
                if len(out) == n:
                    return out
    return out


@torch.inference_mode()
def respond(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, temperature: float | None = None,
            seed: int = 0) -> list[tuple[str, bool]]:
    """(answer, finished with EOS) per chat prompt, in order: greedy when temperature is None, else sampled
    (plain temperature sampling, no top-k / top-p) with the seed fixed per batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tok.eos_token_id])
    sampling = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    side, out = tok.padding_side, [None] * len(prompts)
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    try:
        for b, lo in enumerate(range(0, len(order), batch_size)):
            idx = order[lo:lo + batch_size]
            enc = encode(tok, [prompts[i] for i in idx], chat=True).to(model.device)  # left padding
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 100_003 + b)
                seqs = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
            for i, row in zip(idx, seqs[:, enc["input_ids"].shape[1]:]):
                out[i] = (tok.decode(row, skip_special_tokens=True).strip(), any(t in eos for t in row.tolist()))
    finally:
        tok.padding_side = side  # encode() sets left padding; TRL and the saved tokenizer expect the original
    return out


def build_pairs(spec: PairSpec, student, teacher, tok, train, log=print) -> tuple[list[dict], dict]:
    """Pairs in TRL's conversational layout (+ id and finished flags) and counts."""
    t0 = time.time()
    prompts = select_prompts(train, tok, spec.pairs, spec.seed, spec.max_prompt_length)
    if len(prompts) < spec.pairs:
        log(f"[pairs] only {len(prompts)} usable prompts (asked for {spec.pairs})")
    texts = [p for _, p in prompts]
    log(f"[pairs] {len(texts)} prompts: teacher greedy, student sampled at T={spec.temperature}, "
        f"{spec.max_new_tokens} new tokens at most")
    chosen = respond(teacher, tok, texts, spec.max_new_tokens, spec.gen_batch_size)
    rejected = respond(student, tok, texts, spec.max_new_tokens, spec.gen_batch_size, spec.temperature, spec.seed)
    pairs, identical, empty = [], 0, 0
    for (cid, prompt), (c, c_done), (r, r_done) in zip(prompts, chosen, rejected):
        if not c or not r:
            empty += 1
        elif c == r:
            identical += 1
        else:
            pairs.append({"id": cid, "prompt": [{"role": "user", "content": prompt}],
                          "chosen": [{"role": "assistant", "content": c}],
                          "rejected": [{"role": "assistant", "content": r}],
                          "chosen_finished": c_done, "rejected_finished": r_done})
    stats = {"prompts": len(prompts), "pairs": len(pairs), "identical_dropped": identical, "empty_dropped": empty,
             "chosen_finished": sum(p["chosen_finished"] for p in pairs),
             "rejected_finished": sum(p["rejected_finished"] for p in pairs),
             "minutes": round((time.time() - t0) / 60, 2)}
    if not pairs:
        raise UserError(f"--make-pairs: no usable pair out of {len(prompts)} prompts ({identical} identical, "
                        f"{empty} empty); raise --pairs or --max-new-tokens, or check the teacher")
    return pairs, stats


def show(pairs: list[dict], stats: dict, log=print, k: int = 3, width: int = 160) -> None:
    cut = lambda s: s.replace("\n", " ")[:width] + ("..." if len(s) > width else "")  # noqa: E731
    log(f"[pairs] {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['identical_dropped']} identical and "
        f"{stats['empty_dropped']} empty dropped; answers ending with EOS: chosen {stats['chosen_finished']}, "
        f"rejected {stats['rejected_finished']}) in {stats['minutes']} min")
    for p in pairs[:k]:
        log(f"  prompt:   {cut(p['prompt'][0]['content'])}\n  chosen:   {cut(p['chosen'][0]['content'])}\n"
            f"  rejected: {cut(p['rejected'][0]['content'])}")


def save_pairs(out: Path, pairs: list[dict], stats: dict, spec: PairSpec) -> None:
    """OUT/pairs.jsonl (one pair a line) and OUT/pairs.json (settings + counts); each written then renamed."""
    for name, text in (("pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs)),
                       ("pairs.json", json.dumps({"settings": asdict(spec), "stats": stats}, indent=2))):
        tmp = temp_path(out / name)
        tmp.write_text(text)
        os.replace(tmp, out / name)


def load_cached(out: Path, spec: PairSpec) -> tuple[list[dict], dict] | None:
    """The cached pairs if OUT holds pairs built with `spec`; None if there are none; UserError if they differ."""
    rows, meta = out / "pairs.jsonl", out / "pairs.json"
    if not (rows.is_file() and meta.is_file()):
        return None
    saved = json.loads(meta.read_text())
    if saved["settings"] != asdict(spec):
        diff = {k: (v, asdict(spec)[k]) for k, v in saved["settings"].items() if asdict(spec).get(k) != v}
        raise UserError(f"{rows} was built with other settings {diff} (cached, wanted); use the same options, "
                        f"or delete {rows} and {meta}")
    return [json.loads(line) for line in rows.read_text().splitlines() if line], saved["stats"]
