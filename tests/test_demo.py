"""`ecomla demo` end to end on a tiny random model and tiny data: the same code path, smaller inputs."""

import json
import math

from ecomla.cli import main
from ecomla.mla.quant import LatentFormat
from tests.helpers import WORDS, make_source
from tests.test_data_eval import chat_rows


def test_demo_end_to_end_and_rerun_reuses_everything(tmp_path, capsys):
    src = make_source("llama", tmp_path / "src")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    (tmp_path / "text.txt").write_text("\n\n".join([" ".join(WORDS)] * 40))
    argv = ["demo", "--model", str(src), "--data", str(tmp_path / "chat.jsonl"), "--text", str(tmp_path / "text.txt"),
            "--train-text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "demo"), "--rope-dim", "8",
            "--budget-minutes", "0.05", "--ild-tokens", "128",
            "--seq-len", "16", "--batch-size", "2", "--tasks", "none", "--eval-tokens", "64", "--bench-contexts", "16",
            "--bench-batch", "1", "--max-new-tokens", "4", "--calib-seqs", "4"]
    assert main(argv) == 0
    out = tmp_path / "demo"
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert names == ["teacher", "student-0tok", "student-kd"]
    kd = res["models"][2]
    # the default 4-bit latent cache: r_kv 8 + d_rope 8 in one byte row per token and layer (scales included)
    assert kd["kv_bytes_per_token"] == 3 * LatentFormat.of(8, 8, 4).row_bytes and kd["cache_bits"] == 4
    assert kd["compression"] == 4.0 and kd["tokens_trained"] > 0
    assert set(res["demo"]["chat"]["answers"]) == {"teacher", "student-0tok", "student-kd"}
    assert any(r["run"] == "absorbed" for r in res["demo"]["bench"]) and "--cache-bits 4" in res["demo"]["commands"]["distill"]
    assert f"--text-data {tmp_path / 'text.txt'}" in res["demo"]["commands"]["distill"]  # a quarter: the default
    for f in ("report.md", "training.png", "quality_vs_kv.png", "frontier.png", "tokens_per_s.png"):
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
                 "--dpo", "--dpo-minutes", "0.05", "--dpo-pairs", "4", "--cache-bits", "16"]) == 0
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [m["name"] for m in res["models"]] == ["teacher", "student-0tok", "student-kd", "student-dpo"]
    assert "dpo" in res["demo"]["commands"]
    # --cache-bits 16: no quantization-aware KD, every student measured with its 16-bit latent
    assert json.loads((tmp_path / "demo" / "student-kd" / "config.json").read_text())["cache_bits"] == 16
    assert "--cache-bits" not in res["demo"]["commands"]["distill"]
    assert all(m["cache_bits"] == 16 for m in res["models"][1:])


def test_a_stage_is_reused_when_its_manifest_says_finished(tmp_path, monkeypatch):
    """The demo asks outputs.finished, not file names: a run without the stamp is resumed, a stamped one reused."""
    from ecomla import demo as D
    from ecomla.outputs import claim_run, mark_finished

    src = make_source("llama", tmp_path / "src")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(20)))
    (tmp_path / "text.txt").write_text(" ".join(WORDS))
    d = D.Demo(D.DemoArgs(model=str(src), data=str(tmp_path / "chat.jsonl"), text=str(tmp_path / "text.txt"),
                          out=str(tmp_path / "demo")), log=lambda *a: None)
    ran = []
    monkeypatch.setattr(D, "distill", ran.append)
    kd = tmp_path / "demo" / "student-kd"
    try:
        lock = claim_run(kd, "distill", settings={})
        (kd / "ecomla_train.json").write_text("{}")  # what the demo used to look for
        lock.release()
        d.distill(tmp_path / "demo" / "student-0tok")
        assert len(ran) == 1 and ran[0].resume  # not finished: continued
        mark_finished(kd)
        assert d.distill(tmp_path / "demo" / "student-0tok") == kd and len(ran) == 1  # finished: reused
    finally:
        d.lock.release()


def test_stage_help_says_what_the_stage_does_today(capsys):
    from ecomla.cli import COMMANDS, main
    from ecomla.demo import DemoArgs

    assert "SVD init" not in COMMANDS["convert"].help and "--init" in COMMANDS["convert"].help  # several inits
    assert DemoArgs(ratio="3x").compression == 3.0  # so --ratio's help may not offer only 2x, 4x and 8x
    try:
        main(["demo", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "2x, 4x or 8x" not in text and "after layer-wise alignment when --ild-tokens > 0" in text  # default: 0


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


def test_plots_leave_out_what_has_no_value_instead_of_drawing_0():
    """The training curve skips steps without targets (an older run logged their loss as 0) and missing values;
    a task a model did not run is no bar rather than a bar at 0."""
    from ecomla.demo_report import points
    from ecomla.eval.report import _percent

    curve = [{"stage": "kd", "tokens": 1, "loss": 0.9, "targets": 5},
             {"stage": "kd", "tokens": 2, "loss": 0.0, "targets": 0},
             {"stage": "kd", "tokens": 3, "loss": 0.0}, {"stage": "kd", "tokens": 4, "loss": None},
             {"stage": "kd", "tokens": 5, "loss": float("nan")}, {"stage": "ild", "tokens": 1, "loss": 0.5},
             {"stage": "kd", "tokens": 6, "loss": 0.8, "targets": 7}]
    assert points(curve, "kd") == [(1, 0.9), (6, 0.8)] and points(curve, "ild") == [(1, 0.5)]
    assert math.isnan(_percent(None)) and _percent({"acc": 0.25, "average_metric": "acc"}) == 25.0
