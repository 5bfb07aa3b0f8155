"""The memory arithmetic of one KD step (`ecomla distill --stage kd`), per device: pure functions of shapes.

Notation (docs/DESIGN-NOTES.md): B micro-batch, T block length, N target rows (at most B (T - 1): every position a
target), D hidden, I MLP width, H query heads, G KV heads, d_h head dim, r_q / r_kv ranks, d_nope / d_rope / d_v,
d_qk = d_nope + d_rope, V vocabulary, L layers, W world size, P parameter counts. Bytes: c = 2 in bf16 autocast, 4 in
fp32.

What autograd saves for backward, per token and decoder layer (counted from the code: tests/test_plan.py pins these
counts to the tensors `torch.autograd.graph.saved_tensors_hooks` sees, fp32 and bf16 autocast, with and without
latent norms, MLA and kept GQA layers):

    fp32:  MLA  6D + 4I + r_q + (r_kv + d_rope) + 2 H d_qk + H (d_nope + d_v) + H d_v + H + 2 + 2 d_rope + T^2/(B T)
           GQA  6D + 4I + H d_h + 2 G d_h + H d_h + H + 2 + 2 d_h + T^2/(B T)
    bf16:  fp32 part  4D + H + 2 + 2 d_rope  (the residual stream and both RMSNorms' inputs and normalised values,
                                              SDPA's log-sum-exp, the norms' rsqrt, the rotary table)
           bf16 part  MLA  4D + 4I + r_q + r_kv + 2 H d_qk + H (d_nope + d_v) + H d_v + T^2/(B T)
                      GQA  5D + 4I + 2 H d_h + 2 G d_h + T^2/(B T)
           (each linear saves its own bf16 copy of its input: 2 per RMSNorm output, 3 for GQA's q, k, v; q and k
           reach SDPA as fp32, the rotary table being fp32, and are saved as SDPA's bf16 copies)
    latent norms add 2 r_q + 2 r_kv + d_rope + 2 (fp32), or r_q + r_kv + 2 in fp32 and r_q + r_kv in bf16 (autocast).

The 6D are the layer input, both norms' normalised value and output, and the residual after attention; 4I the MLP's
gate, SiLU, up and product; the T^2 term the boolean causal mask, which SDPA turns into a float mask per layer.
The model adds 2D + 1 (final norm) fp32 and the int64 token ids per token, c N D + N (the target rows' hidden states
as lm_head reads them, and their mask), and in bf16 autocast a bf16 copy of every linear weight (autocast caches
them until backward), 2 P_linear.
With gradient checkpointing (one checkpoint per decoder layer) only the layer inputs stay, c_res D per token and
layer (fp32: the residual stream is fp32 in both precisions), and one layer's activations are recomputed at a time.

KD logits (ecomla/losses.py): the student's logits meet the teacher's `chunk` rows at a time. What stays for
backward is 4 N V bytes: the compiled loss saves one fp32 [rows, V] tensor per chunk, and above `checkpoint_above`
elements every chunk is checkpointed, which keeps its fp32 teacher logits; the eager loss below that saves two
(8 N V). While a chunk runs forward, 3 (compiled) or 7 (eager) fp32 [chunk, V] tensors are alive at once, its saved
one included; backward adds the lm_head gradient, or one [chunk, V] gradient (eager), or a recomputed chunk's work
less one (checkpointed). Those counts were measured on this CPU (benchmarks/plan_memory.py). The teacher's final
hidden states at the target rows stay for the whole step (c N D_teacher).

Strategies (per device; P_s student, P_t trained, P_teacher). The frozen teacher follows distill's rule
(`ecomla.distill.sharding.shard_frozen`): under fsdp its decoder layers are sharded like the student's (c P_root +
c (P_teacher - P_root) / W, plus two of its layers gathered, one prefetched); otherwise it is replicated (c P_teacher).
    ddp    weights 4 P_s, gradients 4 P_t, DDP's gradient buckets 4 P_t (W > 1), AdamW 8 P_t
    fsdp   weights 4 P_s / W, gradients 4 P_t / W, AdamW 8 P_t / W, plus the unsharded working set in c bytes:
           parameters of the root (embeddings, lm_head, final norm) and two decoder layers (one prefetched), and
           gradients of the root and one layer before their reduce-scatter
    zero3  bf16: weights 2 P_s / W, gradients 2 P_t / W, optimizer 12 P_t / W (fp32 master copy and m, v; the
           ZeRO paper's 2 + 2 + 12); fp32: 4, 4, 8; plus the same working set as fsdp
The step peaks at the start of backward (static + activations + saved logits + one chunk + the lm_head gradient) or
at the optimizer step (static + every gradient); with gradient accumulation the gradients stay between micro-steps.
Not counted: the CUDA context and the allocator's cache (`RESERVE` is kept free for them), the data loader.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..mla.config import MLASpec

STRATEGIES = ("ddp", "fsdp", "zero3")
GB = 10**9  # memory sizes are given and printed in GB (10^9 bytes)
RESERVE = 1 * GB  # kept free on a GPU for the CUDA context, cuBLAS workspaces and the allocator's cache
COMPILED_WORK, EAGER_WORK = 3, 7  # fp32 [chunk, V] tensors alive at once while a chunk's loss runs forward


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer of the student: an MLA spec, or None for a kept GQA layer."""

    spec: MLASpec | None


@dataclass(frozen=True)
class Shapes:
    """What the arithmetic needs of the two models (from their configs and their meta-device builds)."""

    hidden: int  # D
    intermediate: int  # I
    heads: int  # H
    kv_heads: int  # G
    head_dim: int  # d_h
    vocab: int  # V
    layers: tuple  # [LayerShape] per decoder layer
    student_params: int  # P_s (tied weights once)
    trained_params: int  # P_t
    linear_params: int  # weights every linear reads (lm_head included): autocast's bf16 copies
    root_params: int  # embeddings, lm_head and final norm: what FSDP keeps in the root unit
    layer_params: int  # the largest decoder layer
    head_params: int  # lm_head (its gradient appears first in backward)
    teacher_params: int
    teacher_root_params: int  # the teacher's embeddings, lm_head and final norm: whole on every device
    teacher_layer_params: int  # its largest decoder layer
    teacher_hidden: int  # D of the teacher


@dataclass(frozen=True)
class Setup:
    """How the step runs: the distill flags that move memory, and the machine."""

    strategy: str = "ddp"
    world: int = 1
    batch: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 (autocast) or fp32
    chunk: int = 1024
    compiled: bool = True  # --compile-loss
    checkpointing: bool = False  # gradient checkpointing, one checkpoint per decoder layer
    checkpoint_above: int = 2**27  # ecomla.losses.chunked_loss's default

    @property
    def c(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def targets(self) -> int:
        """N: every position but the last of each block is a target at most (--no-mask-prompt)."""
        return self.batch * (self.seq_len - 1)


def layer_bytes_per_token(s: Shapes, layer: LayerShape, setup: Setup) -> float:
    """Bytes one decoder layer saves for backward per token (the formula of the module docstring)."""
    D, I, H, G, d_h, T, B = s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim, setup.seq_len, setup.batch
    mask = T * T / (B * T)  # [1, 1, T, T] per layer, shared by the batch
    spec = layer.spec
    if spec is None:
        # bf16: q_proj, k_proj and v_proj each save their own copy of the normed input (D more than MLA's two)
        rope, attn32, attn16 = d_h, H * d_h + 2 * G * d_h + H * d_h, D + 2 * H * d_h + 2 * G * d_h
        norm32, norm16 = 0, (0, 0)
    else:
        r_q, r_kv, d_r, d_qk = spec.q_lora_rank or 0, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_head_dim
        rope = d_r
        heads = 2 * H * d_qk + H * (spec.qk_nope_head_dim + spec.v_head_dim) + H * spec.v_head_dim
        attn32, attn16 = r_q + r_kv + d_r + heads, r_q + r_kv + heads
        # latent norms: each saves its input (in fp32) and its normalised value, plus an rsqrt
        q_norm = spec.latent_norm and spec.q_lora_rank is not None
        norm32 = (2 * r_q + 1) * q_norm + (2 * r_kv + d_r + 1) * spec.latent_norm
        norm16 = ((r_q + 1) * q_norm + (r_kv + 1) * spec.latent_norm, r_q * q_norm + r_kv * spec.latent_norm)
    if setup.precision == "fp32":
        return 4 * (6 * D + 4 * I + attn32 + H + 2 + 2 * rope + mask + norm32)
    return 4 * (4 * D + H + 2 + 2 * rope + norm16[0]) + 2 * (4 * D + 4 * I + attn16 + mask + norm16[1])


def activation_bytes(s: Shapes, setup: Setup) -> float:
    """The student's saved activations for one micro-batch (layers and model level), per device."""
    tokens, c = setup.batch * setup.seq_len, setup.c
    per_layer = [layer_bytes_per_token(s, layer, setup) * tokens for layer in s.layers]
    # final norm, token ids, the target rows' hidden states as lm_head reads them and their mask
    model = 4 * (2 * s.hidden + 1) * tokens + 8 * tokens + c * setup.targets * s.hidden + setup.targets
    if c == 2:  # autocast's bf16 copy of every linear weight
        model += 2 * s.linear_params
    if setup.checkpointing:  # the fp32 residual stream at every layer input, one layer recomputed at a time
        return model + 4 * s.hidden * tokens * len(s.layers) + max(per_layer)
    return model + sum(per_layer)


def logits_bytes(s: Shapes, setup: Setup) -> dict:
    """The chunked KD loss's memory: what stays for backward, the peak while the last chunk runs forward, and what
    backward adds on top of what stays (the module docstring's measured counts)."""
    n, V = setup.targets, s.vocab
    recompute = n * V > setup.checkpoint_above
    one = 4 * min(setup.chunk, n) * V  # one fp32 [chunk, V] tensor
    saved = (4 if setup.compiled or recompute else 8) * n * V
    work = (COMPILED_WORK if setup.compiled else EAGER_WORK) * one
    behind = saved * max(n - setup.chunk, 0) / n  # the chunks before the last
    after = max(4 * s.head_params, (work - one) if recompute else 0 if setup.compiled else one)
    return {"saved": saved, "forward": behind + work, "backward": saved + after,
            "teacher rows": setup.c * n * s.teacher_hidden}


@dataclass(frozen=True)
class Plan:
    """Bytes per device, by what holds them, and the step's peak."""

    rows: dict  # name -> bytes
    peak_backward: float
    peak_step: float

    @property
    def peak(self) -> float:
        return max(self.peak_backward, self.peak_step)


def state_bytes(s: Shapes, setup: Setup) -> dict:
    """Weights, gradients and optimizer states per device for the strategy (the module docstring's table)."""
    W, P_s, P_t, c = setup.world, s.student_params, s.trained_params, setup.c
    if setup.strategy == "ddp":
        return {"student weights": 4 * P_s, "gradients": 4 * P_t, "DDP gradient buckets": 4 * P_t if W > 1 else 0,
                "AdamW states": 8 * P_t, "unsharded working set": 0}
    working = c * (2 * s.root_params + 3 * s.layer_params)  # root and 2 layers' params, root and 1 layer's grads
    if setup.strategy == "fsdp":
        return {"student weights": 4 * P_s / W, "gradients": 4 * P_t / W, "DDP gradient buckets": 0,
                "AdamW states": 8 * P_t / W, "unsharded working set": working}
    if setup.strategy == "zero3":
        weights, grads, opt = (2, 2, 12) if c == 2 else (4, 4, 8)
        return {"student weights": weights * P_s / W, "gradients": grads * P_t / W, "DDP gradient buckets": 0,
                "AdamW states": opt * P_t / W, "unsharded working set": working}
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {setup.strategy!r}")


def teacher_bytes(s: Shapes, setup: Setup) -> dict:
    """The frozen teacher's row, by distill's rule (see the module docstring)."""
    if setup.strategy != "fsdp":
        return {"teacher weights (replicated)": setup.c * s.teacher_params}
    layers = s.teacher_params - s.teacher_root_params
    return {"teacher weights (layers sharded)": setup.c * (s.teacher_root_params + layers / setup.world
                                                           + 2 * s.teacher_layer_params)}


def plan(s: Shapes, setup: Setup) -> Plan:
    """The per-device plan of one KD step."""
    rows = state_bytes(s, setup)
    rows.update(teacher_bytes(s, setup))
    rows["activations"] = activation_bytes(s, setup)
    kd = logits_bytes(s, setup)
    rows["KD teacher hidden rows"] = kd["teacher rows"]
    rows["KD logits (saved)"] = kd["saved"]
    rows["KD logits (peak of a chunk)"] = max(kd["forward"], kd["backward"]) - kd["saved"]
    static = sum(v for k, v in rows.items() if k not in ("gradients", "activations") and not k.startswith("KD "))
    grads_between = rows["gradients"] if setup.grad_accum > 1 else 0  # accumulated across micro-batches
    backward = static + grads_between + rows["activations"] + kd["teacher rows"] + max(kd["forward"], kd["backward"])
    return Plan(rows, peak_backward=backward, peak_step=static + rows["gradients"])


def fits(p: Plan, memory: float, reserve: float = RESERVE) -> bool:
    return p.peak <= memory - reserve


def largest_batch(s: Shapes, setup: Setup, memory: float, reserve: float = RESERVE) -> int:
    """The largest micro-batch (blocks per device) that fits and divides the global batch, which --grad-accum then
    keeps; 0 if none."""
    total = setup.batch * setup.grad_accum
    for b in sorted((b for b in range(1, total + 1) if total % b == 0), reverse=True):
        if fits(plan(s, replace(setup, batch=b, grad_accum=total // b)), memory, reserve):
            return b
    return 0
