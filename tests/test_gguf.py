"""`ecomla export --format gguf` on tiny models: the llama.cpp deepseek2 file, read back with gguf.GGUFReader.

The real engine runs in tests/test_engines.py; here a few lines of torch compute what llama.cpp's deepseek2 graph
computes from the file (src/models/deepseek2.cpp: absorbed MLA as MQA over the latent, adjacent-pair RoPE, one
RMSNorm eps), so the key and tensor conventions are checked on every run.
"""

import json
import re
import math
import shutil

import gguf
import pytest
import torch

from ecomla.common import UserError
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.export.export import ExportArgs, deepseek_state_dict, export
from ecomla.export.llama_cpp import split_kv_b
from ecomla.io import load_model
from ecomla.mla import deepseek
from tests.helpers import BPE_VOCAB, make_bpe_tokenizer, make_source, make_tokenizer
from tests.test_data_eval import chat_rows

QUIET = dict(log=lambda *a: None)
X = torch.randint(4, BPE_VOCAB, (24,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny Llamas with a byte-level BPE tokenizer, eps 1e-5 (a fold in the export), tied and untied, and chat data."""
    r = tmp_path_factory.mktemp("gguf")
    for name, tied in (("tied", True), ("untied", False)):
        make_source("llama", r / name, tokenizer=make_bpe_tokenizer, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    (r / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in chat_rows(200)))
    return r


@pytest.fixture(scope="module")
def mla(root, tmp_path_factory):
    """One converted model per (source, q rank), shared by the tests of this module."""
    made = {}

    def get(src="tied", q_rank="auto"):
        if (src, q_rank) not in made:
            out = tmp_path_factory.mktemp("mla") / f"{src}-{q_rank}"
            convert(ConvertArgs(src=str(root / src), out=str(out), kv_rank=8, rope_dim=4, init="rope-whitened",
                                q_rank=q_rank, calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16,
                                target="deepseek-v3"), **QUIET)
            made[src, q_rank] = out
        return made[src, q_rank]
    return get


def to_gguf(model, out, dtype="float32") -> gguf.GGUFReader:
    export(ExportArgs(model=str(model), out=str(out), format="gguf", dtype=dtype), **QUIET)
    return gguf.GGUFReader(out / "model.gguf")


def field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def tensors(r: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.astype("float32").copy()) for t in r.tensors}


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_adjacent(x, base, pos):
    """llama.cpp's normal RoPE: dims (2j, 2j+1) rotate by pos * base^(-2j/d). x: [T, ..., d]."""
    d = x.shape[-1]
    ang = pos[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [T, d/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = ang.cos().float().view(shape), ang.sin().float().view(shape)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def llama_cpp_logits(r: gguf.GGUFReader, ids: torch.Tensor) -> torch.Tensor:
    """What llama.cpp's deepseek2 graph computes from this file (absorbed MLA), in float32. ids: [T] -> [T, V]."""
    W, k = tensors(r), lambda key: field(r, f"deepseek2.{key}")
    eps, base, H = k("attention.layer_norm_rms_epsilon"), k("rope.freq_base"), k("attention.head_count")
    r_kv, d_rope, d_k = k("attention.kv_lora_rank"), k("rope.dimension_count"), k("attention.key_length_mla")
    T = ids.numel()
    pos, causal = torch.arange(T, dtype=torch.float64), torch.ones(T, T).tril().bool()
    x = W["token_embd.weight"][ids]  # [T, D]
    for i in range(k("block_count")):
        w = {n.split(".", 2)[2].removesuffix(".weight"): v for n, v in W.items() if n.startswith(f"blk.{i}.")}
        h = rms(x, w["attn_norm"], eps)
        q = (rms(h @ w["attn_q_a"].T, w["attn_q_a_norm"], eps) @ w["attn_q_b"].T if "attn_q_a" in w
             else h @ w["attn_q"].T).view(T, H, d_k)
        kv = h @ w["attn_kv_a_mqa"].T  # [T, r_kv + d_rope]
        c, k_pe = rms(kv[:, :r_kv], w["attn_kv_a_norm"], eps), rope_adjacent(kv[:, r_kv:], base, pos)
        q_pe = rope_adjacent(q[..., d_k - d_rope:], base, pos)  # [T, H, d_rope]
        q_abs = torch.einsum("thn,hrn->thr", q[..., :d_k - d_rope], w["attn_k_b"])  # [T, H, r_kv]
        s = (torch.einsum("thr,sr->hts", q_abs, c) + torch.einsum("thp,sp->hts", q_pe, k_pe)) / math.sqrt(d_k)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)  # [H, T, S]
        o = torch.einsum("hts,sr,hvr->thv", p, c, w["attn_v_b"]).reshape(T, -1)
        x = x + o @ w["attn_output"].T
        h = rms(x, w["ffn_norm"], eps)
        x = x + (torch.nn.functional.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return rms(x, W["output_norm.weight"], eps) @ W["output.weight"].T


TIED_Q_UNTIED_NO_Q = [("tied", "auto"), ("untied", "none")]  # both sources and both query shapes, two conversions


@pytest.mark.parametrize("src, q_rank", TIED_Q_UNTIED_NO_Q)
def test_gguf_holds_the_keys_and_tensors_llama_cpp_reads(mla, tmp_path, src, q_rank):
    model = mla(src, q_rank)
    r = to_gguf(model, tmp_path / "g")
    cfg = load_model(str(model))[0].config
    spec, L, H, D = cfg.mla_spec(0), cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    r_kv, d_rope, d_nope, d_v = spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_nope_head_dim, spec.v_head_dim
    r_q = spec.q_lora_rank or 0
    assert (q_rank == "none") == (r_q == 0)
    want = {"general.architecture": "deepseek2", "deepseek2.attention.q_lora_rank": r_q,
            "deepseek2.attention.kv_lora_rank": r_kv, "deepseek2.attention.key_length": r_kv + d_rope,
            "deepseek2.attention.value_length": r_kv, "deepseek2.attention.key_length_mla": d_nope + d_rope,
            "deepseek2.attention.value_length_mla": d_v, "deepseek2.attention.head_count": H,
            "deepseek2.attention.head_count_kv": 1, "deepseek2.leading_dense_block_count": L,
            "deepseek2.block_count": L, "deepseek2.expert_feed_forward_length": cfg.intermediate_size,
            "deepseek2.expert_shared_count": 0, "deepseek2.rope.dimension_count": d_rope,
            "deepseek2.vocab_size": BPE_VOCAB, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    assert {key: field(r, key) for key in want} == want
    assert not [key for key in r.fields if "expert_count" in key or "expert_group" in key or "rope.scaling" in key]
    assert field(r, "deepseek2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "<|im_start|>" in field(r, "tokenizer.chat_template")
    q = {"attn_q_a": [D, r_q], "attn_q_a_norm": [r_q], "attn_q_b": [r_q, H * (d_nope + d_rope)]} if r_q else \
        {"attn_q": [D, H * (d_nope + d_rope)]}
    per_layer = {**q, "attn_norm": [D], "attn_kv_a_mqa": [D, r_kv + d_rope], "attn_kv_a_norm": [r_kv],
                 "attn_k_b": [d_nope, r_kv, H], "attn_v_b": [r_kv, d_v, H], "attn_output": [H * d_v, D],
                 "ffn_norm": [D], "ffn_gate": [D, cfg.intermediate_size], "ffn_up": [D, cfg.intermediate_size],
                 "ffn_down": [cfg.intermediate_size, D]}
    expected = {"token_embd.weight": [D, BPE_VOCAB], "output_norm.weight": [D], "output.weight": [D, BPE_VOCAB],
                **{f"blk.{i}.{n}.weight": s for i in range(L) for n, s in per_layer.items()}}
    assert {t.name: [int(n) for n in t.shape] for t in r.tensors} == expected  # ggml order: fastest dim first


def test_tokenizer_is_embedded_as_the_source_tokenizes(mla, tmp_path):
    r = to_gguf(mla(), tmp_path / "g")
    tok = make_bpe_tokenizer()
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
    assert tokens == tok.convert_ids_to_tokens(list(range(BPE_VOCAB)))
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[4:]) == {gguf.TokenType.NORMAL}
    merges = r.fields["tokenizer.ggml.merges"]
    spec = json.loads(tok.backend_tokenizer.to_str())
    assert [bytes(merges.parts[i]).decode() for i in merges.data] == [" ".join(m) for m in spec["model"]["merges"]]


@pytest.mark.parametrize("src, q_rank", TIED_Q_UNTIED_NO_Q)
def test_llama_cpps_computation_on_the_file_reproduces_ecomla(mla, tmp_path, src, q_rank):
    model = mla(src, q_rank)
    r = to_gguf(model, tmp_path / "g")
    ours = load_model(str(model), dtype="float32")[0]
    with torch.no_grad():
        want = ours(X[None]).logits[0]
    got = llama_cpp_logits(r, X)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_k_b_and_v_b_rebuild_kv_b_proj_and_weights_are_the_deepseek_exports(mla, tmp_path):
    model = mla()
    W = tensors(to_gguf(model, tmp_path / "g"))
    m = load_model(str(model), dtype="float32")[0]
    sd, _ = deepseek_state_dict(m)
    spec, H = m.config.mla_spec(0), m.config.num_attention_heads
    for i in range(m.config.num_hidden_layers):
        k_b, v_b = W[f"blk.{i}.attn_k_b.weight"], W[f"blk.{i}.attn_v_b.weight"]  # [H, r_kv, d_nope], [H, d_v, r_kv]
        rebuilt = torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(-1, spec.kv_lora_rank)
        assert torch.equal(rebuilt, sd[f"model.layers.{i}.self_attn.kv_b_proj.weight"])
        kv_a = sd[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"]
        assert torch.equal(W[f"blk.{i}.attn_kv_a_mqa.weight"], kv_a)
    assert torch.equal(W["output.weight"], sd["lm_head.weight"])
    kv_b = torch.randn(H * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)
    k_b, v_b = split_kv_b(kv_b, H, spec.qk_nope_head_dim, spec.v_head_dim)
    assert torch.equal(torch.cat([k_b.transpose(1, 2), v_b], 1).reshape(kv_b.shape), kv_b)


def test_float16_writes_f16_matrices_and_f32_norms(mla, tmp_path):
    r = to_gguf(mla(), tmp_path / "g", dtype="float16")
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["blk.0.attn_k_b.weight"] == kinds["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_kv_a_norm.weight"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.parametrize("style, pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2")])
def test_llama_3_and_qwen2_tokenizers_are_written_with_their_pre_tokenizer(mla, tmp_path, style, pre):
    shutil.copytree(mla(), tmp_path / "mla")
    tok = make_bpe_tokenizer(style=style)
    tok.save_pretrained(tmp_path / "mla")
    r = to_gguf(tmp_path / "mla", tmp_path / "g")
    assert field(r, "tokenizer.ggml.pre") == pre
    f = r.fields["tokenizer.ggml.tokens"]
    assert [bytes(f.parts[i]).decode() for i in f.data] == tok.convert_ids_to_tokens(list(range(BPE_VOCAB)))


@pytest.mark.parametrize("change", ["llama3 pattern without ignore_merges", "qwen2 pattern with ignore_merges",
                                    "another split pattern", "a prefix space"])
def test_a_split_pre_tokenizer_llama_cpp_would_split_differently_is_refused(mla, tmp_path, change):
    shutil.copytree(mla(), tmp_path / "mla")
    tok = make_bpe_tokenizer(style="qwen2" if change.startswith("qwen2") else "llama3")
    spec = json.loads(tok.backend_tokenizer.to_str())
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    if "ignore_merges" in change:
        spec["model"]["ignore_merges"] = not spec["model"]["ignore_merges"]
    elif change == "another split pattern":
        split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(r"\p{N}{1,3}", r"\p{N}{1,2}")
    else:
        byte_level["add_prefix_space"] = True
    (tmp_path / "mla" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizer is not one the GGUF export writes.*Llama-3's or Qwen2's"):
        export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / "g"), format="gguf"), **QUIET)
    assert not (tmp_path / "g").exists()


def test_the_export_names_llama_cpps_cache_type_for_a_model_trained_with_a_quantized_latent(mla, tmp_path):
    shutil.copytree(mla(), tmp_path / "mla")
    lines = []
    export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / "g16"), format="gguf"), log=lines.append)
    assert "trained for" not in "\n".join(lines)
    for bits, says in ((8, "--cache-type-k q8_0"), (4, "q4_1 has its size .* but does not reproduce it")):
        config = json.loads((tmp_path / "mla" / "config.json").read_text())
        (tmp_path / "mla" / "config.json").write_text(json.dumps({**config, "cache_bits": bits}))
        lines = []
        export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / f"g{bits}"), format="gguf"), log=lines.append)
        assert re.search(f"trained for an? {bits}-bit latent cache: .*{says}", "\n".join(lines))


def test_q8_0_writes_whole_block_matrices_in_q8_0_within_half_a_step(mla, tmp_path):
    r32, r8 = to_gguf(mla(), tmp_path / "f32"), to_gguf(mla(), tmp_path / "q8", dtype="q8_0")
    assert field(r8, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    want = {t.name: torch.from_numpy(t.data.copy()) for t in r32.tensors}
    kinds = set()
    for t in r8.tensors:
        kind = t.tensor_type
        kinds.add(kind)
        if len(t.shape) == 1:
            assert kind == gguf.GGMLQuantizationType.F32
            continue
        w = want[t.name]
        assert kind == (gguf.GGMLQuantizationType.Q8_0 if w.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, kind).copy()).reshape(w.shape).float()
        step = w.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127 if kind == gguf.GGMLQuantizationType.Q8_0 \
            else w.reshape(-1, 1).abs() / 1024
        # half a step, plus the scale's own fp16 rounding (up to 127 codes x 2^-11 of a step)
        # (F16: 2^-11 relative, and fp16's subnormal spacing, 6e-8, near zero)
        assert ((got - w).reshape(step.shape[0], -1).abs() <= 0.57 * step + 6e-8).all(), t.name
    assert gguf.GGMLQuantizationType.Q8_0 in kinds and gguf.GGMLQuantizationType.F16 in kinds  # both paths seen
    with pytest.raises(UserError, match="--dtype q8_0 is a GGUF block type; use it with --format gguf"):
        ExportArgs(model=str(mla()), out=str(tmp_path / "ds"), format="deepseek-v3", dtype="q8_0")


def test_a_word_level_tokenizer_is_refused_before_anything_is_written(mla, tmp_path):
    shutil.copytree(mla(), tmp_path / "mla")
    make_tokenizer().save_pretrained(tmp_path / "mla")  # the tests' WordLevel tokenizer: llama.cpp has no such model
    with pytest.raises(UserError, match="tokenizer is not one the GGUF export writes.*--format deepseek-v3"):
        export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / "g"), format="gguf"), **QUIET)
    assert not (tmp_path / "g").exists()


def test_llama_cpp_reads_27_layers_as_lite_without_a_query_latent(mla):
    cfg = load_model(str(mla()))[0].config
    assert deepseek.llama_cpp_problems(cfg) == []
    cfg.num_hidden_layers = 27
    assert "--q-rank none" in deepseek.llama_cpp_problems(cfg)[0]
    cfg.mla_layers = [dict(s, q_lora_rank=None) for s in cfg.mla_layers]
    assert deepseek.llama_cpp_problems(cfg) == []
