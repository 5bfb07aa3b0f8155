"""Decode-style fidelity through a KV cache (`ecomla eval --kv-cache`): the GQA baseline with transformers'
`QuantizedCache` (quanto, HQQ), the latent cache of MLA students, bytes read from the live cache, refusals.

The quanto / HQQ tests skip, with the reason, where those backends are not installed (`pip install 'ecomla[kvquant]'`).
"""

import json

import pytest
import torch
from transformers.utils import is_hqq_available, is_optimum_quanto_available

from ecomla.common import UserError
from ecomla.eval import kvcache
from ecomla.eval.fidelity import fidelity
from ecomla.eval.kvcache import KVCacheSpec, cache_at, check_runs, decode_hidden
from ecomla.mla.cache import cache_stats
from tests.helpers import MODEL_CLASSES, WORDS, assert_refused, tiny_config
from tests.test_mla import SPECS, tiny

QUANTO = pytest.mark.skipif(not is_optimum_quanto_available(),
                            reason="optimum-quanto is not installed: pip install 'ecomla[kvquant]'")
HQQ = pytest.mark.skipif(not is_hqq_available(), reason="hqq is not installed: pip install 'ecomla[kvquant]'")
B, T, WINDOW = 4, 24, 8  # the tiny llama: G = 2 KV heads, d_h = 16, 3 layers
CACHES = [  # each backend, both axes (per token, per channel), packed widths 1 / 2 / 4 bits, fp8's per-tensor scale
    pytest.param("quanto:4:group=16:window=8", marks=QUANTO),
    pytest.param("quanto:2:key_axis=-1:value_axis=-1:group=8:window=8", marks=QUANTO),
    pytest.param("hqq:4:axis=1:group=16:window=8", marks=HQQ),
    pytest.param("hqq:1:axis=1:group=16:window=8", marks=HQQ),
    pytest.param("hqq:2:group=16:window=8", marks=HQQ),
    "fp8",
]


def llama(seed: int):
    torch.manual_seed(seed)
    return MODEL_CLASSES["llama"](tiny_config("llama")).eval()


def blocks(vocab: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    return [{"input_ids": ids, "loss_mask": mask}]


def test_decoding_through_the_models_own_cache_equals_the_full_forward():
    """GQA with its DynamicCache, and an MLA student (hybrid: one layer kept as attention) with its latent cache."""
    mla = tiny([SPECS["lowrank-q"], None, SPECS["full-q"]], seed=1)
    cases = [(llama(1), llama(0), 128, 3 * 2 * 2 * 16 * 4),
             (mla, tiny([SPECS["lowrank-q"]] * 3, seed=0), 97, mla.config.kv_elements_per_token() * 4)]
    for model, teacher, vocab, per_token in cases:
        full = fidelity({"m": model}, teacher, blocks(vocab))["m"]
        got = fidelity({"m": model}, teacher, blocks(vocab), kv_cache=KVCacheSpec.parse("dynamic"))["m"]
        assert full["kl"] > 0.01
        for key in ("kl", "nll", "top1_agreement"):
            assert got[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), key
        kv = got["kv_cache"]
        assert kv["context"] == T and kv["window_tokens"] == 0
        assert kv["bytes_per_token"] == kv["bytes_per_token_no_window"] == per_token


def _kl(spec: str) -> float:
    """KL(full forward || decode-style through `spec`) of the tiny llama (through its own cache: ~1e-8, fp32 noise)."""
    model = llama(0)
    return fidelity({"m": model}, model, blocks(), kv_cache=KVCacheSpec.parse(spec))["m"]["kl"]


@pytest.mark.parametrize("spec", CACHES)
def test_the_gqa_baseline_decodes_through_each_quantized_cache(spec):
    assert 1e-6 < _kl(spec) < 1  # read back from the quantized store (through the model's own cache: ~1e-8)


@HQQ
def test_fewer_bits_cost_more():
    assert _kl("hqq:8:axis=1:group=16:window=8") < _kl("hqq:2:axis=1:group=16:window=8")


def _layer_bytes(spec: KVCacheSpec, stored: int, window: int, size: int = 4) -> int:
    """The backend's stated format for one layer (K and V): packed ints, one scale and one zero per group (one scale
    per tensor for fp8), and the window in full precision."""
    elements = B * 2 * stored * 16  # [B, G, S, d_h]
    if spec.backend == "fp8":
        return 2 * (elements + 4)
    groups = elements // (spec.q_group_size or 64)
    return 2 * (elements * spec.nbits // 8 + groups * 2 * size + B * 2 * window * 16 * size)


@pytest.mark.parametrize("spec", CACHES)
def test_live_cache_bytes_equal_the_backends_format_and_the_shortcut_reaches_the_decoded_state(spec):
    s = KVCacheSpec.parse(spec)
    model = llama(0)
    _, cache = decode_hidden(model, blocks()[0]["input_ids"], s)
    window = (T - 1) % WINDOW if s.backend != "fp8" else 0  # decoding flushes the window into the store as it fills
    stats = cache_stats(cache, batch=B)
    assert stats["window_tokens"] == window and stats["seq_len"] == T
    assert stats["live_bytes"] == 3 * _layer_bytes(s, T - window, window)
    assert stats["store_bytes_per_token"] * B * (T - window) == pytest.approx(3 * _layer_bytes(s, T - window, 0))
    short = cache_stats(cache_at(model, s, T, batch=B, dtype=torch.float32), batch=B)
    assert (short["live_bytes"], short["window_tokens"]) == (stats["live_bytes"], window)


def test_bad_specs_are_refused_in_one_line(llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ev"
    for spec, says in [("quanto:3", "quanto stores 2/4 bits"), ("hqq:4:axis=-1", "hqq quantizes along axis 0 or 1"),
                       ("hqq:4:rows=2", "unknown option 'rows=2'"), ("dynamic:4", "takes no bits"),
                       ("int4", "unknown cache"), ("hqq:4:group=x", "group must be an integer")]:
        assert_refused(["eval", str(llama_dir), "--kv-cache", spec, "--out", str(out)], capsys, monkeypatch,
                       f"--kv-cache {spec}: .*{says}", roots=(tmp_path,))
    monkeypatch.setitem(kvcache.BACKENDS["quanto"], "installed", lambda: False)
    with pytest.raises(UserError, match=r"--kv-cache quanto:4 needs optimum-quanto: pip install 'ecomla\[kvquant\]'"):
        KVCacheSpec.parse("quanto:4")


def test_caches_a_model_cannot_use_are_refused_before_decoding(llama_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match="--kv-cache fp8 does not fit this model: .*only supported for models with only "
                                        "full attention"):
        check_runs(KVCacheSpec.parse("fp8"), tiny([SPECS["full-q"]]), {2}, 8)
    if not is_optimum_quanto_available():
        pytest.skip("optimum-quanto is not installed: pip install 'ecomla[kvquant]'")
    chat, text = _data(tmp_path)
    # quanto's per-channel groups span B x G x tokens: 64 does not divide 2 rows x 2 KV heads x the first token
    assert_refused(["eval", str(llama_dir), "--kv-cache", "quanto:4:key_axis=-1", "--tasks", "none", "--data", str(chat),
                    "--text", str(text), "--max-tokens", "32", "--seq-len", "16", "--batch-size", "2",
                    "--out", str(tmp_path / "ev")], capsys, monkeypatch,
                   r"--kv-cache quanto:4:key_axis=-1: quanto refuses batch \d x 2 KV heads x 1 tokens \(Group size \(64\) "
                   r"must be a divisor of \(\d\)\); change group=", roots=(tmp_path,))


def _data(tmp_path):
    from tests.test_data_eval import chat_rows

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([" ".join(WORDS)] * 30))
    return chat, text


def test_eval_measures_the_teacher_itself_through_a_cache(llama_dir, tmp_path):
    from ecomla.cli import main

    chat, text = _data(tmp_path)
    spec = "quanto:2:group=16:window=4" if is_optimum_quanto_available() else "fp8"
    for kv, out in (("dynamic", tmp_path / "dyn"), (spec, tmp_path / "q")):
        assert main(["eval", str(llama_dir), "--teacher", str(llama_dir), "--kv-cache", kv, "--tasks", "none",
                     "--data", str(chat), "--text", str(text), "--max-tokens", "64", "--seq-len", "16",
                     "--out", str(out)]) == 0
    rows = [json.loads((o / "results.json").read_text())["models"] for o in (tmp_path / "dyn", tmp_path / "q")]
    assert [r["name"] for r in rows[1]] == ["teacher", "llama0"] and "kv_cache" not in rows[1][0]
    assert rows[1][0]["kl_to_teacher"] == 0 and rows[1][0]["ppl"] != rows[1][1]["ppl"]  # its full forward, apart
    dyn, q = rows[0][1], rows[1][1]
    assert dyn["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and dyn["kv_cache"]["spec"] == "dynamic"
    assert dyn["kv_cache"]["bytes_per_token"] == 3 * 2 * 2 * 16 * 4 and set(dyn["kv_cache"]["kl"]) == {"chat", "text"}
    floor = 1e-5 if spec.startswith("quanto") else 1e-6  # fp8 on a tiny model moves the KL by a few 1e-6
    assert q["kl_to_teacher"] > floor and q["kv_cache"]["kl"]["text"] > floor
    assert q["kv_cache"]["context"] == 16 and q["kv_cache"]["bytes_per_token_no_window"] < dyn["kv_cache"]["bytes_per_token"]


def test_the_frontier_measures_students_at_each_cache_width_on_the_baselines_tokens(llama_dir, tmp_path):
    """benchmarks/frontier.py: one row per width (a quantization-aware checkpoint at its own width only), the KL
    of what decoding over that cache reads, bytes from a live bf16 cache equal to the formula; points against the
    bf16 GQA cache; token counts that differ from the baselines' are refused."""
    from benchmarks import frontier
    from ecomla.cli import main
    from ecomla.io import load_model

    student, qat = tmp_path / "s", tmp_path / "s4"
    assert main(["convert", str(llama_dir), str(student), "--kv-rank", "8", "--rope-dim", "8"]) == 0
    m, _ = load_model(str(student))
    m.set_cache_bits(4).save_pretrained(qat)
    for f in student.glob("tokenizer*"):
        (qat / f.name).write_bytes(f.read_bytes())
    teacher, _ = load_model(str(llama_dir))
    batches = {c: blocks(vocab=teacher.config.vocab_size, seed=i) for i, c in enumerate(frontier.CORPORA)}
    rows = list(frontier.student_rows("s", str(student), [16, 8, 4], teacher, batches, done=set()))
    rows += list(frontier.student_rows("s4", str(qat), [16, 8, 4], teacher, batches, done=set()))
    assert [(r["student"], r["cache_bits"]) for r in rows] == [("s", 16), ("s", 8), ("s", 4), ("s4", 4)]
    assert rows[0]["chat"]["kl"] != rows[2]["chat"]["kl"] and rows[2]["chat"]["kl"] == rows[3]["chat"]["kl"]
    for r in rows:
        assert r["bytes_per_token"] == m.set_cache_bits(r["cache_bits"]).config.kv_bytes_per_token(2)
    assert list(frontier.student_rows("s", str(student), [16, 8], teacher, batches, done={("s", 16), ("s", 8)})) == []
    gqa = [{"spec": "hqq:2:axis=1", "bf16": {"bytes_per_token": 64.0},
            **{c: {"kl": 0.5, "tokens": rows[0][c]["tokens"]} for c in frontier.CORPORA}}]
    pts = frontier.points(gqa, rows, ref=384.0)
    assert [p["kind"] for p in pts].count("gqa") == 1 and all(p["kind"] == "0 tokens" for p in pts if p["kind"] != "gqa")
    assert {p["label"]: p["x"] for p in pts}["s4 int4"] == 384.0 / rows[3]["bytes_per_token"]
    with pytest.raises(SystemExit, match="give NAME=FOLDER pairs"):
        frontier.main(["--students", "s", "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()
    frontier.check_tokens(gqa, rows)
    gqa[0]["chat"]["tokens"] += 1
    with pytest.raises(SystemExit, match="chat target tokens differ"):
        frontier.check_tokens(gqa, rows)
    from ecomla.eval.report import plot_frontier

    assert plot_frontier(pts, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_the_eval_table_gives_the_bytes_ratio_beside_the_bytes():
    from ecomla.eval.report import table

    row = {"name": "s", "tasks": {}, "kv_bytes_per_token": 1800, "compression": 4.0, "bytes_compression": 12.8}
    assert "| s | 1800 | 12.80x smaller |" in table({"models": [row]})[2]  # a 4-bit 4x latent: bytes, not elements
