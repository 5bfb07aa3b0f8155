"""Every bad input gets one `ecomla STAGE: error:` line (exit 2), before any forward pass, with nothing written.

One table: (argv builder, regex the error line must match). A builder takes `P` (the paths below) and returns the
argv; `assert_refused` (tests/helpers.py) runs it in-process and checks exit code, the single error line, no
traceback, no nn.Module forward pass and every file under the test's folders byte-identical.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ecomla.cli import main
from ecomla.common import UserError
from ecomla.convert.convert import ConvertArgs, convert
from tests.helpers import assert_refused

LONG = " ".join(["the cat sat on the mat"] * 50)  # 300 tokens: past the tiny models' 256 positions


def _edit_config(folder: Path, **changes) -> None:
    """Set (value) or drop (None) fields of folder/config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def _write(path: Path, data) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


@pytest.fixture(scope="module")
def P(llama_dir, tmp_path_factory):
    """The tiny source and MLA models, broken copies of them, recipe files and output folders (never created)."""
    root = tmp_path_factory.mktemp("bad")
    mla = root / "mla"
    convert(ConvertArgs(src=str(llama_dir), out=str(mla), kv_rank=16, rope_dim=8), log=lambda *a: None)
    weights = (llama_dir / "model.safetensors").read_bytes()
    st = lambda data: lambda d: (d / "model.safetensors").write_bytes(data)  # noqa: E731
    models = {
        "truncated": st(weights[: len(weights) // 2]),
        "garbage": st(b"this is not a safetensors file" * 40),
        "empty_weights": st(b""),
        "one_byte_short": st(weights[:-1]),
        "not_json": lambda d: _write(d / "config.json", '{"model_type": "llama", '),
        "json_list": lambda d: _write(d / "config.json", "[1, 2, 3]"),
        "binary_config": lambda d: _write(d / "config.json", weights[:400]),
        "no_heads": lambda d: _edit_config(d, num_attention_heads=None, num_key_value_heads=None),
        "no_hidden": lambda d: _edit_config(d, hidden_size=None),
        "no_kv_heads": lambda d: _edit_config(d, num_key_value_heads=None),  # MHA by default: mis-shaped K/V
        "unknown_type": lambda d: _edit_config(d, model_type="nosuchmodel"),
        "no_config": lambda d: (d / "config.json").unlink(),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
    }
    paths = {name: _copy(llama_dir, root / name, edit) for name, edit in models.items()}
    paths["bad_spec"] = _copy(mla, root / "bad_spec", lambda d: _edit_config(
        d, mla_layers=[dict(json.loads((d / "config.json").read_text())["mla_layers"][0], kv_lora_rank=0)] * 3))
    paths["bad_bits"] = _copy(mla, root / "bad_bits", lambda d: _edit_config(d, cache_bits=3))
    paths["no_nope"] = _copy(mla, root / "no_nope", lambda d: _edit_config(  # export reads only config.json first
        d, mla_layers=[dict(json.loads((d / "config.json").read_text())["mla_layers"][0], qk_rope_head_dim=16,
                            qk_nope_head_dim=0, latent_norm=True)] * 3))
    dsv3 = dict(json.loads((mla / "config.json").read_text())["mla_layers"][0], latent_norm=True)  # a format's shape
    paths["word_level"] = _copy(mla, root / "word_level", lambda d: _edit_config(d, mla_layers=[dsv3] * 3))
    paths["lite27"] = _copy(mla, root / "lite27", lambda d: _edit_config(  # llama.cpp reads 27 layers as V2-Lite
        d, num_hidden_layers=27, mla_layers=[dsv3] * 27, layer_types=None))
    paths["mla_no_source"] = _copy(mla, root / "mla_no_source", lambda d: (d / "ecomla_convert.json").unlink())
    yamls = {"binary": weights[:300], "broken": "a: [1\n", "list": "- a\n- b\n", "scalar": "just some text\n",
             "int_keys": "1: 2\n", "unknown_key": "nosuch: 1\n", "int_type": "max_new_tokens: lots\n",
             "bool_type": "chat: 'yes'\n", "bad_choice": "dtype: float8\n", "null_value": "max_new_tokens:\n",
             "ratio_number": "ratio: 4\n", "float_for_int": "batch_size: 2.5\n", "bad_limit": "limit: nosuch=3\n",
             "retired": "kv_balance: true\n"}
    for name, text in yamls.items():
        paths[f"yaml_{name}"] = _write(root / f"{name}.yaml", text)
    paths["file"] = _write(root / "weights.bin", weights[:100])
    return SimpleNamespace(root=root, src=llama_dir, mla=mla, out=None, **paths)


def _argv(P, args) -> list[str]:
    return [a(P) if callable(a) else a for a in args]


def gen(*a):
    return lambda P: ["generate", str(P.mla), "--max-new-tokens", "2", *_argv(P, a)]


def ev(*a):
    return lambda P: ["eval", str(P.mla), "--out", str(P.out), *_argv(P, a)]


def dist(*a):
    return lambda P: ["distill", str(P.mla), "--out", str(P.out), *_argv(P, a)]


def bench(*a):
    return lambda P: ["bench", *_argv(P, a)]


def demo(*a):
    return lambda P: ["demo", "--model", str(P.src), "--out", str(P.out), *_argv(P, a)]


def conv(*a):
    return lambda P: ["convert", str(P.src), str(P.out), "--kv-rank", "16", "--rope-dim", "8", *_argv(P, a)]


def path(name):
    return lambda P: str(getattr(P, name))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = [
    # ---- loading a model: the file that is broken is named ------------------------------------------------------
    pytest.param(lambda P: ["generate", str(P.truncated), "--prompt", "hi"], r"truncated/model\.safetensors is not a "
                 r"complete safetensors file", id="load-truncated-safetensors"),
    pytest.param(lambda P: ["generate", str(P.one_byte_short), "--prompt", "hi"], r"model\.safetensors is not a "
                 r"complete", id="load-safetensors-one-byte-short"),
    pytest.param(lambda P: ["generate", str(P.garbage), "--prompt", "hi"], r"garbage/model\.safetensors is not a "
                 r"complete", id="load-garbage-safetensors"),
    pytest.param(lambda P: ["eval", str(P.empty_weights), "--tasks", "none", "--out", str(P.out)],
                 r"empty_weights/model\.safetensors is not a complete", id="load-empty-safetensors"),
    pytest.param(lambda P: ["info", str(P.not_json)], r"not_json/config\.json is not valid JSON",
                 id="load-config-not-json"),
    pytest.param(lambda P: ["generate", str(P.binary_config), "--prompt", "hi"], r"config\.json is not valid JSON",
                 id="load-config-binary"),
    pytest.param(lambda P: ["info", str(P.json_list)], r"config\.json must hold a JSON object",
                 id="load-config-json-list"),
    pytest.param(lambda P: ["info", str(P.no_heads)], r"no_heads/config\.json lacks num_attention_heads",
                 id="info-config-missing-head-counts"),
    pytest.param(lambda P: ["generate", str(P.no_heads), "--prompt", "hi"], r"config\.json lacks num_attention_heads",
                 id="generate-config-missing-head-counts"),
    pytest.param(lambda P: ["bench", str(P.no_hidden), "--contexts", "8"], r"config\.json lacks hidden_size",
                 id="bench-config-missing-hidden-size"),
    pytest.param(lambda P: ["generate", str(P.no_kv_heads), "--prompt", "hi"], r"do not match config\.json.*k_proj",
                 id="load-weights-do-not-match-config"),
    pytest.param(lambda P: ["info", str(P.unknown_type)], r"could not load .*unknown_type",
                 id="load-unknown-model-type"),
    pytest.param(lambda P: ["info", str(P.bad_spec)], r"could not load .*kv_lora_rank", id="load-mla-spec-rank-zero"),
    pytest.param(lambda P: ["info", str(P.file)], r"is a file", id="load-model-is-a-file"),
    pytest.param(lambda P: ["generate", str(P.root / "nosuch"), "--prompt", "hi"], r"no such folder",
                 id="load-missing-folder"),
    pytest.param(lambda P: ["info", str(P.no_config)], r"has no config\.json", id="load-folder-without-config"),
    pytest.param(lambda P: ["generate", str(P.no_weights), "--prompt", "hi"], r"has no weights",
                 id="load-folder-without-weights"),
    pytest.param(ev("--teacher", "/nonexistent/teacher", "--tasks", "none"), r"no such folder",
                 id="eval-teacher-missing"),
    # ---- generate -----------------------------------------------------------------------------------------------
    pytest.param(gen("--prompt", ""), r"--prompt number 1 of 1 is empty", id="generate-empty-prompt"),
    pytest.param(gen("--prompt", "hi", "--prompt", ""), r"--prompt number 2 of 2 is empty",
                 id="generate-empty-prompt-in-batch"),
    pytest.param(gen("--prompt", "   "), r"--prompt number 1 of 1 is empty", id="generate-blank-prompt"),
    pytest.param(gen(), r"give at least one --prompt", id="generate-no-prompt"),
    pytest.param(gen("--prompt", "hi", "--dtype", "float8"), r"--dtype 'float8': choose from",
                 id="generate-dtype-float8"),
    pytest.param(gen("--prompt", "hi", "--max-new-tokens", "0"), r"--max-new-tokens must be >= 1",
                 id="generate-max-new-tokens-zero"),
    pytest.param(gen("--prompt", "hi", "--max-new-tokens", "-3"), r"--max-new-tokens must be >= 1",
                 id="generate-max-new-tokens-negative"),
    pytest.param(gen("--prompt", LONG), r"--prompt number 1 is 300 tokens, longer than the model's 256 positions",
                 id="generate-prompt-over-positions"),
    pytest.param(gen("--prompt", "hi", "--prompt", LONG), r"--prompt number 2 is 300 tokens",
                 id="generate-second-prompt-over-positions"),
    pytest.param(gen("--prompt", LONG[:600], "--max-new-tokens", "200"), r"--max-new-tokens 200: .*leaves room for",
                 id="generate-prompt-plus-new-tokens-over-positions"),
    # ---- eval: tasks and limits are checked before any model is loaded -------------------------------------------
    pytest.param(ev("--tasks", "foobar"), r"--tasks: 'foobar'", id="eval-unknown-task"),
    pytest.param(ev("--tasks", "piqa,foobar"), r"--tasks: 'foobar'", id="eval-unknown-task-in-list"),
    pytest.param(ev("--tasks", "race"), r"--tasks: 'race' is not shipped", id="eval-task-not-offline"),
    pytest.param(ev("--tasks", "piqa", "--limit", "nosuch=3"), r"--limit 'nosuch=3': unknown task 'nosuch'",
                 id="eval-limit-unknown-task"),
    pytest.param(ev("--limit", "lots"), r"--limit 'lots': use N or task=N", id="eval-limit-not-a-number"),
    pytest.param(ev("--limit", "0"), r"--limit '0': .*N >= 1", id="eval-limit-zero"),
    pytest.param(ev("--limit", "piqa=-3"), r"--limit 'piqa=-3'", id="eval-limit-negative"),
    pytest.param(ev("--limit", "piqa="), r"--limit 'piqa='", id="eval-limit-empty-count"),
    pytest.param(ev("--names", "a,b"), r"--names has 2 names for 1 models", id="eval-names-count"),
    pytest.param(lambda P: ["eval", str(P.mla), str(P.mla), "--out", str(P.out)], r"both be named 'mla'.*--names",
                 id="eval-duplicate-names"),
    pytest.param(ev("--batch-size", "0"), r"--batch-size must be >= 1", id="eval-batch-size-zero"),
    pytest.param(ev("--seq-len", "4"), r"--seq-len >= 8", id="eval-seq-len-too-small"),
    pytest.param(ev("--max-tokens", "0"), r"--max-tokens must be >= 1", id="eval-max-tokens-zero"),
    pytest.param(ev("--dtype", "float8"), r"--dtype 'float8'", id="eval-dtype-float8"),
    # ---- bench: contexts against positions, batch x context against memory, before a model is built ------------
    pytest.param(bench(path("mla"), "--contexts", "100000k"), r"--contexts 102400000: .* has 256 positions; use "
                 r"contexts <= 256", id="bench-context-over-positions"),
    pytest.param(bench(path("src"), "--kv-rank", "8", "--rope-dim", "8", "--contexts", "300"), r"256 positions",
                 id="bench-gqa-context-over-positions"),
    pytest.param(bench(path("mla"), "--contexts", "8", "--batches", "10000000000"), r"--batches 10000000000 at context "
                 r"8: .*largest batch that fits at that context is \d+", id="bench-batch-over-memory"),
    pytest.param(bench("--shape", "llama-3.1-8b", "--kv-rank", "64", "--rope-dim", "32", "--contexts", "100k",
                       "--batches", "1000000", "--device", "cpu"), r"--batches 1000000 at context 102400",
                 id="bench-synthetic-batch-over-memory"),
    pytest.param(bench("--shape", "tiny", "--contexts", "0"), r"--contexts '0'", id="bench-contexts-zero"),
    pytest.param(bench("--shape", "tiny", "--contexts", "4x"), r"--contexts '4x'", id="bench-contexts-garbage"),
    pytest.param(bench("--shape", "tiny", "--batches", "-1"), r"--batches '-1'", id="bench-batches-negative"),
    pytest.param(bench("--shape", "tiny", "--steps", "0"), r"--steps and --repeats >= 1", id="bench-steps-zero"),
    pytest.param(bench("--shape", "tiny", "--threads", "0"), r"--threads must be >= 1", id="bench-threads-zero"),
    pytest.param(bench("--shape", "tiny", "--runs", "nosuch"), r"--runs: unknown run", id="bench-unknown-run"),
    pytest.param(bench("--shape", "tiny", "--kv-rank", "0", "--rope-dim", "8"), r"--kv-rank must be >= 1, got 0",
                 id="bench-kv-rank-zero"),
    pytest.param(bench("--shape", "tiny", "--kv-rank", "8", "--rope-dim", "3"), r"positive even number",
                 id="bench-rope-dim-odd"),
    pytest.param(bench("--shape", "tiny", "--rope-dim", "64"), r"--rope-dim 64 is larger than the source head dim",
                 id="bench-rope-dim-over-head-dim"),
    pytest.param(bench("--shape", "tiny", "--q-rank", "lots"), r"--q-rank must be", id="bench-q-rank-garbage"),
    pytest.param(bench(path("mla"), "--shape", "tiny"), r"give MODEL or --shape, not both", id="bench-model-and-shape"),
    pytest.param(bench(), r"give MODEL", id="bench-no-model"),
    pytest.param(bench(path("mla_no_source"), "--contexts", "8"), r"pass --baseline", id="bench-mla-without-source"),
    pytest.param(bench(path("src"), "--baseline", path("src")), r"is its own baseline", id="bench-baseline-for-gqa"),
    pytest.param(bench(path("mla"), "--baseline", path("truncated"), "--contexts", "8"), r"truncated/model\."
                 r"safetensors is not a complete", id="bench-corrupt-baseline"),
    pytest.param(bench("--shape", "tiny", "--device", "cuda"), r"no CUDA device", id="bench-cuda-missing",
                 marks=NO_CUDA),
    # ---- demo: every flag a later stage would refuse, refused before the first stage writes -----------------------
    pytest.param(demo("--ratio", "0x"), r"--ratio must be a compression above 1", id="demo-ratio-0x"),
    pytest.param(demo("--ratio", "nanx"), r"--ratio must be", id="demo-ratio-nan"),
    pytest.param(demo("--ratio", "1x"), r"--ratio must be", id="demo-ratio-1x"),
    pytest.param(demo("--ratio", "4"), r"--ratio .* written like 4x", id="demo-ratio-without-x"),
    pytest.param(demo("--budget-minutes", "0"), r"--budget-minutes", id="demo-budget-zero"),
    pytest.param(demo("--rope-dim", "3"), r"--rope-dim must be a positive even", id="demo-rope-dim-odd"),
    pytest.param(demo("--seq-len", "0"), r"--seq-len must be >= 1", id="demo-seq-len-zero"),
    pytest.param(demo("--tasks", "foobar"), r"--tasks: 'foobar'", id="demo-unknown-task"),
    pytest.param(demo("--limit", "nosuch=3"), r"--limit 'nosuch=3'", id="demo-limit-unknown-task"),
    pytest.param(demo("--init", "nope"), r"--init 'nope': choose from", id="demo-unknown-init"),
    pytest.param(demo("--bench-contexts", "0"), r"--bench-contexts '0'", id="demo-bench-contexts-zero"),
    pytest.param(lambda P: ["demo", "--model", str(P.root / "nosuch"), "--out", str(P.out)], r"--model: no such",
                 id="demo-model-missing"),
    pytest.param(demo("--text", "/nonexistent/text.txt"), r"--text .*no such text file", id="demo-text-missing"),
    pytest.param(demo("--train-text", "/nonexistent/prose.txt"), r"--train-text .*no such text file .*lambada",
                 id="demo-train-text-missing"),
    pytest.param(demo("--data", "/nonexistent/chat.jsonl"), r"--data .*no such data file", id="demo-data-missing"),
    # ---- distill: the plain-text mix ------------------------------------------------------------------------------
    pytest.param(dist("--text-data", "/nonexistent/prose.txt"), r"--text-data .*no such text file .*lambada",
                 id="distill-text-missing"),
    pytest.param(dist("--text-data", "lambada", "--text-share", "1"), r"--text-share must be in \(0, 1\)",
                 id="distill-text-share-one"),
    pytest.param(dist("--text-data", "lambada", "--teacher-topk", "8"), r"--teacher-topk .* --text-data",
                 id="distill-text-with-topk"),
    pytest.param(ev("--tasks-for", "teacher,nosuch"), r"--tasks-for 'nosuch' is not one of the models",
                 id="eval-tasks-for-unknown"),
    pytest.param(ev("--text", "/nonexistent/text.txt"), r"--text /nonexistent/text.txt: no such text file",
                 id="eval-text-missing"),
    # ---- --cache-bits: one check (ecomla.mla.quant.check_cache_bits) for every stage ---------------------------
    pytest.param(gen("--prompt", "hi", "--cache-bits", "3"), r"--cache-bits must be 16 \(no quantization\), 8 or 4, "
                 r"got 3", id="generate-cache-bits-3"),
    pytest.param(ev("--cache-bits", "2"), r"--cache-bits must be 16 .* got 2", id="eval-cache-bits-2"),
    pytest.param(dist("--cache-bits", "32"), r"--cache-bits must be 16 .* got 32", id="distill-cache-bits-32"),
    pytest.param(bench("--shape", "tiny", "--cache-bits", "16,5"), r"--cache-bits must be 16 .* got 5",
                 id="bench-cache-bits-in-list"),
    pytest.param(bench("--shape", "tiny", "--cache-bits", "four"), r"--cache-bits must be 16 .* got 'four'",
                 id="bench-cache-bits-word"),
    pytest.param(lambda P: ["info", str(P.mla), "--cache-bits", "1"], r"--cache-bits must be 16 .* got 1",
                 id="info-cache-bits-1"),
    pytest.param(lambda P: ["generate", str(P.src), "--prompt", "hi", "--cache-bits", "4"], r"--cache-bits quantizes "
                 r"the latent cache of an MLA checkpoint; .* has no MLA layer", id="generate-cache-bits-for-gqa"),
    pytest.param(lambda P: ["info", str(P.src), "--cache-bits", "8"], r"has no MLA layer", id="info-cache-bits-for-gqa"),
    pytest.param(lambda P: ["eval", str(P.src), "--tasks", "none", "--teacher", "none", "--out", str(P.out),
                            "--cache-bits", "8"], r"has no MLA layer", id="eval-cache-bits-for-gqa"),
    pytest.param(lambda P: ["info", str(P.bad_bits)], r"could not load .*cache_bits \(--cache-bits\) must be",
                 id="load-config-cache-bits-3"),
    # ---- --config recipes ---------------------------------------------------------------------------------------
    pytest.param(demo("--config", path("yaml_binary")), r"--config .* is not a text file", id="config-binary-file"),
    pytest.param(gen("--prompt", "hi", "--config", path("yaml_broken")), r"--config .* is not valid YAML",
                 id="config-broken-yaml"),
    pytest.param(demo("--config", path("yaml_list")), r"must hold a mapping .* not a list", id="config-list"),
    pytest.param(lambda P: ["info", str(P.mla), "--config", str(P.yaml_scalar)], r"must hold a mapping .* not a str",
                 id="config-scalar"),
    pytest.param(demo("--config", path("yaml_int_keys")), r"keys must be option names, got 1", id="config-int-keys"),
    pytest.param(gen("--prompt", "hi", "--config", path("yaml_unknown_key")), r"unknown keys \['nosuch'\]",
                 id="config-unknown-key"),
    pytest.param(gen("--prompt", "hi", "--config", path("yaml_int_type")), r"max_new_tokens must be an integer",
                 id="config-string-for-int"),
    pytest.param(gen("--prompt", "hi", "--config", path("yaml_bool_type")), r"chat must be true or false",
                 id="config-string-for-bool"),
    pytest.param(bench("--shape", "tiny", "--config", path("yaml_bad_choice")), r"dtype must be one of",
                 id="config-bad-choice"),
    pytest.param(gen("--prompt", "hi", "--config", path("yaml_null_value")), r"max_new_tokens needs a value",
                 id="config-null-value"),
    pytest.param(demo("--config", path("yaml_ratio_number")), r"--ratio .* written like 4x", id="config-ratio-number"),
    pytest.param(ev("--config", path("yaml_float_for_int")), r"batch_size must be an integer",
                 id="config-float-for-int"),
    pytest.param(ev("--tasks", "piqa", "--config", path("yaml_bad_limit")), r"--limit 'nosuch=3'",
                 id="config-limit-unknown-task"),
    pytest.param(lambda P: ["info", str(P.mla), "--config", str(P.root / "nosuch.yaml")], r"no such recipe file",
                 id="config-missing-file"),
    pytest.param(lambda P: ["info", str(P.mla), "--config", str(P.root)], r"no such recipe file",
                 id="config-is-a-folder"),
    # ---- convert's removed flags: one line each, naming what replaced them ------------------------------------------
    pytest.param(conv("--v-dim", "16"), r"--v-dim was removed: d_v is always the source head dim", id="convert-v-dim"),
    pytest.param(conv("--kv-budget", "4x"), r"--kv-budget was removed: .* lost to uniform ranks .* use --kv-rank R",
                 id="convert-kv-budget"),
    pytest.param(conv("--allow-hybrid"), r"--allow-hybrid was removed: .* with --layers", id="convert-allow-hybrid"),
    pytest.param(conv("--budget-norm", "relative"), r"--budget-norm was removed: .* use --kv-rank R",
                 id="convert-budget-norm"),
    pytest.param(conv("--kv-balance"), r"--kv-balance was removed: .* drop it", id="convert-kv-balance"),
    pytest.param(conv("--init", "fitted", "--sequential"), r"--sequential was removed: .* one-shot .* drop it",
                 id="convert-sequential"),
    pytest.param(conv("--init", "fitted", "--no-sequential"), r"--sequential was removed", id="convert-no-sequential"),
    pytest.param(conv("--init", "fitted", "--o-refit", "residual"), r"--o-refit was removed: .* drop it \(--o-ridge",
                 id="convert-o-refit"),
    pytest.param(conv("--init", "fitted", "--config", path("yaml_retired")), r"--kv-balance was removed",
                 id="convert-recipe-retired-key"),
    pytest.param(conv("--init", "fitted", "--key-weight", "1,2,4"), r"--key-weight '1,2,4': give one number; .* lost",
                 id="convert-key-weight-per-layer"),
    # ---- --target deepseek-v3 / export: what stock engines cannot serve ---------------------------------------------
    pytest.param(conv("--target", "deepseek-v3", "--rope-dim", "16"), r"--target deepseek-v3: --rope-dim 16 equals the "
                 r"head dim, .*\(d_nope 0\).*convert with a --rope-dim below 16",
                 id="convert-target-no-nope-dims"),
    pytest.param(lambda P: ["export", str(P.no_nope), str(P.out)], r"cannot be written exactly .*: --rope-dim 16 "
                 r"equals the head dim.*convert with a --rope-dim below 16", id="export-no-nope-dims"),
    pytest.param(lambda P: ["export", str(P.word_level), str(P.out), "--format", "gguf"], r"tokenizer is not one the "
                 r"GGUF export writes .*export with --format deepseek-v3", id="export-gguf-word-level-tokenizer"),
    pytest.param(lambda P: ["export", str(P.lite27), str(P.out), "--format", "gguf"], r"cannot be written exactly in "
                 r"the gguf format: llama.cpp reads a 27-layer .* convert with --q-rank none", id="export-gguf-lite"),
    pytest.param(lambda P: ["export", str(P.no_nope), str(P.out), "--dtype", "q8_0"], r"--dtype q8_0 is a GGUF block "
                 r"type; use it with --format gguf", id="export-q8_0-without-gguf"),
]


@pytest.mark.parametrize("argv, says", CASES)
def test_bad_input_is_refused_in_one_line(argv, says, P, capsys, monkeypatch, tmp_path):
    here = SimpleNamespace(**{**vars(P), "out": tmp_path / "out"})  # a fresh output folder: it must not appear
    assert_refused(argv(here), capsys, monkeypatch, says, roots=(P.root, P.src, tmp_path))


def test_repeated_prompt_answers_every_prompt(P, capsys):
    """`--prompt A --prompt B` is a batch of two (argparse's default would keep only B), as is `--prompt A B`."""
    for argv in (["--prompt", "hello world", "--prompt", "the cat sat"], ["--prompt", "hello world", "the cat sat"]):
        assert main(["generate", str(P.mla), *argv, "--max-new-tokens", "2", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert isinstance(res["text"], list) and len(res["text"]) == 2 and len(res["new_tokens"]) == 2


def test_a_recipe_prompt_string_is_one_prompt(P, capsys):
    recipe = P.root / "one-prompt.yaml"
    recipe.write_text("prompt: hello world\nmax_new_tokens: 2\njson: true\n")
    try:
        assert main(["generate", str(P.mla), "--config", str(recipe)]) == 0
    finally:
        recipe.unlink()
    assert isinstance(json.loads(capsys.readouterr().out)["text"], str)


def test_online_task_names_are_checked_against_lm_eval(monkeypatch):
    """With a reachable hub any lm-eval task runs; a name lm-eval does not know is refused before any model loads."""
    from ecomla.eval import tasks

    monkeypatch.setattr(tasks.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tasks, "lm_eval_task_names", lambda: frozenset({"lambada_openai"}))
    assert tasks.parse_tasks("piqa,lambada_openai") == ["piqa", "lambada_openai"]
    with pytest.raises(UserError, match="unknown task 'foobar'"):
        tasks.parse_tasks("lambada_openai,foobar")


def test_narrowed_except_clauses_keep_bugs_as_tracebacks(monkeypatch):
    """Only a spec's own shape checks become a one-line error; any other ValueError is a bug and stays one."""
    from ecomla.mla.config import MLASpec, SourceShape

    src = SourceShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3)
    with pytest.raises(UserError, match="kv_lora_rank must be >= 1"):
        MLASpec.for_source(src, 0, 8)

    def bug(self):
        raise ValueError("a programming error")

    monkeypatch.setattr(MLASpec, "__post_init__", bug)
    with pytest.raises(ValueError, match="a programming error"):
        MLASpec.for_source(src, 8, 8)
