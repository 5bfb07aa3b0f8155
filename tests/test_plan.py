"""`ecomla plan`: the activation formula against what autograd really saves, the arithmetic of one case by hand, the
published shapes, the refusals, and the README's GPU plans rerun (so they cannot rot).

    python -m pytest -q tests/test_plan.py
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from ecomla.cli import main
from ecomla.common import UserError
from ecomla.losses import chunked_loss
from ecomla.mla import EcoMLAForCausalLM
from ecomla.mla.config import EcoMLAConfig, MLASpec, SourceShape
from ecomla.plan import PlanArgs, plan_run
from ecomla.plan import models as plan_models
from ecomla.plan.memory import GB, Setup, activation_bytes, logits_bytes
from ecomla.plan.models import build_meta, shapes
from ecomla.bench.shapes import shape_config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_mla(q_rank=24, latent_norm=False, kept=()) -> EcoMLAConfig:
    spec = MLASpec.for_source(SourceShape(64, 4, 2, 16, 3), kv_rank=12, rope_dim=8, q_rank=q_rank,
                              latent_norm=latent_norm)
    return EcoMLAConfig(**TINY, mla_layers=[None if i in kept else spec.to_dict() for i in range(3)])


def saved_bytes(model, B: int, T: int, precision: str) -> int:
    """Bytes of every tensor autograd saves in a KD forward (student, eager loss, no checkpointing), weights aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.bool)
    teacher = torch.randn(B * (T - 1), 128)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        chunked_loss(h[:, :-1][mask[:, 1:]], model.lm_head, lambda lo, hi: teacher[lo:hi], ids[:, 1:].flatten(),
                     chunk=40, compiled=False)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["mla", "latent-norm", "full-rank-q", "hybrid"])
def test_activation_formula_is_what_autograd_saves(precision, variant):
    """The docstring's per-layer counts (memory.py) equal the bytes of the tensors backward keeps, exactly."""
    config = {"mla": tiny_mla(), "latent-norm": tiny_mla(latent_norm=True), "full-rank-q": tiny_mla(q_rank=None),
              "hybrid": tiny_mla(kept=(1,))}[variant]
    torch.manual_seed(0)
    model = EcoMLAForCausalLM(config).train()
    B, T = 2, 32
    setup = Setup(batch=B, seq_len=T, precision=precision, chunk=40, compiled=False)
    s = shapes(config, shape_config("tiny"), "all")
    want = activation_bytes(s, setup) + logits_bytes(s, setup)["saved"]
    assert saved_bytes(model, B, T, precision) == pytest.approx(want, abs=64)  # a few loss scalars


def tiny_files(tmp_path) -> tuple[Path, Path]:
    """A tiny MLA config.json and a teacher config.json, as `ecomla plan` reads them."""
    student, teacher = tmp_path / "student.json", tmp_path / "teacher.json"
    student.write_text(tiny_mla().to_json_string())
    teacher.write_text(json.dumps({"model_type": "llama", **TINY}))
    return student, teacher


def test_one_case_by_hand(tmp_path):
    """DDP on 2 devices, fp32, batch 2 x 32: every row from the tiny model's shapes, counted by hand."""
    student, teacher = tiny_files(tmp_path)
    r = plan_run(PlanArgs(student=str(student), teacher=str(teacher), world_size=2, precision="fp32", batch_size=2,
                          seq_len=32, chunk=1024, memory_per_device="2GB"))
    D, I, V, H = 64, 96, 128, 4
    layer = (D * 24 + 24 * H * 16 + D * 20 + 12 * H * 24 + H * 16 * D  # q_a, q_b, kv_a, kv_b, o_proj
             + 3 * D * I + 2 * D)  # MLP and two norms
    P = V * D + 3 * layer + D  # tied embeddings, 3 layers, final norm
    teacher_layer = D * H * 16 + 2 * D * 2 * 16 + H * 16 * D + 3 * D * I + 2 * D
    P_teacher = V * D + 3 * teacher_layer + D
    assert (r["student_params"], r["teacher_params"]) == (P, P_teacher)
    rows = r["rows"]
    assert rows["student weights"] == 4 * P and rows["gradients"] == 4 * P
    assert rows["DDP gradient buckets"] == 4 * P and rows["AdamW states"] == 8 * P
    assert rows["teacher weights (replicated)"] == 4 * P_teacher
    fsdp = plan_run(PlanArgs(student=str(student), teacher=str(teacher), world_size=2, precision="fp32", batch_size=2,
                             seq_len=32, chunk=1024, memory_per_device="2GB", strategy="fsdp"))["rows"]
    root = V * D + D  # tied embeddings and head, final norm: whole on every device, as distill's shard_frozen keeps them
    assert fsdp["teacher weights (layers sharded)"] == 4 * (root + 3 * teacher_layer / 2 + 2 * teacher_layer)
    N, tokens = 2 * 31, 2 * 32
    per_token = 4 * (6 * D + 4 * I + 24 + 20 + 2 * H * 16 + H * 24 + H * 16 + H + 2 + 2 * 8 + 32 / 2)
    assert rows["activations"] == pytest.approx(3 * per_token * tokens + 4 * (2 * D + 1) * tokens + 8 * tokens
                                                + 4 * N * D + N)
    assert rows["KD logits (saved)"] == 4 * N * V  # compiled loss: one fp32 [N, V]
    static = 4 * P + 4 * P + 8 * P + 4 * P_teacher
    forward = 3 * 4 * N * V  # the one chunk's work: 3 fp32 [N, V]
    assert r["peak"] == pytest.approx(static + rows["activations"] + 4 * N * D + forward)
    assert r["fits"]


def test_published_shapes_build_the_published_parameter_counts():
    counts = {hub: sum(p.numel() for p in build_meta(plan_models.model_config(hub, "-")[0]).parameters())
              for hub in ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct")}
    assert counts == {"meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
                      "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248}


def test_refusals_are_one_line_before_any_work(tmp_path, monkeypatch):
    student, teacher = tiny_files(tmp_path)
    monkeypatch.setattr(plan_models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserError, match="the hub is unreachable from here"):
        plan_run(PlanArgs(student="someone/some-model", kv_rank=64))
    with pytest.raises(UserError, match="give --kv-rank"):
        plan_run(PlanArgs(student=str(teacher)))
    with pytest.raises(UserError, match="records no source model: pass --teacher"):
        plan_run(PlanArgs(student=str(student)))
    with pytest.raises(UserError, match="--memory-per-device"):
        PlanArgs(student=str(student), memory_per_device="lots")


def test_a_source_plans_as_it_would_convert(tmp_path, capsys):
    _, teacher = tiny_files(tmp_path)
    assert main(["plan", str(teacher), "--kv-rank", "12", "--rope-dim", "8", "--q-rank", "24", "--precision", "fp32",
                 "--memory-per-device", "2GB"]) == 0
    out = capsys.readouterr().out
    assert "converted as `ecomla convert` --kv-rank 12 --rope-dim 8 --q-rank 24" in out and "fits in 2 GB" in out


def readme_plans() -> list[tuple[str, str]]:
    """(command, the row that quotes its output) for each `ecomla plan` row of the README's GPU section."""
    section = (ROOT / "README.md").read_text().split("## Running on GPUs", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "`ecomla plan " in line]
    return [(re.search(r"`(ecomla plan [^`]+)`", row).group(1), row) for row in rows]


@pytest.mark.parametrize("command,row", readme_plans())
def test_readme_gpu_plans_are_what_the_commands_print(command, row):
    """Each row's numbers are what its command prints today."""
    argv = shlex.split(command)[1:]
    r = plan_run(PlanArgs(**{**_flags(argv[2:]), "student": argv[1]}))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{r['peak'] / GB:.1f}" and cells[3] == f"{r['peak_checkpointed'] / GB:.1f}", row
    assert cells[4].startswith("yes" if r["fits"] else "no"), row
    assert cells[5] == ("-" if r["fits"] else r["instead"][0].split(": ", 1)[1]), row


def _flags(argv: list[str]) -> dict:
    out = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        key = flag[2:].replace("-", "_")
        out[key] = int(value) if value.isdigit() and key != "memory_per_device" else value
    return out


def test_the_readme_has_a_plan_for_each_gpu_recipe_at_80_and_40_gb():
    plans = readme_plans()
    for recipe in sorted((ROOT / "recipes").glob("distill-gpu-*.yaml")):
        for memory in ("80GB", "40GB"):
            assert any(f"recipes/{recipe.name}" in c and f"--memory-per-device {memory}" in c for c, _ in plans), \
                (recipe.name, memory)
