"""Data loading / splitting / packing, fidelity metrics, lm-eval offline, `ecomla eval` reports."""

import json
import math

import datasets
import pytest
import torch

from ecomla.data.chat import is_heldout, load_chat, normalise, split_chat
from ecomla.data.packing import PackedChat, render, text_batches
from ecomla.eval.fidelity import fidelity
from ecomla.eval.tasks import _apportion, parse_limit, run_tasks, seeded_samples
from ecomla.io import UserError, load_model
from tests.helpers import WORDS, make_tokenizer


def chat_rows(n=60, seed=0, prompt_words=6):
    """n conversations of two turns; a long first prompt (prompt_words) leaves packed blocks without a target."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))  # noqa: E731
    return [{"id": f"c{i}", "conversations": [{"from": "human", "value": pick(prompt_words)},
                                              {"from": "gpt", "value": pick(9)},
                                              {"from": "human", "value": pick(4)}, {"from": "gpt", "value": pick(7)}]}
            for i in range(n)]


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat_rows()))
    return path


def test_normalise_roles_and_drops_broken_turns():
    assert normalise([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert normalise([{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "q"},
                      {"from": "chatgpt", "value": "a"}, {"from": "human", "value": "dangling"}]) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert normalise([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]) is None
    assert normalise([{"from": "alien", "value": "a"}]) is None


def test_split_is_disjoint_stable_and_order_free(chat_file):
    ds = load_chat(str(chat_file))
    a = split_chat(ds, heldout_fraction=0.2)
    b = split_chat(ds.shuffle(seed=3), heldout_fraction=0.2)
    assert set(a["train"]["id"]).isdisjoint(a["heldout"]["id"])
    assert len(a["train"]) + len(a["heldout"]) == len(ds)
    assert sorted(a["heldout"]["id"]) == sorted(b["heldout"]["id"])  # independent of file order
    assert all(is_heldout(i, 0.2) for i in a["heldout"]["id"])


def test_bad_data_files_give_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1, "conversations": [{"from": "human", "value": "x"')  # truncated
    with pytest.raises(UserError, match="could not read"):
        load_chat(str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "no chat here"}\n')
    with pytest.raises(UserError, match="'messages'"):
        load_chat(str(wrong))
    with pytest.raises(UserError, match="no such data file"):
        load_chat(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a,b")
        load_chat(str(tmp_path / "x.csv"))


def test_render_masks_assistant_tokens_only():
    tok = make_tokenizer()
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the cat sat"},
            {"role": "user", "content": "why"}, {"role": "assistant", "content": "blue sky"}]
    ids, mask = render(tok, msgs)
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets.split() == ["the", "cat", "sat", "<|im_end|>", "blue", "sky", "<|im_end|>"]
    assert render(tok, msgs, mask_prompt=False)[1] == [1] * len(ids)


def test_packing_is_deterministic_and_resumable(chat_file):
    tok = make_tokenizer()
    ds = load_chat(str(chat_file))
    a, b = PackedChat(ds, tok, 16, seed=5), PackedChat(ds, tok, 16, seed=5)
    first = a.batch(0, 40)
    assert first["input_ids"].shape == (40, 16)
    assert torch.equal(b.batch(30, 10)["input_ids"], first["input_ids"][30:])  # block k does not depend on history
    assert not torch.equal(PackedChat(ds, tok, 16, seed=6).batch(0, 4)["input_ids"], first["input_ids"][:4])


def test_a_training_stream_has_no_block_without_targets(tmp_path):
    """Long prompts leave whole blocks without an assistant token; the training stream leaves them out and stays a
    pure function of the block index. Every token is a target without --mask-prompt, so nothing is left out."""
    tok = make_tokenizer()
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat_rows(40, prompt_words=40)))
    ds = load_chat(str(path))
    targets = lambda p, n=120: [bool(p.block(k)[1][1:].any()) for k in range(n)]  # noqa: E731 (token 0: no target)
    assert not all(targets(PackedChat(ds, tok, 16, seed=1)))  # the test data has such blocks
    skipping = PackedChat(ds, tok, 16, seed=1, skip_untargeted=True)
    assert all(targets(skipping))
    fresh = PackedChat(ds, tok, 16, seed=1, skip_untargeted=True)
    assert torch.equal(fresh.batch(90, 10)["input_ids"], skipping.batch(90, 10)["input_ids"])  # no history
    whole = lambda skip: PackedChat(ds, tok, 16, seed=1, mask_prompt=False, skip_untargeted=skip).batch(0, 60)  # noqa
    assert all(torch.equal(whole(False)[k], whole(True)[k]) for k in ("input_ids", "loss_mask"))
    with pytest.raises(UserError, match="--seq-len"):
        PackedChat(ds, tok, 1, skip_untargeted=True).block(0)  # a 1-token block never has a target


def test_perplexity_is_exp_mean_nll_and_teacher_vs_itself(llama_dir):
    model, _ = load_model(str(llama_dir))
    ids = torch.randint(4, 100, (2, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False
    res = fidelity({"same": model}, model, [{"input_ids": ids, "loss_mask": mask}], chunk=3)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][mask[:, 1:]]
    assert res["same"]["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert res["same"]["tokens"] == 6 + 9  # targets are tokens 1..9 with a True mask
    assert res["same"]["kl"] == pytest.approx(0.0, abs=1e-6) and res["same"]["top1_agreement"] == 1.0


def test_text_batches_windows():
    tok = make_tokenizer()
    b = text_batches(["the cat sat on the mat"] * 20, tok, seq_len=8, max_tokens=30, batch_size=2)
    assert all(x["input_ids"].shape[1] == 8 for x in b) and sum(x["input_ids"].shape[0] for x in b) == 5


def test_limits_and_seeded_subsets():
    assert parse_limit("hellaswag=10,*=3", ["hellaswag", "piqa"]) == {"hellaswag": 10, "piqa": 3}
    assert parse_limit(None, ["piqa"]) == {"piqa": None}
    with pytest.raises(UserError):
        parse_limit("lots", ["piqa"])
    assert sum(_apportion(40, [100, 200, 57, 3])) == 40 and _apportion(500, [1, 2]) == [1, 2]
    sizes = {"t": [("t", 100)]}
    a, b = seeded_samples(sizes, {"t": 10}, 1), seeded_samples(sizes, {"t": 10}, 1)
    assert a == b and len(a["t"]) == 10 and a != seeded_samples(sizes, {"t": 10}, 2)


def _tiny_benchmarks(root):
    arc = {"id": [f"q{i}" for i in range(6)], "question": ["what is the capital of France"] * 6,
           "choices": [{"text": ["Paris", "Rome", "the cat", "blue"], "label": ["A", "B", "C", "D"]}] * 6,
           "answerKey": ["A"] * 6}
    datasets.Dataset.from_dict(arc).save_to_disk(str(root / "ai2_arc/ARC-Easy/validation"))
    wino = {"sentence": ["the cat sat on the _ mat"] * 4, "option1": ["red"] * 4, "option2": ["blue"] * 4,
            "answer": ["1", "2", "1", "2"]}
    datasets.Dataset.from_dict(wino).save_to_disk(str(root / "winogrande/winogrande_xl/validation"))
    return root


def test_lm_eval_runs_offline_on_the_mla_model(llama_dir, tmp_path, monkeypatch):
    import lm_eval.tasks

    from ecomla.convert.convert import ConvertArgs, convert

    managers = []

    class Recording(lm_eval.tasks.TaskManager):  # offline tasks must not pay for indexing lm-eval's own folder
        def __init__(self, *a, **k):
            managers.append(k.get("include_defaults", True))
            super().__init__(*a, **k)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Recording)

    convert(ConvertArgs(src=str(llama_dir), out=str(tmp_path / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    model, path = load_model(str(tmp_path / "mla"))
    root = _tiny_benchmarks(tmp_path / "bench")
    res = run_tasks(model, make_tokenizer(), ["arc_easy", "winogrande"], limit="arc_easy=4", batch_size=4,
                    data_root=root)
    assert res["arc_easy"]["n"] == 4 and res["winogrande"]["n"] == 4
    assert 0 <= res["arc_easy"]["acc_norm"] <= 1 and res["winogrande"]["acc_norm"] is None
    assert res["arc_easy"]["average_metric"] == "acc_norm" and res["winogrande"]["average_metric"] == "acc"
    assert managers == [False]


def test_eval_cli_writes_results_and_report(llama_dir, tmp_path):
    import ecomla.eval.run as run
    from ecomla.cli import main
    from ecomla.convert.convert import ConvertArgs, convert

    convert(ConvertArgs(src=str(llama_dir), out=str(tmp_path / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([" ".join(WORDS)] * 30))
    out = tmp_path / "ev"
    assert main(["eval", str(llama_dir), str(tmp_path / "mla"), "--tasks", "none", "--data", str(path), "--text", str(text),
                 "--max-tokens", "64", "--seq-len", "16", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert names == ["llama0", "mla"] and res["teacher"] == str(llama_dir)  # teacher defaults to the convert source
    mla = res["models"][1]
    assert mla["kv_bytes_per_token"] == 3 * 16 * 4 and mla["compression"] == pytest.approx(64 / 16)
    assert res["models"][0]["kl_to_teacher"] == pytest.approx(0, abs=1e-6) and mla["kl_to_teacher"] > 0
    assert res["models"][0]["kl_text"] == pytest.approx(0, abs=1e-6) and 0 < mla["kl_text"] != mla["kl_to_teacher"]
    assert "KL text" in (out / "report.md").read_text()
    assert set(mla["ppl"]) == {"chat", "text"} and (out / "report.md").is_file() and (out / "quality_vs_kv.png").is_file()
    assert run.default_teacher([str(tmp_path / "mla")]) == str(llama_dir)


def test_eval_runs_tasks_only_for_the_models_named_in_tasks_for(llama_dir, tmp_path, monkeypatch):
    import ecomla.eval.run as run
    from ecomla.convert.convert import ConvertArgs, convert

    convert(ConvertArgs(src=str(llama_dir), out=str(tmp_path / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join([" ".join(WORDS)] * 30))
    asked = []

    def fake_tasks(model, tok, tasks, *a, **k):
        asked.append(list(tasks))
        return {t: {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": None, "acc_norm_stderr": None, "n": 4,
                    "average_metric": "acc"} for t in tasks}

    monkeypatch.setattr(run, "run_tasks", fake_tasks)
    args = run.EvalArgs(models=[str(tmp_path / "mla"), str(tmp_path / "mla")], names="zero,trained",
                        teacher=str(llama_dir), tasks="winogrande", tasks_for="teacher,trained", data=str(path),
                        text=str(text), max_tokens=64, seq_len=16, out=str(tmp_path / "ev"))
    res = run.evaluate(args, log=lambda *a: None)
    by_name = {m["name"]: m for m in res["models"]}
    assert list(by_name) == ["teacher", "zero", "trained"]
    assert by_name["teacher"]["average"] == 0.5 and by_name["trained"]["average"] == 0.5
    assert by_name["zero"]["tasks"] == {} and by_name["zero"]["average"] is None
    assert by_name["zero"]["kl_to_teacher"] > 0  # KL and perplexities still come for every model
    assert asked == [["winogrande"], [], ["winogrande"]]  # teacher, zero, trained
    with pytest.raises(UserError, match="--tasks-for 'nosuch'"):
        run.EvalArgs(models=[str(tmp_path / "mla")], tasks_for="teacher,nosuch")


def test_task_files_verify_the_benchmark_wheel_once(tmp_path, monkeypatch):
    import ecomla.eval.tasks as tasks

    root, calls = _tiny_benchmarks(tmp_path / "bench"), []
    monkeypatch.setattr(tasks, "benchmark_root", lambda: calls.append(1) or root)
    _, names, sizes = tasks.write_task_dir(["arc_easy", "winogrande"])
    assert calls == [1] and names == {"arc_easy": "ecomla_arc_easy", "winogrande": "ecomla_winogrande"}
    assert sizes["winogrande"] == [("ecomla_winogrande", 4)]


def test_packed_text_ends_each_text_with_eos_and_targets_every_token():
    from ecomla.data.packing import PackedText

    tok = make_tokenizer()
    texts = [" ".join(WORDS[i : i + 5]) for i in range(0, 40, 5)]
    a, b = PackedText(texts, tok, seq_len=8, seed=3), PackedText(texts, tok, seq_len=8, seed=3)
    blocks = [a.block(k) for k in range(12)]  # more than one epoch: 8 texts x 6 tokens = 6 blocks per epoch
    assert all(bool(m.all()) for _, m in blocks)
    assert [torch.equal(x, b.block(k)[0]) for k, (x, _) in enumerate(blocks)] == [True] * 12  # pure function of k
    ids = torch.cat([x for x, _ in blocks[:6]]).tolist()
    assert ids.count(tok.eos_token_id) == 8 and ids[-1] == tok.eos_token_id  # one EOS per text, one epoch


def test_mixed_blocks_take_their_share_evenly_and_in_order():
    from ecomla.data.packing import Blocks, MixedBlocks

    class Tagged(Blocks):
        def __init__(self, tag):
            self.tag = tag

        def block(self, k):
            return torch.tensor([self.tag, k]), torch.ones(2, dtype=torch.bool)

    mixed = MixedBlocks(Tagged(0), Tagged(1), share=0.25)
    got = [tuple(mixed.block(k)[0].tolist()) for k in range(12)]
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (0, 3), (0, 4), (0, 5), (1, 1), (0, 6), (0, 7), (0, 8), (1, 2)]
    third = [mixed.block(k)[0][0].item() for k in range(300)]
    assert sum(third) == 75  # exactly the share, whatever the batch size
    with pytest.raises(ValueError):
        MixedBlocks(Tagged(0), Tagged(1), share=1.0)



def test_default_chat_cache_survives_a_second_builder(tmp_path, monkeypatch):
    """Two processes may build the default chat cache at once: the one that finishes second keeps the first's folder
    instead of failing on the rename (seen when tests ran beside a conversion)."""
    import json

    import datasets

    from ecomla.data import chat

    src = tmp_path / "sharegpt.json"
    src.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                                            {"from": "gpt", "value": "I am fine, thank you."}]}]))
    monkeypatch.setenv("ECOMLA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(chat, "sharegpt_json", lambda: src)
    save = datasets.Dataset.save_to_disk

    def save_and_race(self, path, *a, **k):  # the other process finishes first, into the final folder
        save(self, str(tmp_path / "cache" / "datasets" / "sharegpt-en-v2"))
        return save(self, path, *a, **k)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_and_race)
    ds = chat._sharegpt_default()
    assert len(ds) == 1
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == ["sharegpt-en-v2"]
