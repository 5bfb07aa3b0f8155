"""`ecomla demo` end to end on a tiny random model and tiny data: the same code path, smaller inputs."""

import json

from ecomla.cli import main
from tests.helpers import WORDS, make_source
from tests.test_data_eval import chat_rows


def test_demo_end_to_end_and_rerun_reuses_everything(tmp_path, capsys):
    src = make_source("llama", tmp_path / "src")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    (tmp_path / "text.txt").write_text("\n\n".join([" ".join(WORDS)] * 40))
    argv = ["demo", "--model", str(src), "--data", str(tmp_path / "chat.jsonl"), "--text", str(tmp_path / "text.txt"),
            "--out", str(tmp_path / "demo"), "--rope-dim", "8", "--budget-minutes", "0.05", "--ild-tokens", "128",
            "--seq-len", "16", "--batch-size", "2", "--tasks", "none", "--eval-tokens", "64", "--bench-contexts", "16",
            "--bench-batch", "1", "--max-new-tokens", "4", "--calib-seqs", "4"]
    assert main(argv) == 0
    out = tmp_path / "demo"
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert names == ["teacher", "student-0tok", "student-kd"]
    kd = res["models"][2]
    assert kd["kv_bytes_per_token"] == 3 * (64 // 4) * 4 and kd["compression"] == 4.0 and kd["tokens_trained"] > 0
    assert set(res["demo"]["chat"]["answers"]) == {"teacher", "student-0tok", "student-kd"}
    assert any(r["run"] == "absorbed" for r in res["demo"]["bench"]) and "distill" in res["demo"]["commands"]
    for f in ("report.md", "training.png", "quality_vs_kv.png", "tokens_per_s.png"):
        assert (out / f).is_file(), f
    assert "ecomla demo finished" in capsys.readouterr().out
    stamp = (out / "student-kd" / "model.safetensors").stat().st_mtime
    assert main(argv) == 0  # a rerun reuses every stage
    assert (out / "student-kd" / "model.safetensors").stat().st_mtime == stamp
    assert "reusing" in capsys.readouterr().out


def test_demo_with_dpo_adds_a_stage_2_row(tmp_path):
    src = make_source("llama", tmp_path / "src")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    (tmp_path / "text.txt").write_text("\n\n".join([" ".join(WORDS)] * 40))
    assert main(["demo", "--model", str(src), "--data", str(tmp_path / "chat.jsonl"), "--text", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "demo"), "--rope-dim", "8", "--budget-minutes", "0.03", "--ild-tokens", "64",
                 "--seq-len", "16", "--batch-size", "2", "--tasks", "none", "--eval-tokens", "32", "--bench-contexts",
                 "16", "--bench-batch", "1", "--max-new-tokens", "4", "--calib-seqs", "4", "--init", "xecomla",
                 "--dpo", "--dpo-minutes", "0.05", "--dpo-pairs", "4"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["teacher", "student-0tok", "student-kd", "student-dpo"]
    assert "dpo" in res["demo"]["commands"]


def test_recorded_commands_rebuild_the_arguments_the_demo_ran_with():
    """`command_line` (what the demo's report prints) parsed by the CLI gives back the same arguments."""
    import shlex

    from ecomla.args import command_line, from_namespace
    from ecomla.bench.run import BenchArgs
    from ecomla.cli import COMMANDS, build_parser
    from ecomla.convert.convert import ConvertArgs
    from ecomla.distill import DistillArgs
    from ecomla.dpo.run import cpu_args
    from ecomla.eval.run import EvalArgs
    from ecomla.generate.generate import GenerateArgs

    cases = {
        "convert": ConvertArgs(src="default", out="out dir/s", kv_rank=64, init="fitted", calib_len=128,
                               key_weight="3", attention_metric="up", overwrite=True),
        "distill": DistillArgs(student="s", out="o", max_minutes=1.5, eval_tokens=0, compile_loss=False, resume=True),
        "dpo": cpu_args("s", "o", max_minutes=2.0, pairs=4),
        "eval": EvalArgs(models=["a", "b"], names="x,y", tasks="none", limit="*=3"),
        "generate": GenerateArgs("m", ["What is the capital of France?", "Hi"], chat=True),
        "bench": BenchArgs(model="m", contexts="512,2k", batches="4", runs="absorbed,gqa-static", steps=6),
    }
    for stage, args in cases.items():
        line = command_line(stage, args)
        argv = shlex.split(line)
        assert argv[:2] == ["ecomla", stage]
        ns = build_parser().parse_args(argv[1:])
        assert from_namespace(COMMANDS[stage].args, ns) == args, line
