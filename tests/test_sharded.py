"""Stage 1 on 2 CPU processes (gloo) through `accelerate launch`: DDP and FSDP2 each equal one process at the same
global batch (per-step loss and gradient norm within 1e-5 relative, final weights within 1e-5, fp32), and kill -9
then --resume under FSDP2 is bit-identical to the uninterrupted run; the sharded setups stage 1 cannot run are
refused in one line; the frozen teacher is sharded by layer under FSDP.

FSDP2 runs through tests/fsdp_cpu.py, which lets accelerate 1.16 take FSDP on CPU processes (it keeps FSDP for
GPU-type devices); the accelerate config is recipes/accelerate/fsdp-8gpu.yaml's, on 2 processes in fp32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ecomla.cli import main
from ecomla.common import UserError
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.distill.sharding import check_sharding
from tests.fsdp_cpu import fsdp_config
from tests.helpers import assert_refused, make_source, untimed
from tests.test_data_eval import chat_rows
from tests.test_distill import launch_two_cpu_processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny MLA student (tied head) and a sharper teacher of another seed, so the KL is about 1, not 0.01: a
    relative tolerance on it then means what it says."""
    root = tmp_path_factory.mktemp("sharded")
    make_source("llama", root / "src", tie_word_embeddings=True)
    convert(ConvertArgs(src=str(root / "src"), out=str(root / "mla"), kv_rank=8, rope_dim=8), log=lambda *a: None)
    from transformers import AutoModelForCausalLM

    make_source("llama", root / "teacher", seed=1)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    teacher.save_pretrained(root / "teacher")
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat_rows(300)))
    return root


def common(setup) -> list[str]:
    """2 ILD + 6 KD steps of 4 blocks x 2 micro-batches, a checkpoint every 2 steps, the held-out check. AdamW
    moves a weight whose gradient is float noise by about the learning rate either way, so the weights' tolerance
    holds at 5e-4 (at 3e-3 they differ by 3e-5 after 8 steps, the losses still within 1e-5)."""
    return ["--teacher", str(setup / "teacher"), "--data", str(setup / "chat.jsonl"), "--seq-len", "16",
            "--grad-accum", "2", "--ild-tokens", str(64 * 2 * 2), "--max-tokens", str(64 * 2 * 6), "--precision",
            "fp32", "--eval-tokens", "64", "--lr", "5e-4", "--ild-lr", "5e-4", "--save-every", "2", "--no-progress"]


def fsdp2_launch(tmp_path) -> tuple[list[str], dict]:
    """The FSDP2 recipe's accelerate config on 2 CPU processes in fp32, started through tests/fsdp_cpu.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp_config(tmp_path)),
            str(ROOT / "tests" / "fsdp_cpu.py")], env


def two_processes(kind: str, setup, out: Path, tmp_path, *extra, env_extra=None) -> subprocess.CompletedProcess:
    if kind == "ddp":
        launch, env = launch_two_cpu_processes(tmp_path)
        launch = launch + ["-m", "ecomla"]
    else:
        launch, env = fsdp2_launch(tmp_path)
    cmd = launch + ["distill", str(setup / "mla"), "--out", str(out), "--batch-size", "2", *common(setup), *extra]
    return subprocess.run(cmd, env={**env, **(env_extra or {})}, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def runs(setup):
    """The reference (1 process, batch 4) and each 2-process run (batch 2 each), made when first asked for."""
    made = {}

    def run(kind: str) -> Path:
        out = setup / kind
        if kind not in made:
            if kind == "one":
                cmd = ["distill", str(setup / "mla"), "--out", str(out), "--batch-size", "4", *common(setup)]
                assert main(cmd) == 0
            else:
                res = two_processes(kind, setup, out, setup)
                assert res.returncode == 0, res.stderr[-3000:]
            made[kind] = out
        return made[kind]
    return run


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # each launch starts 2 processes: 30-60 s on 2 shared cores
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_at_the_same_global_batch(setup, runs, kind):
    one, two = runs("one"), runs(kind)
    ref, got = [r for r in rows(one) if "loss" in r], [r for r in rows(two) if "loss" in r]
    assert [r["stage"] for r in got] == ["ild"] * 2 + ["kd"] * 6 == [r["stage"] for r in ref]
    assert min(r["loss"] for r in got if r["stage"] == "kd") > 0.3  # a KL worth a relative tolerance
    for a, b in zip(got, ref):  # the gradient norm too: AdamW's update alone would hide a gradient off by a factor
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=0), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=0), (a, b)
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert sorted(w1) == sorted(w2)  # gathered once into OUT, one name per tied weight
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert json.loads((two / "ecomla_train.json").read_text())["world_size"] == 2
    ckpt = sorted((two / "checkpoints").iterdir())
    assert [p.name for p in ckpt] == ["step-0000006", "step-0000008"], ckpt
    assert sorted(p.name for p in ckpt[-1].glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    if kind == "fsdp2":  # a sharded checkpoint: one file of model and one of optimizer state per process
        heldout = lambda out: rows(out)[-1]["final"]["heldout"]  # noqa: E731  (every process runs it under FSDP)
        assert heldout(two)["kl_to_teacher"] == pytest.approx(heldout(runs("ddp"))["kl_to_teacher"], rel=1e-5)
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (ckpt[-1] / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(two).config.model_type == "ecomla"


@pytest.mark.slow
def test_fsdp2_kill_9_then_resume_is_bit_identical(setup, runs, tmp_path):
    """The main process is killed as step 5 starts (the last checkpoint: step 4); --resume restores the sharded
    model and optimizer states and every process's RNG, and ends on the uninterrupted run's rows and weights. It
    resumes with --gradient-checkpointing (a resume may switch it), which under FSDP2 changes no bit either."""
    reference, out = runs("fsdp2"), tmp_path / "cut"
    res = two_processes("fsdp2", setup, out, tmp_path, env_extra={"ECOMLA_TEST_KILL_AT": "5"})
    assert res.returncode != 0 and not (out / "model.safetensors").exists()
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3, 4]
    res = two_processes("fsdp2", setup, out, tmp_path, "--resume", "--gradient-checkpointing")
    assert res.returncode == 0, res.stderr[-3000:]
    assert untimed(out) == untimed(reference)
    w1, w2 = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def fake_acc(kind: str, version: int = 2, names=("EcoMLADecoderLayer", "MLAAttention")):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(fsdp_version=version, transformer_cls_names_to_wrap=list(names))
    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(fsdp_plugin=plugin))


@pytest.mark.parametrize("acc, ild, match", [
    (fake_acc("FSDP", version=1), False, "fsdp_version: 2"),
    (fake_acc("FSDP", names=["LlamaDecoderLayer"]), False, "EcoMLADecoderLayer"),
    (fake_acc("FSDP", names=["EcoMLADecoderLayer"]), True, "--stage kd"),
    (fake_acc("MULTI_CPU"), False, "GPUs only"),  # accelerate dropped the FSDP the config asked for
    (fake_acc("DEEPSPEED"), False, "DeepSpeed is not supported"),
])
def test_a_sharded_setup_stage_1_cannot_run_is_refused_in_one_line(monkeypatch, acc, ild, match):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=match) as err:
        check_sharding(acc, runs_ild=ild)
    assert "\n" not in str(err.value)
    check_sharding(fake_acc("FSDP", names=["EcoMLADecoderLayer"]), runs_ild=False)  # KD only: decoder layers do
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_sharding(fake_acc("MULTI_CPU"), runs_ild=True)  # plain data parallel: nothing to check


def test_the_frozen_teacher_is_sharded_by_layer_under_fsdp_and_gives_the_same_logits(tmp_path):
    """shard_frozen on a 1-process gloo group: each decoder layer a unit of its own, the embeddings and head whole,
    the same logits as the replicated copy; outside FSDP (or with shard=False) nothing is sharded."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    from ecomla.distill.sharding import shard_frozen

    src = make_source("llama", tmp_path / "t")
    ids = torch.randint(0, 128, (2, 12))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        models = {}
        for kind, shard in (("FSDP", True), ("FSDP", False), ("MULTI_CPU", True)):
            acc = SimpleNamespace(distributed_type=DistributedType[kind], device=torch.device("cpu"))
            model = shard_frozen(AutoModelForCausalLM.from_pretrained(src).requires_grad_(False), acc, shard)
            models[kind, shard] = model
        units = {key: [isinstance(m, FSDPModule) for m in (*model.model.layers, model.model, model)]
                 for key, model in models.items()}
        assert units == {("FSDP", True): [True] * 3 + [False, False], ("FSDP", False): [False] * 5,
                         ("MULTI_CPU", True): [False] * 5}
        with torch.no_grad():
            logits = [m(input_ids=ids).logits for m in models.values()]
        assert all(torch.equal(logits[0], x) for x in logits[1:])
    finally:
        dist.destroy_process_group()


def test_fsdp_asked_for_on_cpu_processes_is_refused_before_anything_is_written(setup, tmp_path, capsys, monkeypatch):
    """accelerate drops the FSDP plugin on CPU processes (they would train as plain data parallel): one line, no
    forward pass, no file written (the whole command in this process, as `accelerate launch` would start it)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    argv = ["distill", str(setup / "mla"), "--out", str(tmp_path / "out"), "--data", str(setup / "chat.jsonl")]
    assert_refused(argv, capsys, monkeypatch, "FSDP runs on GPUs only", roots=(tmp_path, setup))
