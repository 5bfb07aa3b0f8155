"""Run a GGUF in llama.cpp (llama-cpp-python) and save what tests/test_engines.py compares; runs in the engine venv.

    LLAMA_CPP_VENV/bin/python engines/llama_cpp_run.py REQUEST.json OUT.npz

REQUEST.json: {"model": path, "n_ctx": int, "type_k": "f32" | "f16" | "q8_0" | "q4_1", "flash_attn": bool,
               "seqs": [[ids]], "full": int, "prompt": [ids], "new_tokens": int, "texts": [str]}
OUT.npz: top1_<i> (the argmax at every position of seqs[i]), logits (seqs[0]'s first `full` positions, float32),
         greedy (new_tokens argmax continuations of prompt, each fed back), text_ids_<i> (llama.cpp's tokenization of
         texts[i], special tokens parsed). llama.cpp's own log, with its KV cache report, goes to stderr.
Each sequence is evaluated from an empty cache, so every position reads its keys and values back from the cache.
"""

import json
import sys

import llama_cpp
import numpy as np

CACHE_TYPES = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
               "q4_1": llama_cpp.GGML_TYPE_Q4_1}


def main(request_path: str, out_path: str) -> None:
    req = json.load(open(request_path))
    kind = CACHE_TYPES[req["type_k"]]
    llm = llama_cpp.Llama(model_path=req["model"], n_ctx=req["n_ctx"], n_batch=req["n_ctx"], logits_all=True,
                          type_k=kind, type_v=kind, flash_attn=req["flash_attn"], verbose=True, seed=0)
    out = {}
    for i, ids in enumerate(req["seqs"]):
        llm.reset()
        llm.eval(ids)
        scores = llm.scores[: len(ids)]  # [T, V]
        out[f"top1_{i}"] = scores.argmax(-1).astype(np.int32)
        if i == 0:
            out["logits"] = scores[: req["full"]].astype(np.float32).copy()
    llm.reset()
    llm.eval(req["prompt"])
    greedy = []
    for _ in range(req["new_tokens"]):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        greedy.append(tok)
        llm.eval([tok])
    out["greedy"] = np.array(greedy, dtype=np.int32)
    for i, text in enumerate(req["texts"]):
        out[f"text_ids_{i}"] = np.array(llm.tokenize(text.encode(), add_bos=False, special=True), dtype=np.int32)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
