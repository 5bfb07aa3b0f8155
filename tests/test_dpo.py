"""Stage-2 DPO: TRL's loss goes down on a tiny MLA student, the reference stays frozen, pairs are
deterministic and train-split only, budgets / resume work, malformed preference data fails with one error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ecomla.args import load_yaml_defaults
from ecomla.cli import main
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.data.chat import is_heldout, load_chat, split_chat
from ecomla.dpo.data import load_preferences, normalise_row
from ecomla.dpo.pairs import PairSpec, build_pairs, load_cached
from ecomla.dpo.run import CPU_RECIPE, DPOArgs, run_dpo
from ecomla.dpo.trainer import make_config, train
from ecomla.io import UserError, load_model, load_tokenizer
from tests.helpers import make_source
from tests.test_data_eval import chat_rows

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    make_source("llama", root / "src", tie_word_embeddings=True)
    convert(ConvertArgs(src=str(root / "src"), out=str(root / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    # 20 train + 10 held-out conversations (by split_chat's own hash), so a pair run can use every train prompt
    held = [r for r in chat_rows(2000) if is_heldout(r["id"])][:10]
    train = [r for r in chat_rows(2000) if not is_heldout(r["id"])][:20]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in held + train))
    return root


def args(setup, out, **kw):
    base = dict(model=str(setup / "mla"), make_pairs=True, out=str(out), chat_data=str(setup / "chat.jsonl"),
                pairs=8, max_new_tokens=6, lr=1e-3, beta=0.1, max_steps=6, precision="fp32", eval_tokens=0,
                progress=False, save_every=2)
    base.update(kw)
    return DPOArgs(**base)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def spec(setup, **kw):
    base = dict(student=str(setup / "mla"), teacher=str(setup / "src"), chat_data=str(setup / "chat.jsonl"),
                pairs=12, max_new_tokens=4, temperature=1.0, max_prompt_length=64, gen_batch_size=8, seed=0)
    base.update(kw)
    return PairSpec(**base)


def test_dpo_steps_lower_the_loss_and_leave_the_reference_unchanged(setup, tmp_path):
    pairs = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]}
             for p, c, r in [("what is the capital of France ?", "Paris is the capital .", "the dog sat on the mat"),
                             ("tell me about the sun", "the sun is a star .", "no no no no"),
                             ("write a short poem", "the moon and the sky at night", "red red blue green five"),
                             ("how big is the ocean ?", "the ocean is big .", "I sat on a cat")]]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs * 2))
    a = args(setup, tmp_path / "out", make_pairs=False, data=str(tmp_path / "prefs.jsonl"), max_steps=6,
             warmup_ratio=0.0)
    policy, path = load_model(a.model, dtype="float32")
    ref = load_model(path, dtype="float32")[0].requires_grad_(False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ds, _ = load_preferences(a.data)
    (tmp_path / "out").mkdir()
    result = train(a, make_config(a, tmp_path / "out"), policy, ref, load_tokenizer(path), ds, tmp_path / "out", path,
                   log=lambda *_: None)
    losses = [r["loss"] for r in rows(tmp_path / "out" / "metrics.jsonl")]
    assert result["steps"] == 6 and len(losses) == 6
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: loss = ln 2
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1
    assert result["metrics"]["last"]["rewards/accuracies"] == 1.0 and result["metrics"]["last"]["rewards/margins"] > 0
    for k, v in ref.state_dict().items():  # the frozen copy did not move...
        assert torch.equal(v, before[k]), k
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))  # ...the policy did, and OUT holds it
    assert any(not torch.allclose(saved[k], before[k]) for k in saved)
    assert (tmp_path / "out" / "ecomla_convert.json").is_file()
    assert load_model(str(tmp_path / "out"))[0].config.model_type == "ecomla"


def test_pair_builder_is_deterministic(setup):
    split = split_chat(load_chat(str(setup / "chat.jsonl")))
    student, teacher = load_model(str(setup / "mla"))[0], load_model(str(setup / "src"))[0]
    tok = load_tokenizer(str(setup / "mla"))
    log = lambda *_: None  # noqa: E731
    a, stats = build_pairs(spec(setup), student, teacher, tok, split["train"], log)
    b, _ = build_pairs(spec(setup), student, teacher, tok, split["train"], log)
    c, _ = build_pairs(spec(setup, seed=1), student, teacher, tok, split["train"], log)
    assert a == b and a != c and stats["prompts"] == 12
    assert all(p["chosen"] != p["rejected"] for p in a)
    assert stats["pairs"] + stats["identical_dropped"] + stats["empty_dropped"] == stats["prompts"]


def test_make_pairs_never_uses_held_out_conversations(setup, tmp_path):
    split = split_chat(load_chat(str(setup / "chat.jsonl")))
    assert (len(split["train"]), len(split["heldout"])) == (20, 10)
    # ask for more pairs than there are train conversations: every train prompt is used, no held-out one
    res = run_dpo(args(setup, tmp_path / "o", pairs=100, max_new_tokens=4, max_steps=1), log=lambda *_: None)
    assert res["data"]["pairs"]["prompts"] == 20
    ids = {r["id"] for r in rows(tmp_path / "o" / "pairs.jsonl")}
    assert ids <= set(split["train"]["id"]) and ids.isdisjoint(split["heldout"]["id"])
    assert len(ids) == res["data"]["pairs"]["pairs"] == res["data"]["rows"]


def test_pairs_whose_answers_are_identical_are_dropped(setup):
    split = split_chat(load_chat(str(setup / "chat.jsonl")))
    teacher = load_model(str(setup / "src"))[0]
    tok = load_tokenizer(str(setup / "src"))
    with pytest.raises(UserError, match="no usable pair out of 8 prompts \\(8 identical"):
        # the teacher against itself, sampled at a near-zero temperature: the same answers
        build_pairs(spec(setup, pairs=8, temperature=1e-4), teacher, teacher, tok, split["train"], lambda *_: None)


def test_max_steps_time_budget_and_resume_match_an_uninterrupted_run(setup, tmp_path):
    full = run_dpo(args(setup, tmp_path / "full", max_steps=4), log=lambda *_: None)
    assert full["train"]["steps"] == 4 and full["train"]["stopped"] == "done"
    assert [r["step"] for r in rows(tmp_path / "full" / "metrics.jsonl")] == [1, 2, 3, 4]
    cut = run_dpo(args(setup, tmp_path / "cut", max_steps=4, max_minutes=1e-5), log=lambda *_: None)
    assert cut["train"]["steps"] == 1 and cut["train"]["stopped"] == "time budget"
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-1").is_dir()
    with pytest.raises(UserError, match="earlier `ecomla dpo` output; pass --resume"):
        run_dpo(args(setup, tmp_path / "cut", max_steps=4), log=lambda *_: None)
    logs = []
    res = run_dpo(args(setup, tmp_path / "cut", max_steps=4, resume=True), log=logs.append)
    assert any("reusing" in str(m) for m in logs)  # the pairs were not generated again (their cache is keyed)
    assert res["train"]["steps"] == 4 and res["train"]["resumed_from"].endswith("checkpoint-1")
    assert [r["step"] for r in rows(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "cut"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    settings = json.loads((tmp_path / "cut" / "pairs.json").read_text())["settings"]
    assert load_cached(tmp_path / "cut", PairSpec(**settings))[0] == rows(tmp_path / "cut" / "pairs.jsonl")
    with pytest.raises(UserError, match="other settings"):
        load_cached(tmp_path / "cut", PairSpec(**{**settings, "max_new_tokens": 7}))


def test_cli_takes_positional_data_and_checks_the_summary(setup, tmp_path, monkeypatch):
    import ecomla.dpo.trainer as T
    from ecomla import outputs

    published = []  # the final model enters OUT through the one publish of outputs.py
    monkeypatch.setattr(T, "publish", lambda *a: (published.append(a), outputs.publish(*a)))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"the cat {w}", "chosen": "yes good",
                                                          "rejected": "no bad"}) + "\n" for w in ("sat", "is", "red")))
    rc = main(["dpo", str(setup / "mla"), str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--max-steps", "1",
               "--precision", "fp32", "--eval-tokens", "64", "--chat-data", str(setup / "chat.jsonl"),
               "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "ecomla_dpo.json").read_text())
    assert summary["train"]["steps"] == 1 and summary["data"]["rows"] == 3 and summary["data"]["layout"] == "plain"
    assert summary["heldout"]["before"]["kl"] is not None and summary["heldout"]["after"]["ppl"] > 1
    assert [a[1] for a in published] == [tmp_path / "o"] and outputs.finished(tmp_path / "o", "dpo")


@pytest.mark.parametrize("content, says", [
    ([{"prompt": "hi", "chosen": "a"}], "missing column(s) ['rejected']"),
    ([{"prompt": "hi", "chosen": 3, "rejected": "b"}], "'chosen' is int but 'rejected' is str"),
    ([{"prompt": "hi", "chosen": [{"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}],
     "not {role: system|user|assistant"),
    ([{"prompt": "hi", "chosen": "a", "rejected": "b"},
      {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}], "mixes plain"),
    ([{"prompt": "", "chosen": "a", "rejected": "b"}], "'prompt' is empty"),
    ([{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}],
     "continue it with an assistant turn"),
    ([], "is empty"),
    (["not an object"], "could not read"),
])
def test_malformed_preference_data_gives_one_clear_error(setup, tmp_path, capsys, content, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in content))
    with pytest.raises(UserError) as err:
        load_preferences(str(bad))
    assert says in str(err.value) and str(bad) in str(err.value)
    rc = main(["dpo", str(setup / "mla"), str(bad), "--out", str(tmp_path / "o"), "--eval-tokens", "0"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("ecomla dpo: error")]
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0]


def test_rows_are_normalised_to_one_layout():
    user = {"role": "user", "content": "q"}
    conv = normalise_row({"prompt": "q", "chosen": [user, {"role": "assistant", "content": "a"}],
                          "rejected": [user, {"role": "assistant", "content": "b"}]}, "x")
    assert conv == {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}  # ultrafeedback_binarized's layout
    assert normalise_row({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "x")[
        "chosen"] == [{"role": "assistant", "content": "a"}]
    assert normalise_row({"prompt": "q", "chosen": "same", "rejected": "same "}, "x") is None
    assert normalise_row({"prompt": "q", "chosen": "a", "rejected": "b"}, "x") == {"prompt": "q", "chosen": "a",
                                                                                   "rejected": "b"}


def test_arguments_and_recipes():
    with pytest.raises(UserError, match="exactly one"):
        DPOArgs(model="m", data="d.jsonl", make_pairs=True)
    with pytest.raises(UserError, match="no preference data"):
        DPOArgs(model="m")
    with pytest.raises(UserError, match="max-prompt-length"):
        DPOArgs(model="m", make_pairs=True, max_length=256, max_prompt_length=256)
    cpu = load_yaml_defaults(str(ROOT / "recipes" / "dpo-cpu-smollm2.yaml"))
    assert cpu == CPU_RECIPE  # the recipe and `cpu_args` (the demo's path) cannot drift apart
    gpu = DPOArgs(model="m", **load_yaml_defaults(str(ROOT / "recipes" / "dpo-gpu-llama-3.2-1b.yaml")))
    assert (gpu.beta, gpu.lr, gpu.max_length, gpu.max_prompt_length) == (0.01, 5e-7, 1024, 512)
    assert gpu.data.split(",") == ["HuggingFaceH4/ultrafeedback_binarized", "HuggingFaceH4/orca_dpo_pairs",
                                   "JunxiongWang/llama3-ultrafeedback-armorm"]
    for path in ("dpo-cpu-smollm2.yaml", "dpo-gpu-llama-3.2-1b.yaml"):
        assert (ROOT / "recipes" / path).read_text().startswith("# ecomla dpo ")


def test_two_cpu_processes_match_one_process(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes x 2 pairs == 1 process x 4 pairs; pairs are built once (rank 0)."""
    import subprocess

    from tests.test_distill import launch_two_cpu_processes

    common = ["--make-pairs", "--chat-data", str(setup / "chat.jsonl"), "--pairs", "8", "--max-new-tokens", "6",
              "--lr", "1e-3", "--beta", "0.1", "--max-steps", "3", "--precision", "fp32", "--eval-tokens", "0",
              "--no-progress"]
    launch, env = launch_two_cpu_processes(tmp_path)
    res = subprocess.run(launch + ["-m", "ecomla", "dpo", str(setup / "mla"), "--out", str(tmp_path / "ddp"),
                                   "--batch-size", "2", *common], env=env, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("[pairs] 8 prompts") == 1  # built by the main process only, read by the other
    assert main(["dpo", str(setup / "mla"), "--out", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    ddp, one = rows(tmp_path / "ddp" / "metrics.jsonl"), rows(tmp_path / "one" / "metrics.jsonl")
    assert len(ddp) == len(one) == 3 and ddp[-1]["loss"] < 0.69
    for key in ("loss", "rewards/margins"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6)


@pytest.mark.slow  # three launches of 2 processes and one run in this process: about a minute on 2 shared cores
def test_fsdp2_on_two_processes_matches_one_process_and_resumes_after_kill_9(setup, tmp_path):
    """The FSDP2 recipe (fsdp-8gpu.yaml on 2 CPU processes, fp32, through tests/fsdp_cpu.py): each step's loss,
    reward margin and gradient norm as 1 process at the same global batch, sharded checkpoints, the full model
    gathered once into OUT; killed (SIGKILL) as step 3 starts, --resume ends on the uninterrupted run's rows and
    weights. The policy and the reference each come out as the 1-process run's."""
    import subprocess

    from tests.test_sharded import fsdp2_launch

    common = ["--make-pairs", "--chat-data", str(setup / "chat.jsonl"), "--pairs", "8", "--max-new-tokens", "6",
              "--lr", "1e-3", "--beta", "0.1", "--max-steps", "4", "--save-every", "2", "--precision", "fp32",
              "--eval-tokens", "0", "--no-progress"]
    launch, env = fsdp2_launch(tmp_path)

    def fsdp(out, *extra, kill_at=None):
        kill = {"ECOMLA_TEST_KILL_AT": str(kill_at)} if kill_at else {}
        return subprocess.run(launch + ["dpo", str(setup / "mla"), "--out", str(out), "--batch-size", "2", *common,
                                        *extra], env={**env, **kill}, capture_output=True, text=True, timeout=400)

    res = fsdp(tmp_path / "fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warn" not in res.stderr.lower(), res.stderr[-3000:]  # no library noise from the gather or the save
    assert main(["dpo", str(setup / "mla"), "--out", str(tmp_path / "one"), "--batch-size", "4", *common]) == 0
    two, one = rows(tmp_path / "fsdp" / "metrics.jsonl"), rows(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4] == [r["step"] for r in one] and two[-1]["loss"] < 0.69
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    ckpt = tmp_path / "fsdp" / "checkpoints" / "checkpoint-4"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # sharded: one file per process
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    w1, w2 = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "fsdp"))
    assert sorted(w1) == sorted(w2)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert json.loads((tmp_path / "fsdp" / "ecomla_dpo.json").read_text())["train"]["world_size"] == 2
    policy = load_model(str(tmp_path / "fsdp"))[0]  # the head tied to the embeddings again, as saved once
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()

    cut = tmp_path / "cut"
    res = fsdp(cut, kill_at=3)
    assert res.returncode != 0 and not (cut / "model.safetensors").exists()
    assert [r["step"] for r in rows(cut / "metrics.jsonl")] == [1, 2]
    res = fsdp(cut, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(rows(cut / "metrics.jsonl")) == strip(two)
    w3 = load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
