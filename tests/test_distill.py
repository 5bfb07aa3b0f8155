"""Stage-1 distillation: loss identities, learning, resume, DDP over 2 CPU processes, clear errors."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ecomla.cli import main
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.common import UserError
from ecomla.distill import DistillArgs, Trainer, distill
from ecomla.distill.budget import CALIBRATION, MARGIN, schedule, steps_to_fill, warmup_steps
from ecomla.losses import chunked_loss, masked_mean, token_kl
from tests.helpers import WORDS, make_source, untimed
from tests.test_data_eval import chat_rows


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_divergence_of_a_distribution_with_itself_is_zero(kind):
    logits = torch.randn(7, 50)
    assert torch.allclose(token_kl(logits, logits, kind, temperature=2.0), torch.zeros(7), atol=1e-6)
    assert (token_kl(logits, torch.randn(7, 50), kind) > 0).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_each_divergence_matches_its_plain_formula_and_gradient(kind):
    torch.manual_seed(0)
    z = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 40, dtype=torch.float64)
    if kind == "forward":
        t[:3, 10:] = float("-inf")  # a top-k teacher: no mass off its support
    g = torch.rand(6, dtype=torch.float64)
    (token_kl(z, t, kind, temperature=1.7, beta=0.3) * g).sum().backward()
    ours, z.grad = z.grad.clone(), None
    lp, lq = torch.log_softmax(t / 1.7, -1), torch.log_softmax(z / 1.7, -1)
    kl = lambda la, lb: torch.where(la.exp() > 0, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)
    lm = torch.log(0.3 * lp.exp() + 0.7 * lq.exp())
    plain = {"forward": kl(lp, lq), "reverse": kl(lq, lp), "jsd": 0.3 * kl(lp, lm) + 0.7 * kl(lq, lm)}[kind] * 1.7**2
    (plain * g).sum().backward()
    assert torch.allclose(token_kl(z, t, kind, temperature=1.7, beta=0.3).double(), plain, atol=1e-6)  # fp32 inside
    assert torch.allclose(ours, z.grad, atol=1e-6)


def test_compiled_forward_kl_matches_eager_values_and_gradients():
    torch.manual_seed(0)
    z = torch.randn(5, 30, requires_grad=True)
    t = torch.randn(5, 30)
    t[:2, 8:] = float("-inf")
    eager = token_kl(z, t, "forward", temperature=1.3)
    eager.sum().backward()
    g_eager, z.grad = z.grad.clone(), None
    compiled = token_kl(z, t, "forward", temperature=1.3, compiled=True)
    compiled.sum().backward()
    assert torch.allclose(eager, compiled, atol=1e-5) and torch.allclose(g_eager, z.grad, atol=1e-6)


def test_compile_failure_warns_once_and_falls_back_to_eager(monkeypatch):
    from ecomla import losses

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(losses, "_COMPILED", {"fn": None, "failed": False})
    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    z, t = torch.randn(4, 12), torch.randn(4, 12)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        out = token_kl(z, t, "forward", compiled=True)
    assert torch.allclose(out, token_kl(z, t, "forward"))
    assert losses._COMPILED["failed"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns again
        token_kl(z, t, "forward", compiled=True)


def test_all_masked_gives_zero_not_nan():
    h = torch.randn(0, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    total, n = chunked_loss(h, head, lambda lo, hi: torch.zeros(hi - lo, 11), torch.zeros(0, dtype=torch.long))
    loss = masked_mean(total, n)
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss)


@pytest.mark.parametrize("kind, ce", [("forward", 0.0), ("reverse", 0.5), ("jsd", 1.0)])
def test_chunked_equals_full_including_gradients(kind, ce):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 31, bias=False)
    t_logits = torch.randn(20, 31)
    labels = torch.randint(0, 31, (20,))
    outs = []
    for chunk, above in ((3, 0), (1000, 2**27)):  # small chunks, checkpointed vs one chunk, graph kept
        h = torch.randn(20, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        total, n = chunked_loss(h, head, lambda lo, hi: t_logits[lo:hi], labels, kind, 1.5, 1.0, ce, chunk, above)
        total.backward()
        outs.append((total.detach(), h.grad.clone(), head.weight.grad.clone()))
        head.weight.grad = None
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


def test_checkpointed_chunks_run_through_the_compiled_loss():
    """Checkpointed chunks (N x V above checkpoint_above, every GPU recipe) with the compiled KD loss (the default):
    checkpoint ends its recompute by raising inside the loss; that must not be taken for a compile failure."""
    from ecomla import losses

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 31, bias=False)
    t_logits, labels = torch.randn(20, 31), torch.randint(0, 31, (20,))
    grads = []
    for compiled in (False, True):
        h = torch.randn(20, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        total, _ = chunked_loss(h, head, lambda lo, hi: t_logits[lo:hi], labels, "forward", 1.0, 1.0, 0.0, 3, 0,
                                compiled=compiled)
        total.backward()
        grads.append(h.grad.clone())
    assert not losses._COMPILED["failed"] and torch.allclose(*grads, atol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [schedule(s, 100, warmup_steps(100, 0.1), 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # a time budget: the peak held while the length is unknown, then cosine from the hold's end to the floor
    assert [schedule(s, None, 2, 0.1, hold=6) for s in range(8)] == [0.5, 1.0] + [1.0] * 6
    timed = [schedule(s, 20, 2, 0.1, hold=6) for s in range(20)]
    assert timed[:7] == [0.5] + [1.0] * 6 and timed[-1] == pytest.approx(0.1) and timed[7] < 1.0
    # planned for 20 steps, planned again at step 12 for 30: the same curve up to 12, then on from its angle there
    bent = [schedule(s, 30, 2, 0.1, hold=6, bends=[(12, 20)]) for s in range(30)]
    assert bent[:12] == timed[:12] and bent[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(bent[6:], bent[7:])) and bent[12] > timed[12]  # slower now, still no restart
    # and again at step 20, for 25: the same curve up to 20, then down to the floor on step 24
    twice = [schedule(s, 25, 2, 0.1, hold=6, bends=[(12, 20), (20, 30)]) for s in range(25)]
    assert twice[:20] == bent[:20] and twice[-1] == pytest.approx(0.1) and twice[20] < bent[20]
    assert all(a > b for a, b in zip(twice[6:], twice[7:]))


def test_steps_to_fill_keeps_the_margin_and_pays_for_checkpoints():
    assert steps_to_fill(100.0, 10.0, 0.0, 5) == math.floor(100 * (1 - MARGIN) / 10)
    assert steps_to_fill(100.0, 9.0, 5.0, 5) == math.floor((100 * (1 - MARGIN) - 5) / (9 + 5 / 5))
    assert steps_to_fill(3.0, 10.0, 5.0, 5) == 0 and steps_to_fill(-4.0, 1.0, 0.0, 5) == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    make_source("llama", root / "src", tie_word_embeddings=True)
    convert(ConvertArgs(src=str(root / "src"), out=str(root / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    (root / "prose.txt").write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    return root


def args(setup, out, **kw):
    base = dict(student=str(setup / "mla"), data=str(setup / "chat.jsonl"), out=str(out), seq_len=16, batch_size=4,
                max_tokens=64 * 20, ild_tokens=64 * 4, precision="fp32", eval_tokens=0, lr=3e-3, ild_lr=3e-3,
                save_every=5, progress=False, compile_loss=False)
    base.update(kw)
    return DistillArgs(**base)


def losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], rows


def test_twenty_steps_lower_the_kl_and_write_a_loadable_checkpoint(setup, tmp_path, monkeypatch, capsys):
    import ecomla.distill.trainer as T
    from ecomla import outputs

    published = []  # the final model enters OUT through the one publish of outputs.py
    monkeypatch.setattr(T, "publish", lambda *a: (published.append(a), outputs.publish(*a)))
    res = Trainer(args(setup, tmp_path / "run", stage="kd", eval_tokens=200)).run()
    assert [(a[1], Path(a[2]).resolve()) for a in published] == [(tmp_path / "run", (setup / "mla").resolve())]
    assert outputs.finished(tmp_path / "run", "distill")
    curve, rows = losses(tmp_path / "run")
    assert len(curve) == 20 and sum(curve[-5:]) < sum(curve[:5])
    assert res["heldout"]["kl_to_teacher"] is not None
    assert "held-out check" not in capsys.readouterr().err  # --no-progress hides the final check's bar too
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")  # the output folder is a checkpoint
    assert model.config.model_type == "ecomla" and "final" in rows[-1]


def test_ild_stage_trains_only_mla_weights(setup, tmp_path):
    Trainer(args(setup, tmp_path / "ild", stage="ild", ild_tokens=64 * 6)).run()
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(setup / "mla")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "ild")
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)}
    assert changed and all(".self_attn." in n and "o_proj" not in n for n in changed)
    curve, _ = losses(tmp_path / "ild")
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("text, bits", [(False, None), (True, None), (False, 4)], ids=["chat", "chat+text", "int4"])
def test_kill_and_resume_reproduces_the_uninterrupted_curve(setup, tmp_path, monkeypatch, text, bits):
    # with text: a quarter of the blocks from plain text; the mixed stream is as resumable as the chat one
    # with bits: quantization-aware training (a 4-bit latent cache, fake-quantized), recorded in the checkpoint
    mix = {"text_data": str(setup / "prose.txt")} if text else {}
    mix.update({"cache_bits": bits} if bits else {})
    Trainer(args(setup, tmp_path / "full", **mix)).run()
    full, full_rows = losses(tmp_path / "full")

    original = Trainer.kd_step

    def dies_at_step_7(self, step):  # steps 0-3 are ILD, 4-23 KD
        if step == 7:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "kd_step", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C saves a checkpoint, then exits
        Trainer(args(setup, tmp_path / "cut", **mix)).run()
    assert (tmp_path / "cut" / "checkpoints" / "step-0000007").is_dir()
    monkeypatch.setattr(Trainer, "kd_step", original)
    distill(args(setup, tmp_path / "cut", resume=True, **mix))
    resumed, rows = losses(tmp_path / "cut")
    assert len(resumed) == len(full) == 24 and [r["stage"] for r in rows[:5]] == ["ild"] * 4 + ["kd"]
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows[:-1]]
    assert untimed(rows) == untimed(full_rows)  # bit-identical losses, grad norms, lrs: same blocks, RNG, optimizer
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["cache_bits"] == (bits or 16)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(setup, tmp_path):
    """--gradient-checkpointing: each decoder layer's forward runs again in the backward pass (its attention is
    called twice a step, not once), and the loss and every gradient are those of the run without it."""
    from ecomla.distill.objective import KDBatch

    seen = []
    for on in (False, True):
        trainer = Trainer(args(setup, tmp_path / f"gc-{on}", stage="kd", gradient_checkpointing=on))
        try:
            calls = []
            trainer.student.model.layers[1].self_attn.register_forward_hook(lambda *a: calls.append(1))
            trainer.model.train()
            blocks = trainer.blocks(0, 0)
            b = trainer.batch(blocks)
            loss = trainer._backward(0, KDBatch(b["input_ids"], b["loss_mask"], trainer._teacher_logits(b, blocks),
                                                scale=1.0))
            grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
            seen.append((loss, grads, len(calls)))
        finally:
            trainer.release()
    (loss, grads, calls), (loss_gc, grads_gc, calls_gc) = seen
    assert (calls, calls_gc) == (1, 2)
    assert loss_gc == loss and grads.keys() == grads_gc.keys() and len(grads) > 20
    assert all(torch.allclose(grads[n], grads_gc[n], rtol=0, atol=1e-7) for n in grads)


def test_text_data_puts_a_share_of_plain_text_blocks_in_every_batch(setup, tmp_path):
    trainer = Trainer(args(setup, tmp_path / "mix", stage="kd", text_data=str(setup / "prose.txt"), text_share=0.25,
                           mask_prompt=True))  # chat blocks: assistant tokens only, so the text rows stand out
    try:
        for step in range(3):
            b = trainer.batch(trainer.blocks(step, 0))
            text_rows = [bool(m.all()) for m in b["loss_mask"]]  # plain text: every token a target; chat: assistant only
            assert text_rows == [False, False, False, True], (step, text_rows)
    finally:
        trainer.release()


def test_rerun_without_resume_refuses_and_stale_tmp_is_ignored(setup, tmp_path):
    Trainer(args(setup, tmp_path / "r", stage="kd", max_tokens=64 * 6)).run()
    (tmp_path / "r" / "checkpoints" / "step-0000099.tmp-1").mkdir()  # a save that died half-way (PID 1 lives on)
    with pytest.raises(UserError, match="--resume"):
        Trainer(args(setup, tmp_path / "r", stage="kd", max_tokens=64 * 6)).run()
    t = Trainer(args(setup, tmp_path / "r", stage="kd", max_tokens=64 * 6, resume=True))
    t.resume()
    assert t.step == 6  # the last complete checkpoint, not the .tmp one


def test_vocab_mismatch_and_missing_data_are_clear_errors(setup, tmp_path, capsys):
    make_source("llama", tmp_path / "other", vocab_size=96)
    assert main(["distill", str(setup / "mla"), "--teacher", str(tmp_path / "other"), "--data",
                 str(setup / "chat.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(["distill", str(setup / "mla"), "--data", str(tmp_path / "nope.jsonl"), "--out",
                 str(tmp_path / "o2")]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main(["distill", str(setup / "src"), "--out", str(tmp_path / "o3")]) == 2
    assert "no MLA layer" in capsys.readouterr().err


def test_a_second_precision_in_one_process_is_a_clear_error(setup, tmp_path):
    Trainer(args(setup, tmp_path / "a", stage="kd"))
    with pytest.raises(UserError, match="--precision bf16"):  # accelerate keeps one precision per process
        Trainer(args(setup, tmp_path / "b", stage="kd", precision="bf16"))
    with pytest.raises(UserError, match="--stage"):  # a recipe's values bypass argparse's choices
        args(setup, tmp_path / "c", stage="everything")


def test_teacher_topk_cache_is_reused(setup, tmp_path):
    blocks = lambda: {p: p.stat().st_mtime_ns for p in Path(os.environ["ECOMLA_CACHE"]).rglob("block-*.pt")}
    Trainer(args(setup, tmp_path / "k1", stage="kd", max_tokens=64 * 4, teacher_topk=8)).run()
    first = blocks()
    assert len(first) >= 16
    curve, _ = losses(tmp_path / "k1")
    assert all(c == c for c in curve)  # finite
    Trainer(args(setup, tmp_path / "k2", stage="kd", max_tokens=64 * 4, teacher_topk=8)).run()
    assert blocks() == first and losses(tmp_path / "k2")[0] == curve  # nothing recomputed, same run


def launch_two_cpu_processes(tmp_path) -> tuple[list[str], dict]:
    """accelerate's own multi-CPU launcher needs MPI (`--cpu` + `--mpirun_hostfile`); without MPI the same two
    processes start through torchrun (`--multi_gpu` with ACCELERATE_USE_CPU=1). Both give MULTI_CPU + gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if shutil.which("mpirun"):
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        return base + ["--cpu", "--mpirun_hostfile", str(tmp_path / "hostfile")], env
    return base + ["--multi_gpu"], {**env, "ACCELERATE_USE_CPU": "1"}


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("distill-*.yaml")))
def test_recipes_parse_and_start_with_their_command(recipe):
    from ecomla.args import load_yaml_defaults

    path = RECIPES / recipe
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ecomla convert ") and "ecomla distill" in "\n".join(lines[1:3])
    args = DistillArgs(student="STUDENT", **load_yaml_defaults(str(path)))  # unknown keys or bad values raise
    assert args.loss == "forward" and args.beta_pair == (0.9, 0.98)
    if "-cpu-" in recipe:  # an hour on a laptop: the minutes size the schedule
        assert args.max_minutes == 60 and args.max_tokens is None and args.kd_tokens is None


def test_auto_precision_is_bf16_only_where_the_hardware_has_bf16_units(monkeypatch):
    import ecomla.common as common
    from ecomla.distill import DistillArgs

    for fast, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(common, "fast_bf16", lambda device=None, fast=fast: fast)
        assert common.resolve_precision("auto") == want
        assert DistillArgs(student="s", out="o").precision == want  # resolved once, in the arguments
    assert common.resolve_precision("bf16") == "bf16" and common.resolve_precision("fp32") == "fp32"
    assert isinstance(common.fast_bf16("cpu"), bool)


def fake_clock(trainer, slower_after=None, seconds=10.0, slower=13.0):
    """Time as a function of the step: every step takes `seconds` (then `slower` from step `slower_after` on);
    checkpoints and the rest take none. A resumed run sees the same clock, so it can be bit-identical."""
    def clock():
        s = trainer.step
        if slower_after is None or s <= slower_after:
            return seconds * s
        return seconds * slower_after + slower * (s - slower_after)
    trainer.clock = clock
    return trainer


@pytest.mark.parametrize("case", ["fills the minutes", "machine slows down", "machine speeds up",
                                  "max-tokens ends first"])
def test_a_time_budget_sizes_the_schedule_to_end_at_its_floor(setup, tmp_path, case):
    """10 s a step, 105 s: the length is fixed after CALIBRATION steps (60 s spent) at CALIBRATION + 4 steps (the
    45 s left, less MARGIN, hold 4 steps), stored in the checkpoint saved then, and fixed again halfway (R = 8) from
    the speed since: a machine that gets slower (13 s) ends a step earlier, one that gets faster (7 s) runs two more,
    each with the LR at its floor on its last step. Given both flags, a smaller --max-tokens ends the run (no second
    look: too short), its schedule at the floor too."""
    cap = 64 * 8 if case == "max-tokens ends first" else None  # 8 steps
    trainer = Trainer(args(setup, tmp_path / "t", stage="kd", max_tokens=cap, max_minutes=105 / 60, save_every=4,
                           keep_last=9))
    later = {"machine slows down": 13.0, "machine speeds up": 7.0}.get(case)
    fake_clock(trainer, slower_after=CALIBRATION if later else None, slower=later or 10.0)
    res = trainer.run()
    curve, rows = losses(tmp_path / "t")
    want = {"fills the minutes": (10, "max-minutes", 10), "machine slows down": (9, "max-minutes", 9),
            "machine speeds up": (12, "max-minutes", 12), "max-tokens ends first": (8, "max-tokens", 8)}[case]
    assert (res["kd_steps"], res["stopped"], len(curve)) == want
    ckpt = lambda step: json.loads((tmp_path / "t" / "checkpoints" / f"step-{step:07d}" / "trainer.json").read_text())
    kd = ckpt(CALIBRATION)["kd"]
    assert kd["steps"] == kd["first_steps"] == (8 if cap else 10) and kd["step_s"] == [10.0] * (CALIBRATION - 2)
    summary = json.loads((tmp_path / "t" / "ecomla_train.json").read_text())
    assert summary["kd_steps"] == res["kd_steps"]
    if case != "max-tokens ends first":  # fixed again at R = 8, from steps 6 and 7; stored in the checkpoint there
        assert ckpt(8)["kd"]["steps"] == res["kd_steps"]
        assert ckpt(8)["kd"]["looks"] == [[8, 10, res["kd_steps"], later or 10.0]]  # from steps 6 and 7
        assert [x["at"] for x in summary["kd_length"]["looks"]] == [8]  # the next half (1-2 steps) is not watched
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[:CALIBRATION] == [1.5e-3] + [3e-3] * (CALIBRATION - 1)  # 2 warmup steps, the peak held
    assert lrs[-1] == pytest.approx(3e-3 * 0.1) and lrs[-2] > lrs[-1]  # the floor, on the last step
    assert all(a >= b for a, b in zip(lrs[CALIBRATION:], lrs[CALIBRATION + 1:]))  # no restart at the second look


def test_a_time_budget_killed_after_its_second_look_resumes_bit_identically(setup, tmp_path, monkeypatch):
    """The speeds-up case above (12 steps, the length fixed again at R = 8), interrupted at step 10 and resumed: the
    stored lengths and R give the uninterrupted run's steps, losses and LRs."""
    kw = dict(stage="kd", max_tokens=None, max_minutes=105 / 60, save_every=4, keep_last=9)
    make = lambda out, **more: fake_clock(Trainer(args(setup, out, **kw, **more)), slower_after=CALIBRATION,  # noqa
                                          slower=7.0)
    make(tmp_path / "full").run()
    res = interrupted_then_resumed(make, tmp_path / "cut", 10, monkeypatch)
    assert res["kd_steps"] == 12 and len(losses(tmp_path / "cut")[0]) == 12
    assert untimed(tmp_path / "cut") == untimed(tmp_path / "full")


def interrupted_then_resumed(make, out: Path, at: int, monkeypatch) -> dict:
    """make(out).run() interrupted (Ctrl-C) as KD step `at` starts, then make(out, resume=True).run(): its summary."""
    original = Trainer.kd_step

    def dies(self, step):
        if step == at:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "kd_step", dies)
    with pytest.raises(KeyboardInterrupt):
        make(out).run()
    monkeypatch.setattr(Trainer, "kd_step", original)
    return make(out, resume=True).run()


def test_a_changed_budget_kind_is_refused_on_resume(setup, tmp_path):
    Trainer(args(setup, tmp_path / "r", stage="kd", max_tokens=64 * 2)).run()
    with pytest.raises(UserError, match="--max-minutes given"):  # the schedule's kind is part of the run
        Trainer(args(setup, tmp_path / "r", stage="kd", max_tokens=64 * 2, max_minutes=5.0, resume=True))


@pytest.mark.parametrize("mask_prompt", [True, False], ids=["assistant-only", "every-token"])
def test_no_step_without_targets(setup, tmp_path, mask_prompt):
    """Long prompts: one-block steps from the plain stream would have had no target; the trainer's have one each."""
    from ecomla.data.packing import PackedChat

    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(200, prompt_words=40)))
    t = Trainer(args(setup, tmp_path / "run", data=str(data), stage="kd", batch_size=1, max_tokens=16 * 24,
                     mask_prompt=mask_prompt))
    plain = PackedChat(t.split["train"], t.tok, 16, seed=0, mask_prompt=mask_prompt)
    empty = sum(not plain.block(k)[1][1:].any() for k in range(24))
    assert empty > 0 if mask_prompt else empty == 0
    t.run()
    _, rows = losses(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 24 and all(r["targets"] > 0 and r["loss"] > 0 and r["grad_norm"] > 0 for r in steps)


def test_a_checkpoint_of_a_tied_model_warns_nothing_and_one_bar_is_drawn(setup, tmp_path, caplog, capsys):
    """accelerate would save both names of the tied lm_head / embed_tokens, drop one and warn that the checkpoint
    may be broken; the libraries' own bars (loading weights, map, writing shards) stay off during the run."""
    import logging

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(setup / "mla").config.tie_word_embeddings  # the fixture is tied
    caplog.set_level(logging.WARNING)
    capsys.readouterr()
    Trainer(args(setup, tmp_path / "tied", stage="kd", max_tokens=64 * 2, save_every=1, progress=True)).run()
    err = capsys.readouterr().err
    assert "Removed shared tensor" not in caplog.text + err
    assert "distill" in err and not any(bar in err for bar in ("Loading weights", "Map", "Writing model shards"))


def test_a_time_budget_fills_the_topk_cache_as_it_goes(setup, tmp_path):
    """Alone, --max-minutes cannot fill the cache before training (its length is unknown): the blocks are added as
    steps need them. With --max-tokens too, the cache is filled up to it first, outside the minutes."""
    t = fake_clock(Trainer(args(setup, tmp_path / "k", stage="kd", max_tokens=None, max_minutes=105 / 60,
                                teacher_topk=8, save_every=4)))
    res = t.run()
    assert res["stopped"] == "max-minutes" and len(list(t.topk.dir.glob("block-*.pt"))) == res["kd_steps"] * 4
    t = fake_clock(Trainer(args(setup, tmp_path / "k2", stage="kd", max_tokens=64 * 12, max_minutes=0.001,
                                teacher_topk=8)))
    assert t.run()["stopped"] == "clock" and len(list(t.topk.dir.glob("block-*.pt"))) == 12 * 4


def test_a_bf16_student_trains_in_fp32_and_is_written_back_in_bf16(setup, tmp_path):
    """The output keeps the dtype the student came in (a 1B bf16 student is 2.5 GB, not 5), config.json included;
    the weights are the fp32 trained ones rounded once, one name per tied weight."""
    from safetensors.torch import load_file

    from ecomla.io import checkpoint_dtype, load_model

    convert(ConvertArgs(src=str(setup / "src"), out=str(tmp_path / "bf16"), kv_rank=8, rope_dim=8, dtype="bfloat16"),
            log=lambda *a: None)
    trainer = Trainer(args(setup, tmp_path / "run", student=str(tmp_path / "bf16"), stage="kd", max_tokens=64 * 2))
    trainer.run()
    trained = {k.removeprefix("student."): v for k, v in trainer.acc.get_state_dict(trainer.model).items()}
    assert trained["model.embed_tokens.weight"].dtype == torch.float32  # it trained in fp32
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert "lm_head.weight" not in saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], trained[k].to(torch.bfloat16)) for k in saved)
    assert checkpoint_dtype(str(tmp_path / "run")) == torch.bfloat16
    model = load_model(str(tmp_path / "run"))[0]
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again on load


def test_a_time_budget_looks_again_until_the_load_settles(setup, tmp_path, monkeypatch):
    """10 s a step until step 50, then 6 s (other jobs left the machine), 1000 s: fixed at CALIBRATION (60 s spent)
    at 97 steps; the first look (R 51) still sees ~9.9 s a step and keeps 99, the second (R 75) sees 6 s and plans
    131, the third (R 103) 132; the next half (14 steps) is under LOOK_SPAN: no fourth. 992 of the 1000 s used (one
    look: 99 steps, 794 s), the LR continuous and at its floor on the last step. Killed at step 90, between the
    second and third looks, and resumed: the uninterrupted run's rows."""
    from ecomla.distill.budget import LOOK_SPAN

    kw = dict(stage="kd", max_tokens=None, max_minutes=1000 / 60, save_every=1000, keep_last=20)
    make = lambda out, **more: fake_clock(Trainer(args(setup, out, **kw, **more)), slower_after=50,  # noqa: E731
                                          seconds=10.0, slower=6.0)
    trainer = make(tmp_path / "full")
    res = trainer.run()
    looks = res["kd_length"]["looks"]
    assert [(x["at"], x["steps_before"], x["steps_after"]) for x in looks] == [(51, 97, 99), (75, 99, 131),
                                                                              (103, 131, 132)]
    assert (132 - 103) // 2 < LOOK_SPAN and res["kd_steps"] == 132 and res["stopped"] == "max-minutes"
    assert trainer.clock() == 992.0  # 50 x 10 s + 82 x 6 s
    curve, rows = losses(tmp_path / "full")
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 132 and lrs[-1] == pytest.approx(3e-3 * 0.1) and lrs[-2] > lrs[-1]
    steps = [b - a for a, b in zip(lrs[CALIBRATION:], lrs[CALIBRATION + 1:])]
    assert all(d <= 0 for d in steps)  # no restart at any look
    assert interrupted_then_resumed(make, tmp_path / "cut", 90, monkeypatch)["kd_steps"] == 132
    assert untimed(tmp_path / "cut") == untimed(tmp_path / "full")


def test_a_checkpoint_of_the_one_look_budget_resumes_on_the_same_schedule():
    """trainer.json from before the repeated looks (`replanned`, no `looks`): the same multipliers, no new look."""
    from ecomla.distill.budget import Budget

    old = {"steps": 40, "cap": None, "timed": True, "step_s": [10.0] * 4, "save_s": 1.0, "first_steps": 30,
           "replan_at": 18, "mid_s": [9.0] * 12, "replanned": True}
    budget = Budget(cap=None, minutes=10.0, save_every=5)
    budget.load(old)
    assert budget.looks == [[18, 30, 40, 9.0]] and not budget.replan_due(30)
    first_plan = [schedule(k, 30, 2, 0.1, hold=CALIBRATION) for k in range(18)]
    assert [budget.multiplier(k, 0.01, 0.1) for k in range(18)] == first_plan
    lr = lambda k: budget.multiplier(k, 0.01, 0.1)  # noqa: E731
    assert lr(39) == pytest.approx(0.1) and lr(17) > lr(18) > lr(38) > lr(39)
