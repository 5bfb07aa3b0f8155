"""`ecomla distill STUDENT --teacher T --data D --out DIR`: stage 1, layer-wise alignment then end-to-end KD.

    ecomla distill out/student-4x --teacher default --data default --out runs/kd-4x --max-minutes 30
    ecomla distill out/student-4x --out runs/kd-4x-1m --max-tokens 1000000    # a token budget instead
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m ecomla distill out/student-4x --out runs/ddp
    accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m ecomla distill ...  # GPUs: DDP or FSDP2

The output folder is a loadable checkpoint (config.json + safetensors + tokenizer) plus metrics.jsonl and
checkpoints/step-*/ for --resume. Recipes with every option: recipes/*.yaml (`--config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..args import arg, flag_list
from ..common import UserError, resolve_precision
from ..data.text import check_text
from ..losses import KINDS
from ..mla.quant import check_cache_bits

STAGES = ("ild", "kd", "both")
TRAINABLE = ("all", "attention", "mla")
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_MAX_TOKENS = 1_000_000  # the KD budget when neither --max-tokens nor --max-minutes is given
# what a --resume may change: none of them shapes the data stream, the schedule or the model (--max-minutes moves
# the clock's stop, and sizes the schedule only when the run stopped before its length was fixed)
RESUMABLE = ("max_minutes", "save_every", "keep_last", "eval_tokens", "compile_loss", "chunk", "progress",
             "gradient_checkpointing")


@dataclass
class DistillArgs:
    student: str = arg("MLA checkpoint to train (from `ecomla convert`)", positional=True)
    teacher: str = arg("teacher: 'source' (the model the student was converted from), a folder, hub id or "
                       "'default'; must share the student's vocabulary", default="source")
    data: str = arg("chat data: 'default' (English ShareGPT), a local file, or a hub id; its train split is used",
                    default="default")
    text_data: str | None = arg("plain text mixed into training: 'lambada' (book passages, read by no evaluation "
                                "here), a .txt / .jsonl file; default none (chat only)", default=None)
    text_share: float = arg("share of the training blocks taken from --text-data", default=0.25)
    out: str = arg("output folder", default="runs/distill")
    stage: str = arg("ild (layer-wise alignment only), kd (end-to-end only) or both", default="both", choices=STAGES)
    max_tokens: int | None = arg("KD token budget; also sets the length of the LR schedule; unset: "
                                 f"{DEFAULT_MAX_TOKENS:,}, or with --max-minutes the tokens that fill the minutes",
                                 default=None)
    ild_tokens: int = arg("ILD token budget", default=65_536)
    max_minutes: float | None = arg("training minutes, counted over resumed runs too; the KD schedule is sized to "
                                    "fill them from the speed measured on its first steps, and ends at its floor; "
                                    "with --max-tokens, whichever ends first", default=None)
    resume: bool = arg("continue from the newest checkpoint in OUT/checkpoints; every other setting must match the "
                       "first run except " + flag_list(RESUMABLE),
                       default=False)
    seq_len: int = arg("tokens per packed block", default=256)
    batch_size: int = arg("blocks per micro-batch per process", default=4)
    grad_accum: int = arg("micro-batches per optimizer step", default=1)
    lr: float = arg("KD peak learning rate (the paper's 1B recipe: 8e-5)", default=1e-4)
    ild_lr: float = arg("ILD peak learning rate", default=1e-3)
    min_lr_ratio: float = arg("cosine floor as a fraction of the peak", default=0.1)
    warmup_ratio: float = arg("warmup share of each stage (paper: 0.01); a KD stage sized by --max-minutes warms up "
                              "over 2 steps", default=0.01)
    weight_decay: float = arg("AdamW weight decay", default=0.0)
    betas: str = arg("AdamW betas (paper: 0.9,0.98)", default="0.9,0.98")
    grad_clip: float = arg("max gradient norm (0 = off)", default=1.0)
    loss: str = arg("KD divergence: forward (KL(teacher||student), paper), reverse, jsd", default="forward",
                    choices=KINDS)
    temperature: float = arg("KD temperature (loss scaled by T^2)", default=1.0)
    kl_weight: float = arg("weight of the divergence", default=1.0)
    ce_weight: float = arg("weight of plain cross-entropy on the data (paper default 0)", default=0.0)
    mask_prompt: bool = arg("KD on assistant tokens only; by default every token is a target (the teacher gives a "
                            "distribution at every position: after 12 minutes of KD at 4x on an AMD CPU, held-out "
                            "chat KL 0.93 against 1.05 with --mask-prompt)", default=False)
    trainable: str = arg("KD trainable set: all (paper), attention, mla", default="all", choices=TRAINABLE)
    cache_bits: int | None = arg("train for a latent cache of 8 or 4 bits: every forward reads the latent fake-"
                                 "quantized as that cache stores it (straight-through gradients); recorded in the "
                                 "output's config.json, so generate and eval decode with it; 16 = off; default: the "
                                 "student's own", default=None)
    precision: str = arg("bf16 (autocast, CPU and GPU), fp32, or auto: bf16 where the GPU or CPU has bf16 units, "
                         "else fp32 (emulated bf16 is slower); one precision per process",
                         default="auto", choices=PRECISIONS)
    gradient_checkpointing: bool = arg("recompute each decoder layer's activations in the backward pass: the "
                                       "student keeps one layer's activations instead of all, for a second forward "
                                       "pass; the same losses and gradients", default=False)
    teacher_topk: int = arg("use cached teacher top-k log-probs (computed once, reused) instead of a live "
                            "teacher; 0 = live full-vocabulary teacher", default=0)
    save_every: int = arg("checkpoint every N optimizer steps", default=50)
    keep_last: int = arg("checkpoints to keep", default=2)
    eval_tokens: int = arg("held-out target tokens for the final KL/perplexity check (0 = skip)", default=4096)
    compile_loss: bool = arg("fuse the forward-KL loss with torch.compile (compiles once per process; falls back "
                             "to eager where compiling fails)", default=True)
    chunk: int = arg("target rows per full-vocabulary logits chunk", default=1024)
    seed: int = arg("seed (data order, init of nothing else)", default=0)
    progress: bool = arg("show a progress bar: each step's own loss, tokens/s and learning rate", default=True)

    def __post_init__(self):
        for name, choices in (("stage", STAGES), ("loss", KINDS), ("trainable", TRAINABLE), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:  # a recipe's values do not pass argparse's choices
                raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        check_cache_bits(self.cache_bits)
        self.precision = resolve_precision(self.precision)  # derived once: what this machine trains fastest in
        try:
            assert len(self.beta_pair) == 2 and all(0 <= x < 1 for x in self.beta_pair)
        except (ValueError, AssertionError):
            raise UserError(f"--betas must be two numbers in [0, 1) like 0.9,0.98, got {self.betas!r}") from None
        for name in ("max_tokens", "batch_size", "grad_accum", "save_every", "keep_last", "chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be >= 2 (a block's first token is no target), got {self.seq_len}")
        if self.ild_tokens < 0 or self.lr <= 0 or self.ild_lr <= 0:
            raise UserError("--ild-tokens must be >= 0 and learning rates > 0")
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise UserError("--kl-weight and --ce-weight are both 0: nothing to train")
        if self.teacher_topk and self.loss != "forward":
            raise UserError("--teacher-topk only supports --loss forward (the student's mass outside the teacher's "
                            "top k has no teacher log-prob for reverse KL / JSD)")
        if self.text_data is not None and not 0 < self.text_share < 1:
            raise UserError(f"--text-share must be in (0, 1) with --text-data, got {self.text_share}")
        if self.text_data is not None:
            check_text(self.text_data, "--text-data")
        if self.text_data is not None and self.teacher_topk:
            raise UserError("--teacher-topk caches the teacher on the chat stream only; drop it or --text-data")
        if self.max_minutes is not None and self.max_minutes <= 0 or self.temperature <= 0:
            raise UserError("--max-minutes and --temperature must be > 0")

    @property
    def kd_tokens(self) -> int | None:
        """The KD token budget; None: sized by --max-minutes."""
        if self.max_tokens is not None or self.max_minutes is not None:
            return self.max_tokens
        return DEFAULT_MAX_TOKENS

    @property
    def beta_pair(self) -> tuple[float, float]:
        return tuple(float(x) for x in self.betas.split(","))
