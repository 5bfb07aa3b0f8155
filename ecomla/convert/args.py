"""`ecomla convert`'s flags (`ConvertArgs`) and every check that needs no weights (`check_shapes`, `parse_layers`).

Flags most runs leave alone are `advanced` (their own heading in `--help`); removed flags are `RETIRED`, each
refused with one line saying why and what replaced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..args import arg, flag_list
from ..common import DTYPES, UserError
from ..mla import deepseek
from ..mla.config import MLASpec, SourceShape, parse_q_rank
from . import svd
from .inits import INITS, FitChoice, RopeChoice

LOST = "lost to {} (docs/RESULTS.md); {}"
BUDGET = LOST.format("uniform ranks at 4x and 8x", "{}")


@dataclass
class ConvertArgs:
    """`ecomla convert` flags. Validation derives, once: `method` (the InitMethod of --init with the --rope-*,
    --damp and fitted-init choices) and `q_rank_choice` (--q-rank parsed: an int, "auto" or None)."""

    RETIRED = {  # removed flags: why, and what to do instead (ecomla/args.py refuses them with this line)
        "v_dim": "d_v is always the source head dim (o_proj is reused, so value heads stay whole); drop it",
        "kv_budget": "allocating r_kv per layer from a total budget " + BUDGET.format("use --kv-rank R"),
        "allow_hybrid": "--kv-budget " + BUDGET.format("choose the layers that stay GQA with --layers"),
        "budget_norm": "--kv-budget " + BUDGET.format("use --kv-rank R"),
        "kv_balance": "scaling K to V's energy before the joint factorisation did not lower the KL (docs/RESULTS.md); "
                      "drop it",
        "sequential": "fitting each layer on the converted layers below " + LOST.format("one-shot calibration",
                                                                                        "drop it"),
        "o_refit": "no refit and the 'residual' target " + LOST.format(
            "the refit towards the teacher's attention output", "drop it (--o-ridge sets its pull)"),
    }

    src: str = arg("source checkpoint: a folder, a hub id, or 'default' (SmolLM2-135M-Instruct)", positional=True)
    out: str = arg("output folder (written atomically)", positional=True)
    kv_rank: int | None = arg("latent rank r_kv per MLA layer (or use --rank-energy). Where it pays, on SmolLM2-135M "
                              "(docs/RESULTS.md section 5): 64 with d_rope 32 and a 4-bit latent cache (`distill "
                              "--cache-bits 4`) is 12.8x smaller than the bf16 GQA cache and, after 46k KD tokens, "
                              "below the source's 2-bit quantized caches (5.5x) in KL (0.95 / 1.17 chat / text "
                              "against 1.55 / 1.30). Up to ~3.3x, quantizing the source's own cache is the better choice "
                              "(4-bit: KL 0.016, against 0.39 for r_kv 160 at 0 tokens)", default=None)
    rope_dim: int = arg("d_rope: decoupled rotary dims, one rotary key shared by all heads", default=32)
    nope_dim: int | None = arg("d_nope: non-rotary q/k dims per head (default: head_dim - rope_dim)", default=None,
                               advanced=True)
    q_rank: str = arg("r_q: an integer, 'auto' (parameter parity with the source, paper 4.1) or 'none' "
                      "(full-rank q_proj)", default="auto")
    layers: str = arg("layers that become MLA: 'all', a list '1,3,5', or 'every:K[:OFFSET]'; the rest stay GQA",
                      default="all")
    init: str = arg("initialisation: 'xecomla' (paper Algorithm 1), 'random' (ablation), 'whitened' (activation-"
                    "aware SVD), 'rope-aware' (whole RoPE pairs, fitted shared key), 'rope-whitened' (both), 'fitted' "
                    "(rope-whitened's rotary layout; the latent chosen in the teacher's attention on calibration "
                    "data, up-projections by least squares, o_proj refitted; docs/DESIGN-NOTES.md); docs/RESULTS.md "
                    "compares them", default="xecomla", choices=tuple(INITS))
    rope_select: str = arg("rope-aware inits: keep the pairs whose scores change most without rotation "
                           "('contribution': magnitude x rotation over --rope-distance tokens), the largest 'magnitude' "
                           "(MHA2MLA 2-norm), or the fastest pairs ('high')", default="contribution",
                           choices=("contribution", "magnitude", "high"), advanced=True)
    rope_distance: int = arg("rope-aware 'contribution' rule: token distances over which a pair's lost rotation is "
                             "averaged (the context length that matters)", default=512, advanced=True)
    rope_key_fit: str = arg("rope-aware inits: shared rotary key = rank-1 PCA across KV heads ('pca'), the same "
                            "weighted by the energy of the queries that read each head ('query'), or their mean "
                            "('mean')", default="pca", choices=("pca", "query", "mean"), advanced=True)
    key_weight: str | None = arg("fitted init: alpha, the weight of key (logit) errors against value errors "
                                 "(default: FitChoice's)", default=None, advanced=True)
    o_ridge: float | None = arg("fitted init: ridge of the o_proj refit towards the source o_proj, a fraction of "
                                "the mean diagonal of its gram (default: FitChoice's)", default=None, advanced=True)
    attention_metric: str | None = arg("fitted init: judge keys by the attention they receive and values on the "
                                       "mixtures attention forms, in the teacher's attention on calibration data: "
                                       "'up' for the K/V up-projections, 'all' also for the latent, 'none' "
                                       "(default: FitChoice's)", default=None, choices=("none", "up", "all"),
                                       advanced=True)
    calib_data: str = arg("calibration chat data (train split only)", default="default")
    calib_seqs: int = arg("calibration sequences", default=128)
    calib_len: int = arg("calibration sequence length", default=256, advanced=True)
    calib_seed: int = arg("calibration sample seed", default=0, advanced=True)
    damp: float = arg("whitening damping (fraction of the mean diagonal of the input covariance)", default=1e-4,
                      advanced=True)
    rank_energy: float | None = arg("per-layer r_kv = smallest rank keeping this share of the [W_K;W_V] "
                                    "spectral energy (paper delta_kv)", default=None)
    q_rank_energy: float | None = arg("per-layer r_q from an energy threshold on W_Q (paper delta_q)", default=None,
                                      advanced=True)
    sigma: str = arg("where the singular values go: 'up' (paper: W_D=U) or 'down' (authors' code)",
                     default="up", choices=svd.SIGMA_PLACEMENTS, advanced=True)
    latent_norm: bool = arg("RMSNorm on the q/kv latents (DeepSeek), fitted on calibration data (a latent basis "
                            "with a steadier rms or a pad channel that evens it, gain = mean rms) so the model "
                            "stays close to the norm-free one; off in the paper (Table 13)", default=False)
    target: str = arg("checkpoint format the conversion must be expressible in: 'ecomla' (any layout) or "
                      "'deepseek-v3' (what `ecomla export --format deepseek-v3` and stock engines take: latent "
                      "norms, a plain RoPE subset, one shape for every layer, no biases)", default="ecomla",
                      choices=("ecomla", deepseek.FORMAT))
    mla_rope: str = arg("RoPE of the decoupled rotary dims: 'source' (the source's theta and scaling) or "
                        "'yarn' (what the authors' code silently does for Llama-3)", default="source",
                        choices=("source", "yarn"), advanced=True)
    dtype: str = arg("dtype of the written weights ('auto' = the source's)", default="auto",
                     choices=("auto", *DTYPES))
    seed: int = arg("seed for --init random", default=0, advanced=True)
    overwrite: bool = arg("replace OUT if it holds an earlier output of this command (never other files)",
                          default=False)

    def __post_init__(self):
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose from {', '.join(INITS)}")
        base = INITS[self.init]
        rope = None if base.rope is None else RopeChoice(self.rope_select, self.rope_distance, self.rope_key_fit)
        self.method = dataclasses.replace(base, rope=rope, damp=self.damp, fit=self._fit_choice(base.fit))
        self.q_rank_choice = parse_q_rank(self.q_rank)  # r_q, "auto" or None
        if [self.kv_rank, self.rank_energy].count(None) != 1:
            raise UserError("give exactly one of --kv-rank R or --rank-energy DELTA")
        if self.method.rope is not None and self.nope_dim is not None:
            raise UserError("rope-aware inits use every non-rotary dim as NoPE (d_nope = head_dim - rope_dim); "
                            "drop --nope-dim")
        if self.target == deepseek.FORMAT:
            self._check_target()
        if self.calib_seqs < 1 or self.calib_len < 8:
            raise UserError("--calib-seqs must be >= 1 and --calib-len >= 8")
        if self.kv_rank is not None and self.kv_rank < 1:
            raise UserError(f"--kv-rank must be >= 1, got {self.kv_rank}")
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise UserError(f"--rope-dim must be a positive even number (rotary dims come in pairs), got {self.rope_dim}")
        for name in ("rank_energy", "q_rank_energy"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")

    def _check_target(self) -> None:
        """--target deepseek-v3: refuse what the format cannot express; it implies --latent-norm."""
        what = "--target deepseek-v3 needs one shape for every layer (the format has one kv_lora_rank)"
        if self.kv_rank is None:
            raise UserError(f"{what}: give --kv-rank R instead of --rank-energy")
        if self.q_rank_energy is not None:
            raise UserError(f"{what}: drop --q-rank-energy")
        if self.layers != "all":
            raise UserError("--target deepseek-v3 makes every layer MLA (the format has no GQA layers): drop --layers")
        if self.mla_rope != "source":
            raise UserError("--target deepseek-v3 needs a plain RoPE on the rotary dims; drop --mla-rope yarn")
        self.latent_norm = True

    def _fit_choice(self, base: FitChoice | None) -> FitChoice | None:
        """The init's FitChoice with the --key-weight / --o-ridge / --attention-metric overrides (fitted only)."""
        given = {k: v for k, v in (("key_weight", self.key_weight), ("o_ridge", self.o_ridge),
                                   ("attention_metric", self.attention_metric)) if v is not None}
        if base is None:
            if given:
                raise UserError(f"{flag_list(given)}: only the fitted init (--init fitted) reads these settings")
            return None
        fit = base
        if self.key_weight is not None:
            fit = dataclasses.replace(fit, key_weight=_key_weight(self.key_weight))
        if self.attention_metric is not None:
            fit = dataclasses.replace(fit, attention_metric=self.attention_metric)
        if self.o_ridge is not None:
            if not self.o_ridge >= 0:
                raise UserError(f"--o-ridge must be >= 0, got {self.o_ridge}")
            fit = dataclasses.replace(fit, ridge=self.o_ridge)
        return fit


def _key_weight(text: str) -> float:
    if "," in text:
        raise UserError(f"--key-weight {text!r}: give one number; a key weight per layer chosen by its attention-"
                        "output error " + LOST.format("one for all layers", "drop the list"))
    try:
        alpha = float(text)
    except ValueError:
        alpha = float("nan")
    if not alpha > 0:
        raise UserError(f"--key-weight {text!r}: give a positive number")
    return alpha


def parse_layers(text: str, n_layers: int) -> list[int]:
    text = text.strip()
    if text == "all":
        return list(range(n_layers))
    try:
        if text.startswith("every:"):
            parts = [int(p) for p in text.split(":")[1:]]
            k, offset = parts[0], (parts[1] if len(parts) > 1 else 0)
            if k < 1:
                raise ValueError
            idx = list(range(offset, n_layers, k))
        else:
            idx = sorted({int(p) for p in text.split(",") if p.strip()})
    except (ValueError, IndexError):
        raise UserError(f"--layers {text!r}: use 'all', a list like '1,3,5' or 'every:K[:OFFSET]'") from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad or not idx:
        raise UserError(f"--layers {text!r}: layer indices must be in [0, {n_layers - 1}], got {bad or 'none'}")
    return idx


def check_shapes(args: ConvertArgs, shape: SourceShape) -> int:
    """Validate rope/nope dims and fixed ranks against the source before any weight is read; returns d_nope."""
    trial = MLASpec.for_source(shape, args.kv_rank or 1, args.rope_dim, q_rank=None, nope_dim=args.nope_dim)
    rope_aware = args.method.rope is not None
    limit = shape.max_kv_rank(args.rope_dim, rope_aware)
    if args.kv_rank is not None and args.kv_rank > limit:
        what = f"[W_K nope; W_V] (a rope-aware init, --rope-dim {args.rope_dim})" if rope_aware else "[W_K; W_V]"
        raise UserError(f"--kv-rank {args.kv_rank} exceeds the rank of {what}, at most {limit}; pick a rank <= "
                        f"{limit}")
    q_limit = min(shape.hidden_size, shape.num_heads * shape.head_dim)
    if isinstance(args.q_rank_choice, int) and not 1 <= args.q_rank_choice <= q_limit:
        raise UserError(f"--q-rank {args.q_rank} must be in [1, {q_limit}] (the rank of W_Q)")
    return trial.qk_nope_head_dim


def mla_rope_parameters(args: ConvertArgs, fields: dict) -> dict | None:
    if args.mla_rope == "source":
        return None
    rope = fields["rope_parameters"]
    factor = float(rope.get("factor") or 1.0)
    if factor <= 1.0:
        raise UserError("--mla-rope yarn needs a source with RoPE scaling (factor > 1); this source has none")
    return {"rope_type": "yarn", "rope_theta": rope["rope_theta"], "factor": factor, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0, "original_max_position_embeddings": 4096}
