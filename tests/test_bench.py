"""`ecomla bench`: rows and their fields, cache bytes vs the formula, the caches each run decodes with
(absorbed == decompressed == full forward; the fair GQA baselines == transformers' caches), the max-batch search
(benchmarks/capacity.py), the attention rows (benchmarks/gpu_decode.py), the user errors; and the study runner
(benchmarks/study.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache

from benchmarks import capacity
from ecomla.bench.decode import DecodeOpts, time_decode, weight_bytes_read
from ecomla.bench.gqa_fair import PreallocKVLayer, packed_gqa_attention, packed_gqa_sdpa_attention
from ecomla.bench.run import BenchArgs, bench
from ecomla.bench.runs import RUNS, attention_implementation, fill_synthetic, prepare
from ecomla.bench.shapes import mla_config, parse_sizes, shape_config, synthetic_model
from ecomla.common import UserError
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.mla.cache import cache_stats

REQUIRED = {"model", "batch", "context", "tokens_per_s", "cache_bytes_per_token", "peak_memory_bytes", "path"}
TINY = dict(shape="tiny", kv_rank=8, rope_dim=8, warmup=1, steps=2, threads=1)
FAIR = {name: RUNS[name] for name in ("gqa-fair", "gqa-fair-sdpa")}


def tiny_models(dtype=torch.float32):
    src = shape_config("tiny")
    mla = synthetic_model(mla_config(src, kv_rank=8, rope_dim=6), dtype, "cpu", 0)
    return mla, synthetic_model(src, dtype, "cpu", 0), mla.config.mla_spec(0)


def test_the_fair_baselines_reach_transformers_only_when_a_run_uses_them():
    code = ("from ecomla.bench.run import BenchArgs, bench; import ecomla.bench.gqa_fair as g; "
            "from transformers import AttentionInterface as A; assert g.PACKED_GQA not in A._global_mapping; "
            "bench(BenchArgs(shape='tiny', kv_rank=8, rope_dim=8, contexts='8', batches='1', warmup=0, steps=1, "
            "runs='gqa-fair', threads=1)); assert g.PACKED_GQA in A._global_mapping")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_synthetic_shape_rows_and_cache_bytes_equal_formula(dtype, tmp_path, capsys):
    rows = bench(BenchArgs(**TINY, contexts="16,40", batches="1,3", dtype=dtype, json=True, out=str(tmp_path),
                           runs="absorbed,decompressed,gqa-dynamic,gqa-static,gqa-fair"))
    printed = json.loads(capsys.readouterr().out)
    assert [r["tokens_per_s"] for r in printed] == [r["tokens_per_s"] for r in rows]
    runs = {r["run"] for r in rows}
    assert runs == {"absorbed", "decompressed", "gqa-dynamic", "gqa-static", "gqa-fair"}
    assert len(rows) == 5 * 2 * 2
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    L, G, d_h = 2, 2, 16  # the tiny preset
    for r in rows:
        assert REQUIRED <= set(r) and r["status"] == "ok" and r["tokens_per_s"] > 0
        assert r["path"] in ("absorbed", "decompressed", "gqa")
        want = (8 + 8) * L * elem if r["system"] == "mla" else 2 * G * d_h * L * elem
        assert r["cache_bytes_per_token"] == want, r
        assert r["bytes_per_step"] == r["weight_bytes"] + r["batch"] * r["context"] * want
        assert r["cache_seq_len"] == r["context"] + 1 + 2  # filled, then warm-up + timed steps written in place
    mla = [r for r in rows if r["run"] == "absorbed"]
    assert all("speedup_vs_gqa-fair" in r for r in mla)
    assert {r["impl"] for r in mla} == ({"torch-gemm"} if dtype == "float32" else {"sdpa"})
    assert (tmp_path / "report.md").read_text().count("| mla |") == 2 * 2 * 2
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["context"] == 16
    assert (tmp_path / "tokens_per_s.png").stat().st_size > 0


def test_fill_modes_prefill_and_synthetic():
    mla, gqa, spec = tiny_models()
    for model, run in ((mla, RUNS["absorbed"]), (gqa, FAIR["gqa-fair"])):
        prepare(model, run, "cpu", torch.float32)
        pre = time_decode(model, run, 2, 12, DecodeOpts(warmup=0, steps=1, fill="prefill"), "cpu", torch.float32)
        syn = time_decode(model, run, 2, 12, DecodeOpts(warmup=0, steps=1, fill="synthetic"), "cpu", torch.float32)
        opts = DecodeOpts(warmup=0, steps=1, prefill_max_tokens=24)
        auto = time_decode(model, run, 4, 12, opts, "cpu", torch.float32)
        assert pre["fill"] == "prefill" and pre["prefill_s"] > 0
        assert syn["fill"] == "synthetic" and syn["prefill_s"] is None
        assert auto["fill"] == "synthetic"  # 4 * 12 tokens > 24
        assert pre["cache_bytes_per_token"] == syn["cache_bytes_per_token"]
        assert pre["cache_allocated_bytes"] == syn["cache_allocated_bytes"] > 0  # reserved once, written in place
    assert pre["cache_bytes_per_token"] == 2 * 2 * 16 * 2 * 4


@torch.inference_mode()
def test_absorbed_equals_decompressed_equals_full_forward_through_bench_caches():
    mla, _, spec = tiny_models()
    x = torch.randint(4, 128, (3, 14))
    full = mla(x, use_cache=False, mla_path="decompressed").logits
    got = {}
    impls = {}
    for name in ("absorbed", "absorbed-sdpa", "decompressed"):
        run = RUNS[name]
        impls[name] = (prepare(mla, run, "cpu", torch.float32), mla.decode_kernel())
        cache = run.cache(mla, 3, 14, torch.float32, "cpu")
        logits = [mla(x[:, :9], cache=cache).logits]  # decompressed prefill
        logits += [mla(x[:, t : t + 1], cache=cache, mla_path=run.path).logits for t in range(9, 14)]
        got[name] = torch.cat(logits, dim=1)
        assert cache.layers[0]._buf.shape == (3, 1, 14, spec.cache_elements)  # never re-allocated
    assert impls == {"absorbed": ("torch-gemm", "torch-gemm"), "absorbed-sdpa": ("sdpa", "sdpa"),
                     "decompressed": ("sdpa-decompressed", None)}  # the decompressed run drops the preparation
    for name, logits in got.items():
        assert torch.allclose(logits, full, atol=1e-5), (name, (logits - full).abs().max())


@torch.inference_mode()
def test_fair_gqa_run_equals_transformers_default():
    _, gqa, _ = tiny_models()
    x = torch.randint(4, 128, (2, 11))
    full = gqa(x).logits

    def decode(cache):
        logits = [gqa(x[:, :6], cache=cache).logits] + [gqa(x[:, t : t + 1], cache=cache).logits for t in range(6, 11)]
        return torch.cat(logits, 1)

    for cache in (DynamicCache(config=gqa.config), StaticCache(config=gqa.config, max_cache_len=11)):
        assert torch.allclose(decode(cache), full, atol=1e-5), type(cache).__name__
    for name, run in FAIR.items():
        with attention_implementation(gqa, run.attn_implementation):
            cache = run.cache(gqa, 2, 11, torch.float32, "cpu")
            assert torch.allclose(decode(cache), full, atol=1e-5), name
            assert isinstance(cache.layers[0], PreallocKVLayer) and cache.layers[0]._k.shape == (2, 2, 11, 16)
            with pytest.raises(ValueError, match="holds 11 tokens"):
                gqa(x[:, :1], cache=cache)
    assert gqa.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("dtype,fn,grad", [  # the GEMM branch (autograd / inference form) and the SDPA branch
    (torch.float32, packed_gqa_attention, True), (torch.float32, packed_gqa_attention, False),
    (torch.float64, packed_gqa_attention, False), (torch.float32, packed_gqa_sdpa_attention, False),
])
def test_packed_gqa_attention_equals_repeated_kv(dtype, fn, grad):
    B, H, G, S, d = 2, 6, 2, 9, 8
    q = torch.randn(B, H, 1, d, dtype=dtype)
    k, v = torch.randn(B, G, S, d, dtype=dtype), torch.randn(B, G, S, d, dtype=dtype)
    with torch.set_grad_enabled(grad):
        out, _ = fn(None, q, k, v, scaling=0.3)
    rep = lambda t: t.repeat_interleave(H // G, dim=1)  # noqa: E731  (head h uses KV head h // (H / G))
    want = torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v), scale=0.3).transpose(1, 2)
    assert out.shape == (B, 1, H, d) and torch.allclose(out, want, atol=1e-6)


def test_synthetic_fill_writes_context_rows_per_layer():
    mla, gqa, spec = tiny_models(torch.bfloat16)
    for model, run in ((mla, RUNS["absorbed"]), (gqa, RUNS["gqa-static"]), (gqa, RUNS["gqa-dynamic"])):
        cache = run.cache(model, 2, 40, torch.bfloat16, "cpu")
        fill_synthetic(cache, model.config, 2, 33, torch.bfloat16, "cpu", chunk_bytes=1000)  # many chunks
        assert cache.get_seq_length() == 33
        if run.name != "gqa-static":  # a static layer reports its full buffer length
            assert cache_stats(cache)["seq_len"] == 33


def test_weight_bytes_read_counts_tied_embedding_once_and_skips_untied_input_embedding():
    _, gqa, _ = tiny_models()
    total = sum(p.numel() * 4 for p in gqa.parameters())
    assert not gqa.config.tie_word_embeddings
    assert weight_bytes_read(gqa) == total - gqa.model.embed_tokens.weight.numel() * 4


def test_max_batch_search_is_exact_for_a_monotone_predicate():
    assert capacity.search(lambda b: b <= 37) == (37, 38, capacity.search(lambda b: b <= 37)[2])
    assert capacity.search(lambda b: False)[:2] == (0, 1)
    assert capacity.search(lambda b: True, cap=64)[:2] == (64, None)
    lo, hi, _ = capacity.search(lambda b: b <= 5000)
    assert lo <= 5000 < hi and hi - lo <= 50  # within 1%


def test_max_batch_at_equal_memory_favours_the_latent_cache(capsys):
    budget = 0.006  # GB: the tiny weights plus a few hundred KB of cache
    rows = capacity.main(["--shape", "tiny", "--kv-rank", "8", "--rope-dim", "8", "--warmup", "1", "--steps", "2",
                          "--threads", "1", "--contexts", "64", "--memory-budget-gb", str(budget)])
    assert "max batch" in capsys.readouterr().out
    cap = {r["run"]: r for r in rows if r["kind"] == "max_batch"}
    assert set(cap) == {"absorbed", "gqa-fair"}
    for r in cap.values():
        assert 0 < r["batch"] < r["batch_fails_at"]
        assert r["peak_memory_bytes"] <= budget * 1e9
        per_seq = (64 + 3) * r["cache_bytes_per_token"]  # rows reserved per sequence: context + warm-up + steps
        assert r["peak_memory_bytes"] + per_seq * (r["batch_fails_at"] - r["batch"]) > budget * 1e9
    assert cap["absorbed"]["batch"] > 3 * cap["gqa-fair"]["batch"]  # 16 vs 64 elements/token/layer


def test_converted_checkpoint_benchmarks_against_its_recorded_source(llama_dir, tmp_path):
    out = tmp_path / "mla"
    convert(ConvertArgs(src=str(llama_dir), out=str(out), kv_rank=8, rope_dim=8), log=lambda *_: None)
    rows = bench(BenchArgs(model=str(out), contexts="8", batches="2", warmup=0, steps=1, runs="absorbed,gqa-static"))
    assert {r["model"] for r in rows} == {str(out), str(llama_dir)}
    assert {r["weights"] for r in rows} == {"checkpoint"}
    # a GQA checkpoint is its own baseline, with random MLA attention of the given ranks
    rows = bench(BenchArgs(model=str(llama_dir), kv_rank=4, rope_dim=4, contexts="8", batches="1", warmup=0, steps=1,
                           runs="absorbed,gqa-static"))
    mla = next(r for r in rows if r["system"] == "mla")
    assert mla["weights"] == "source+random-mla" and mla["cache_bytes_per_token"] == (4 + 4) * 3 * 4


def test_user_errors(llama_dir):
    with pytest.raises(UserError, match="--shape"):
        bench(BenchArgs())
    with pytest.raises(UserError, match="not both"):
        bench(BenchArgs(model=str(llama_dir), shape="tiny"))
    with pytest.raises(UserError, match="own baseline"):
        bench(BenchArgs(model=str(llama_dir), baseline=str(llama_dir)))
    with pytest.raises(UserError, match="--contexts"):
        BenchArgs(shape="tiny", contexts="4x")
    with pytest.raises(UserError, match="--q-rank"):
        BenchArgs(shape="tiny", q_rank="half")
    with pytest.raises(UserError, match="unknown run"):
        bench(BenchArgs(shape="tiny", runs="absorbed,fast"))
    with pytest.raises(UserError, match="rope-dim"):
        bench(BenchArgs(shape="tiny", rope_dim=32))  # larger than the tiny head dim 16
    with pytest.raises(UserError, match="kv-rank"):
        bench(BenchArgs(shape="tiny", kv_rank=0, rope_dim=8))
    with pytest.raises(UserError, match="memory-budget-gb"):
        capacity.main(["--shape", "tiny", "--memory-budget-gb", "0"])
    assert parse_sizes("1k, 4K,512", "--contexts") == [1024, 4096, 512]


def test_cli_prints_json_rows(capsys):
    from ecomla.cli import main as cli

    code = cli(["bench", "--shape", "tiny", "--kv-rank", "8", "--rope-dim", "8", "--contexts", "8", "--batches", "1",
                "--runs", "absorbed,gqa-dynamic", "--warmup", "0", "--steps", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["absorbed", "gqa-dynamic"] and REQUIRED <= set(rows[0])
    assert cli(["bench", "--shape", "tiny", "--contexts", "0"]) == 2


def test_attention_microbench_rows_on_cpu():
    from benchmarks.gpu_decode import attention_rows, attention_table

    rows = attention_rows(batch=2, context=64, heads=9, latents=[(48, 24)], kv_heads=3, head_dim=64,
                          dtype=torch.float32, device="cpu", copy_gbps=10.0, iters=2)
    by = {(r["shape"], r["impl"]): r for r in rows}
    assert set(by) == {("mla 48+24", "sdpa-absorbed"), ("mla 48+24", "torch-gemm"), ("gqa 3x64", "sdpa-gqa")}
    assert by[("mla 48+24", "torch-gemm")]["max_abs_err_vs_sdpa"] < 1e-5
    assert by[("mla 48+24", "torch-gemm")]["bytes"] == 2 * 64 * (48 + 24) * 4
    assert by[("gqa 3x64", "sdpa-gqa")]["bytes"] == 2 * 2 * 3 * 64 * 64 * 4
    assert "torch-gemm" in attention_table(rows)


def test_repeats_keep_the_median_repeat_and_its_spread():
    from ecomla.bench.run import median_of_repeats

    base = {"kind": "decode", "system": "mla", "run": "absorbed", "batch": 8, "context": 4096, "status": "ok"}
    reps = [{**base, "step_ms": ms, "tokens_per_s": 8e3 / ms, "rep": i} for i, ms in enumerate([120.0, 90.0, 100.0])]
    other = {**base, "batch": 16, "step_ms": 150.0, "tokens_per_s": 16e3 / 150}
    out = median_of_repeats([reps[0], other, reps[1], reps[2]])
    assert out[1] == other  # one repeat of its setting: passed through, in first-seen order
    row = out[0]
    assert row["rep"] == 2 and row["step_ms"] == 100.0  # a measured repeat, not an average
    assert row["step_ms_repeats"] == [120.0, 90.0, 100.0] and row["repeats"] == 3  # in run order, for pairing
    assert row["tokens_per_s_min"] == pytest.approx(8e3 / 120) and row["tokens_per_s_max"] == pytest.approx(8e3 / 90)
    assert median_of_repeats([reps[0]]) == [reps[0]]  # one repeat: rows pass through unchanged


def test_speedup_with_repeats_is_the_median_paired_ratio():
    from ecomla.bench.report import add_speedups, table

    def row(system, run, steps):
        mid = sorted(steps)[1]
        return {"kind": "decode", "system": system, "run": run, "path": "gqa" if system == "gqa" else "absorbed",
                "batch": 8, "context": 4096, "step_ms": mid, "tokens_per_s": 8e3 / mid, "step_ms_repeats": steps}

    # the machine slows down in repeat 3: unpaired medians would claim 3x, each repeat measured 2x or 3x
    mla, gqa = row("mla", "absorbed", [100.0, 200.0, 100.0]), row("gqa", "gqa-fair", [200.0, 400.0, 300.0])
    add_speedups([mla, gqa])
    assert mla["speedup_vs_gqa-fair"] == pytest.approx(2.0)
    assert mla["speedup_vs_gqa-fair_range"] == [2.0, 3.0]
    assert "2.00 (2.00-3.00)" in table([mla, gqa]) and "x vs gqa-fair_range" not in table([mla, gqa])
    single = {k: v for k, v in mla.items() if not k.startswith(("speedup", "step_ms_repeats"))}
    add_speedups([single, {k: v for k, v in gqa.items() if k != "step_ms_repeats"}])
    assert single["speedup_vs_gqa-fair"] == pytest.approx(3.0)  # no repeats: the plain tokens/s ratio (300 / 100 ms)


def test_bench_with_repeats_reports_one_row_per_setting(capsys):
    rows = bench(BenchArgs(**TINY, contexts="16", batches="2", runs="absorbed,gqa-fair", repeats=3))
    assert [(r["run"], r["repeats"], len(r["step_ms_repeats"])) for r in rows] == [("absorbed", 3, 3), ("gqa-fair", 3, 3)]
    for r in rows:
        assert round(r["step_ms"], 3) == sorted(r["step_ms_repeats"])[1]
    assert "speedup_vs_gqa-fair" in rows[0] and "tok/s range" in capsys.readouterr().out
    with pytest.raises(UserError, match="--repeats"):
        BenchArgs(**TINY, repeats=0)


def test_both_fair_gqa_runs_report_their_formulation():
    rows = bench(BenchArgs(**TINY, contexts="16", batches="2", runs="absorbed,gqa-fair,gqa-fair-sdpa"))
    assert {r["run"]: r["impl"] for r in rows} == {
        "absorbed": "torch-gemm", "gqa-fair": "packed-gqa-gemm", "gqa-fair-sdpa": "packed-gqa-sdpa"}
    mla = next(r for r in rows if r["run"] == "absorbed")
    assert "speedup_vs_gqa-fair" in mla and "speedup_vs_gqa-fair-sdpa" in mla


def test_study_reads_a_recipe_as_the_cli_does():
    from benchmarks import study

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "distill-cpu-smollm2-4x.yaml")
    args = study.stage_args("distill", ["S", "--config", recipe, "--seq-len", "512"], "variant 'v'")
    assert args.max_minutes == 60 and args.max_tokens is None and args.seq_len == 512  # a flag overrides the recipe


def test_study_converts_distills_and_measures_variants_into_one_table_and_a_record(llama_dir, tmp_path, capsys):
    from benchmarks import study
    from tests.helpers import WORDS
    from tests.test_data_eval import chat_rows

    chat, text = tmp_path / "chat.jsonl", tmp_path / "text.txt"
    chat.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    text.write_text("\n\n".join([" ".join(WORDS)] * 30))
    flags = f"--tasks none --data {chat} --text {text} --max-tokens 64 --seq-len 16"
    kd = f"--stage kd --max-tokens 64 --seq-len 16 --batch-size 2 --data {chat} --precision fp32 --no-compile-loss"
    out, record, src = tmp_path / "study", tmp_path / "record.json", str(llama_dir)
    study.main(["--out", str(out), "--src", src, "--eval", flags, "--record", str(record),
                "--variant", "r8", "--kv-rank 8 --rope-dim 8", "--variant", "r8-kd", "--kv-rank 8 --rope-dim 8", kd])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["r8", "r8-kd"]
    assert rows[0]["kl_to_teacher"] > 0 and rows[0]["kv_bytes_per_token"] == 3 * (8 + 8) * 4  # L (r_kv + d_rope) fp32
    assert rows[0]["convert"] == "--kv-rank 8 --rope-dim 8" and rows[1]["distill"] == kd
    assert rows[1]["path"] != rows[0]["path"] and rows[1]["kl_to_teacher"] != rows[0]["kl_to_teacher"]
    assert len(list((out / "models").glob("convert-*"))) == 1  # r8 and r8-kd share their conversion
    printed = capsys.readouterr().out
    assert "| r8-kd |" in printed and printed.count("| r8") == 2 and (out / "table.md").is_file()
    rec = json.loads(record.read_text())
    assert set(rec) == {"command", "cpu", "commit", "date", "result"} and rec["result"] == rows
    assert rec["command"].startswith("python benchmarks/study.py --out")
    assert (out / "quality_vs_kv.png").stat().st_size > 0
    # a rerun through the API makes nothing again; a changed flag is refused before any work
    logs = []
    again = study.run_study([study.Variant("r8", convert=["--kv-rank", "8", "--rope-dim", "8"]),
                             study.Variant("r8-kd", convert=["--kv-rank", "8", "--rope-dim", "8"],
                                           distill=kd.split())], out, src=src, eval_flags=flags, log=logs.append)
    assert again == rows and all(line.startswith("[study] reuse") for line in logs), logs
    with pytest.raises(UserError, match="variant 'bad'"):
        bad = [study.Variant("new", convert=["--kv-rank", "4"]), study.Variant("bad", convert=["--kv-rnk", "4"])]
        study.run_study(bad, tmp_path / "refused", src=src, eval_flags=flags)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(UserError, match="exactly one of"):
        study.Variant("both", convert=["--kv-rank", "4"], model=src)
    calls = []  # a variant made by a callable (fit_ablation's FitChoice variants): built once, then reused

    def build(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    steps, model = study.plan(study.Variant("mine", build=build), src, tmp_path / "work")
    study.run_steps(steps, log=logs.append)
    study.run_steps(steps, log=logs.append)
    assert calls == [tmp_path / "work" / "build-mine"] == [Path(model)] and logs[-1].startswith("[study] reuse build")


def test_cache_bits_time_each_mla_run_at_each_width_with_the_bytes_of_its_rows():
    """`--cache-bits 16,4`: the 16-bit and the 4-bit latent cache, paired in one run (prefilled and synthetic)."""
    from ecomla.mla.quant import LatentFormat

    rows = bench(BenchArgs(**TINY, contexts="16,40", batches="2", runs="absorbed,gqa-static", cache_bits="16,4",
                           prefill_max_tokens=32))
    by_run = {(r["run"], r["context"]): r for r in rows}
    assert {r for r, _ in by_run} == {"absorbed-16bit", "absorbed-int4", "gqa-static"}
    assert {by_run["absorbed-int4", c]["fill"] for c in (16, 40)} == {"prefill", "synthetic"}
    for c in (16, 40):
        assert by_run["absorbed-16bit", c]["cache_bytes_per_token"] == 2 * (8 + 8) * 4
        assert by_run["absorbed-int4", c]["cache_bytes_per_token"] == 2 * LatentFormat.of(8, 8, 4).row_bytes == 2 * 16
        assert by_run["absorbed-int4", c]["cache_bits"] == 4 and "speedup_vs_gqa-static" in by_run["absorbed-int4", c]
