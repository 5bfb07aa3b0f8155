"""`ecomla convert SRC OUT`: turn a GQA checkpoint into an MLA checkpoint (model plumbing around factor.py).

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32
    ecomla convert meta-llama/Llama-3.2-1B-Instruct out/llama1b-kv64 --kv-rank 64 --rope-dim 32 --q-rank 1424

Reads the source with transformers, factors each selected layer's Q/K/V (float64), copies o_proj, MLP,
norms and embeddings, and writes an HF folder (config.json + safetensors + tokenizer +
ecomla_convert.json with the per-layer report) atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..args import arg, flag_list
from ..common import DTYPES, UserError
from ..outputs import atomic_dir, check_out
from ..io import count_params, load_config, load_model, load_tokenizer
from ..mla import EcoMLAForCausalLM
from ..mla import deepseek
from ..mla.config import EcoMLAConfig, MLASpec, SourceShape, parse_q_rank
from ..mla.rope import rope_inv_freq
from . import norms
from . import ranks as rank_alloc
from . import svd
from .calibrate import calibration_batches, layer_input_stats
from .factor import LayerPlan, factor_layer, plan_layer
from .families import ATTN_COPY_IF_KEPT, LAYER_COPY, MODEL_COPY, source_fields
from .fit import input_map
from .inits import INITS, FitChoice, RopeChoice, best_pairs, pair_scores
from .sequential import fit_sequentially


@dataclass
class ConvertArgs:
    """`ecomla convert` flags. Validation derives, once: `method` (the InitMethod of --init with the --rope-*,
    --kv-balance and --damp choices) and `q_rank_choice` (--q-rank parsed: an int, "auto" or None)."""

    src: str = arg("source checkpoint: a folder, a hub id, or 'default' (SmolLM2-135M-Instruct)", positional=True)
    out: str = arg("output folder (written atomically)", positional=True)
    kv_rank: int | None = arg("latent rank r_kv per MLA layer (or use --rank-energy)", default=None)
    rope_dim: int = arg("d_rope: decoupled rotary dims, one rotary key shared by all heads", default=32)
    nope_dim: int | None = arg("d_nope: non-rotary q/k dims per head (default: head_dim - rope_dim)", default=None)
    v_dim: int | None = arg("d_v: value dims per head; must equal the source head dim (default)", default=None)
    q_rank: str = arg("r_q: an integer, 'auto' (parameter parity with the source, paper 4.1) or 'none' "
                      "(full-rank q_proj)", default="auto")
    layers: str = arg("layers that become MLA: 'all', a list '1,3,5', or 'every:K[:OFFSET]'; the rest stay GQA",
                      default="all")
    init: str = arg("initialisation: 'xecomla' (paper Algorithm 1), 'random' (ablation), 'whitened' (activation-"
                    "aware SVD), 'rope-aware' (whole RoPE pairs, fitted shared key), 'rope-whitened' (both), 'fitted' "
                    "(rope-whitened with K judged by its logits, V through o_proj, the key mean ignored, and o_proj "
                    "refitted); docs/RESULTS.md compares them", default="xecomla", choices=tuple(INITS))
    kv_budget: str | None = arg("total KV budget, as a ratio ('4x') or elements/token over all layers: r_kv per "
                                "layer is allocated to minimise summed (whitened) reconstruction error", default=None)
    allow_hybrid: bool = arg("with --kv-budget: let the allocation keep some layers as GQA", default=False)
    budget_norm: str = arg("error each layer contributes to the allocation: absolute or relative (per-layer "
                           "share of energy)", default="absolute", choices=("absolute", "relative"))
    rope_select: str = arg("rope-aware inits: keep the pairs whose scores change most without rotation "
                           "('contribution': magnitude x rotation over --rope-distance tokens), the largest 'magnitude' "
                           "(MHA2MLA 2-norm), or the fastest pairs ('high')", default="contribution",
                           choices=("contribution", "magnitude", "high"))
    rope_distance: int = arg("rope-aware 'contribution' rule: token distances over which a pair's lost rotation is "
                             "averaged (the context length that matters)", default=512)
    rope_key_fit: str = arg("rope-aware inits: shared rotary key = rank-1 PCA across KV heads ('pca'), the same "
                            "weighted by the energy of the queries that read each head ('query'), or their mean "
                            "('mean')", default="pca", choices=("pca", "query", "mean"))
    kv_balance: bool = arg("scale K rows so K and V carry equal energy before the joint K/V factorisation "
                           "(TransMLA's BKV); for the whitened and rope-aware inits", default=False)
    key_weight: str | None = arg("fitted init: alpha, the weight of key (logit) errors against value errors; a "
                                 "comma list lets each layer take the one with the smallest attention-output "
                                 "error (default: FitChoice's)", default=None)
    o_refit: str | None = arg("fitted init: refit o_proj towards the teacher's attention 'output', the stream "
                              "after attention ('residual'), or 'none' (default: FitChoice's)", default=None,
                              choices=("output", "residual", "none"))
    sequential: bool | None = arg("fitted init: fit layer l on the inputs the converted layers below produce "
                                  "(default: FitChoice's)", default=None)
    o_ridge: float | None = arg("fitted init: ridge of the o_proj refit towards the source o_proj, a fraction of "
                                "the mean diagonal of its gram (default: FitChoice's)", default=None)
    attention_metric: str | None = arg("fitted init: judge keys by the attention they receive and values on the "
                                       "mixtures attention forms, in the teacher's attention on calibration data: "
                                       "'up' for the K/V up-projections, 'all' also for the latent, 'none' "
                                       "(default: FitChoice's)", default=None, choices=("none", "up", "all"))
    calib_data: str = arg("calibration chat data (train split only)", default="default")
    calib_seqs: int = arg("calibration sequences", default=128)
    calib_len: int = arg("calibration sequence length", default=256)
    calib_seed: int = arg("calibration sample seed", default=0)
    damp: float = arg("whitening damping (fraction of the mean diagonal of the input covariance)", default=1e-4)
    rank_energy: float | None = arg("per-layer r_kv = smallest rank keeping this share of the [W_K;W_V] "
                                    "spectral energy (paper delta_kv)", default=None)
    q_rank_energy: float | None = arg("per-layer r_q from an energy threshold on W_Q (paper delta_q)", default=None)
    sigma: str = arg("where the singular values go: 'up' (paper: W_D=U) or 'down' (authors' code)",
                     default="up", choices=svd.SIGMA_PLACEMENTS)
    latent_norm: bool = arg("RMSNorm on the q/kv latents (DeepSeek), fitted on calibration data (a latent basis "
                            "with a steadier rms, gain = mean rms) so the model stays close to the norm-free one; "
                            "off in the paper (Table 13)", default=False)
    target: str = arg("checkpoint format the conversion must be expressible in: 'ecomla' (any layout) or "
                      "'deepseek-v3' (what `ecomla export --format deepseek-v3` and stock engines take: latent "
                      "norms, a plain RoPE subset, one shape for every layer, no biases)", default="ecomla",
                      choices=("ecomla", deepseek.FORMAT))
    mla_rope: str = arg("RoPE of the decoupled rotary dims: 'source' (the source's theta and scaling) or "
                        "'yarn' (what the authors' code silently does for Llama-3)", default="source",
                        choices=("source", "yarn"))
    dtype: str = arg("dtype of the written weights ('auto' = the source's)", default="auto",
                     choices=("auto", *DTYPES))
    seed: int = arg("seed for --init random", default=0)
    overwrite: bool = arg("replace OUT if it holds an earlier output of this command (never other files)",
                          default=False)

    def __post_init__(self):
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose from {', '.join(INITS)}")
        base = INITS[self.init]
        rope = None if base.rope is None else RopeChoice(self.rope_select, self.rope_distance, self.rope_key_fit)
        self.method = dataclasses.replace(base, rope=rope, kv_balance=self.kv_balance, damp=self.damp,
                                          fit=self._fit_choice(base.fit))
        self.q_rank_choice = parse_q_rank(self.q_rank)  # r_q, "auto" or None
        if [self.kv_rank, self.rank_energy, self.kv_budget].count(None) != 2:
            raise UserError("give exactly one of --kv-rank R, --rank-energy DELTA or --kv-budget B")
        if self.allow_hybrid and self.kv_budget is None:
            raise UserError("--allow-hybrid needs --kv-budget")
        if self.allow_hybrid and self.layers != "all":
            raise UserError("--allow-hybrid chooses the GQA layers itself; drop --layers")
        if self.method.rope is not None and self.nope_dim is not None:
            raise UserError("rope-aware inits use every non-rotary dim as NoPE (d_nope = head_dim - rope_dim); "
                            "drop --nope-dim")
        if self.kv_balance and not (self.method.whiten or self.method.rope is not None):
            raise UserError("--kv-balance applies to the whitened / rope-aware inits, not to --init " + self.init)
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
            raise UserError(f"{what}: give --kv-rank R instead of --kv-budget or --rank-energy")
        if self.q_rank_energy is not None:
            raise UserError(f"{what}: drop --q-rank-energy")
        if self.layers != "all" or self.allow_hybrid:
            raise UserError("--target deepseek-v3 makes every layer MLA (the format has no GQA layers): drop "
                            "--layers and --allow-hybrid")
        if self.mla_rope != "source":
            raise UserError("--target deepseek-v3 needs a plain RoPE on the rotary dims; drop --mla-rope yarn")
        self.latent_norm = True

    def _fit_choice(self, base: FitChoice | None) -> FitChoice | None:
        """The init's FitChoice with the --key-weight / --o-refit / --sequential / --o-ridge overrides (fitted only)."""
        given = {k: v for k, v in (("key_weight", self.key_weight), ("o_refit", self.o_refit),
                                   ("sequential", self.sequential), ("o_ridge", self.o_ridge),
                                   ("attention_metric", self.attention_metric)) if v is not None}
        if base is None:
            if given:
                raise UserError(f"{flag_list(given)}: only the fitted init (--init fitted) reads these settings")
            return None
        fit = base
        if self.key_weight is not None:
            try:
                weights = tuple(float(w) for w in self.key_weight.split(","))
            except ValueError:
                weights = ()
            if not weights or any(not w > 0 for w in weights):
                raise UserError(f"--key-weight {self.key_weight!r}: give a positive number or a comma list of them")
            fit = dataclasses.replace(fit, key_weights=weights)
        if self.o_refit is not None:
            fit = dataclasses.replace(fit, o_target=self.o_refit)
        if self.sequential is not None:
            fit = dataclasses.replace(fit, sequential=self.sequential)
        if self.attention_metric is not None:
            fit = dataclasses.replace(fit, attention_metric=self.attention_metric)
        if self.o_ridge is not None:
            if not self.o_ridge >= 0:
                raise UserError(f"--o-ridge must be >= 0, got {self.o_ridge}")
            fit = dataclasses.replace(fit, ridge=self.o_ridge)
        return fit


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
    """Validate rope/nope/v dims and fixed ranks against the source before any weight is read; returns d_nope."""
    D, G, d_h = shape.hidden_size, shape.num_kv_heads, shape.head_dim
    trial = MLASpec.for_source(shape, args.kv_rank or 1, args.rope_dim, q_rank=None, nope_dim=args.nope_dim)
    if args.v_dim is not None and args.v_dim != d_h:
        raise UserError(f"--v-dim {args.v_dim} must equal the source head dim {d_h}: o_proj is reused, so value "
                        "heads stay whole")
    rope_aware = args.method.rope is not None
    rows = G * (d_h - args.rope_dim) + G * d_h if rope_aware else shape.kv_elements_per_layer
    what = "[W_K nope; W_V]" if rope_aware else "[W_K; W_V]"
    if args.kv_rank is not None and args.kv_rank > min(D, rows):
        raise UserError(f"--kv-rank {args.kv_rank} exceeds the rank of {what} (at most min(D={D}, {rows}) = "
                        f"{min(D, rows)}); pick a rank <= {min(D, rows)}")
    if args.kv_budget is not None:
        rank_alloc.parse_budget(args.kv_budget, shape.kv_elements)
    q_limit = min(D, shape.num_heads * d_h)
    if isinstance(args.q_rank_choice, int) and not 1 <= args.q_rank_choice <= q_limit:
        raise UserError(f"--q-rank {args.q_rank} must be in [1, {q_limit}] (the rank of W_Q)")
    return trial.qk_nope_head_dim


def layer_source(sd: dict, i: int, shape: SourceShape) -> svd.Source:
    p = f"model.layers.{i}.self_attn."
    return svd.Source(
        w_q=sd[p + "q_proj.weight"], w_k=sd[p + "k_proj.weight"], w_v=sd[p + "v_proj.weight"],
        b_q=sd.get(p + "q_proj.bias"), b_k=sd.get(p + "k_proj.bias"), b_v=sd.get(p + "v_proj.bias"),
        H=shape.num_heads, G=shape.num_kv_heads, d_h=shape.head_dim, w_o=sd[p + "o_proj.weight"],
    )


def choose_kv_ranks(args: ConvertArgs, plans: dict[int, LayerPlan], shape: SourceShape) -> dict[int, int | None]:
    """r_kv per candidate layer: fixed, by energy threshold, or allocated from a total budget (None = keep GQA)."""
    if args.kv_rank is not None:
        return {i: args.kv_rank for i in plans}
    spectra = {i: p.kv_spectrum() for i, p in plans.items()}
    if args.rank_energy is not None:
        return {i: svd.energy_rank(s, args.rank_energy) for i, s in spectra.items()}
    gqa = shape.kv_elements_per_layer
    kept = shape.num_layers - len(plans)  # layers outside --layers stay GQA and use budget too
    total = rank_alloc.parse_budget(args.kv_budget, shape.kv_elements) - kept * gqa
    idx = sorted(plans)
    limits = [min(shape.hidden_size, len(spectra[i])) for i in idx]
    ranks, _ = rank_alloc.allocate([spectra[i] for i in idx], total, args.rope_dim, limits,
                                   gqa_cost=gqa if args.allow_hybrid else None, norm=args.budget_norm)
    return dict(zip(idx, ranks))


def layer_specs(args: ConvertArgs, plans: dict[int, LayerPlan], shape: SourceShape, log) -> dict[int, MLASpec]:
    """The MLA spec of every layer that becomes MLA (the budget may keep some as GQA)."""
    specs = {}
    for i, r_kv in choose_kv_ranks(args, plans, shape).items():
        if r_kv is None:
            continue  # the budget keeps this layer as GQA
        rows, q_rank = plans[i].rows, args.q_rank_choice
        if q_rank is not None and args.q_rank_energy is not None:
            q_rank = svd.energy_rank(plans[i].q_spectrum(), args.q_rank_energy)
        rope_aware = rows.pairs is not None  # the source's frequencies, so the source's softmax scale
        specs[i] = MLASpec.for_source(shape, r_kv, args.rope_dim, q_rank, nope_dim=rows.d_nope,
                                      latent_norm=args.latent_norm, rope_pairs=rows.pairs,
                                      softmax_scale=shape.head_dim**-0.5 if rope_aware else None)
        if specs[i].cache_elements >= shape.kv_elements_per_layer:
            log(f"warning: layer {i} caches {specs[i].cache_elements} elements per token, not fewer than the "
                f"source's {shape.kv_elements_per_layer}")
    if not specs:
        raise UserError("the KV budget keeps every layer as GQA; lower --kv-budget or drop --allow-hybrid")
    return specs


def mla_rope_parameters(args: ConvertArgs, fields: dict) -> dict | None:
    if args.mla_rope == "source":
        return None
    rope = fields["rope_parameters"]
    factor = float(rope.get("factor") or 1.0)
    if factor <= 1.0:
        raise UserError("--mla-rope yarn needs a source with RoPE scaling (factor > 1); this source has none")
    return {"rope_type": "yarn", "rope_theta": rope["rope_theta"], "factor": factor, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0, "original_max_position_embeddings": 4096}


def build_state_dict(args: ConvertArgs, sd: dict, n_layers: int, plans: dict[int, LayerPlan],
                     specs: dict[int, MLASpec]) -> tuple[dict, list[dict]]:
    """New state dict (float64 for factored weights) and the per-layer report."""
    out = {k: sd[k] for k in MODEL_COPY if k in sd}
    report = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.update({p + k: sd[p + k] for k in LAYER_COPY if p + k in sd})
        if i not in specs:
            out.update({p + k: sd[p + k] for k in ATTN_COPY_IF_KEPT if p + k in sd})
            report.append({"layer": i, "type": "gqa"})
            continue
        spec = specs[i]
        row = {"layer": i, "type": "mla", "q_rank": spec.q_lora_rank, "kv_rank": spec.kv_lora_rank}
        if args.method.factored:
            tensors, rep = factor_layer(plans[i], spec.q_lora_rank, spec.kv_lora_rank, args.sigma)
            out.update({p + "self_attn." + k: v for k, v in tensors.items()})
            row.update(rep)
        report.append(row)
    return out, report


def materialise(config: EcoMLAConfig, sd: dict, dtype: torch.dtype, seed: int):
    """An EcoMLAForCausalLM holding `sd`; MLA weights absent from `sd` (random init) are drawn here.
    Loading is strict: a missing or unexpected tensor is an error, never silently skipped."""
    with torch.device("meta"):
        model = EcoMLAForCausalLM(config)
    expected = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    full = {}
    for name, meta in expected.items():
        if name in sd:
            t = sd[name]
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            t = sd["model.embed_tokens.weight"]
        elif ".self_attn." in name and name.endswith("layernorm.weight"):
            t = torch.ones(meta.shape)
        elif ".self_attn." in name and name.endswith(".bias"):
            t = torch.zeros(meta.shape)
        elif ".self_attn." in name:
            t = torch.randn(meta.shape, generator=gen) * config.initializer_range
        else:
            raise UserError(f"the source checkpoint has no tensor for {name}")
        if tuple(t.shape) != tuple(meta.shape):
            raise RuntimeError(f"shape mismatch for {name}: built {tuple(t.shape)}, model expects {tuple(meta.shape)}")
        full[name] = t.to(dtype).contiguous()
    model.load_state_dict(full, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def fit_layers(args: ConvertArgs, sd: dict, fields: dict, config: EcoMLAConfig, specs: dict[int, MLASpec],
               new_sd: dict, report: list[dict], src_path, inv_freq: torch.Tensor, log) -> None:
    """The fitted init: refit every MLA layer on calibration activations, layer by layer (sequential.py);
    updates `new_sd` and the per-layer `report` in place."""
    shape = SourceShape.of(config)
    n = shape.num_layers
    teacher_sd, _ = build_state_dict(args, sd, n, {}, {})  # the source, as an all-GQA EcoMLA model
    teacher_cfg = EcoMLAConfig(**fields, mla_layers=[None] * n, architectures=["EcoMLAForCausalLM"])
    teacher = materialise(teacher_cfg, teacher_sd, torch.float32, args.seed)
    student = materialise(norm_free(config), new_sd, torch.float32, args.seed)
    batches = calibration_batches(load_tokenizer(src_path), args.calib_data, args.calib_seqs, args.calib_len,
                                  args.calib_seed)
    fit_reports = {}

    def fit_qkv(i: int, moments: dict, key_weight: float) -> dict:
        spec = specs[i]
        src = layer_source(sd, i, shape).reading(input_map(moments["cov_ts"], moments["cov"], args.method.damp))
        plan = plan_layer(args.method, src, spec.qk_rope_head_dim, spec.qk_nope_head_dim, moments, inv_freq,
                          pairs=spec.rope_pairs, key_weight=key_weight)
        tensors, fit_reports[i] = factor_layer(plan, spec.q_lora_rank, spec.kv_lora_rank, args.sigma)
        return tensors

    log(f"fitting {len(specs)} layers in turn on {args.calib_seqs} x {args.calib_len} calibration tokens")
    updates, rows = fit_sequentially(teacher, student, batches, fit_qkv, args.method.fit)
    for i, tensors in updates.items():
        new_sd.update({f"model.layers.{i}.self_attn.{k}": v for k, v in tensors.items()})
    by_layer = {r["layer"]: r for r in rows}
    for r in report:
        if r["layer"] in fit_reports:
            r.update(fit_reports[r["layer"]], **by_layer.get(r["layer"], {}))


def check_target_source(args: ConvertArgs, source: EcoMLAConfig) -> None:
    """--target deepseek-v3, before any weight is read: the source's own obstacles and the rotary layout."""
    broken = deepseek.source_problems(source)
    if broken:
        raise UserError("--target deepseek-v3: " + "; ".join(broken))
    if args.method.rope is None and not deepseek.fresh_rope_is_plain(source, args.rope_dim):
        kind = source.rope_parameters.get("rope_type", "default")
        raise UserError(f"--target deepseek-v3: this init gives the rotary dims fresh frequencies with the "
                        f"source's {kind!r} RoPE scaling, which engines rewrite to DeepSeek's YaRN; use a rope-aware "
                        "init (--init rope-whitened or fitted), which keeps a plain subset of the source's pairs")


def target_rope_pairs(args: ConvertArgs, sd: dict, shape: SourceShape, stats: dict, inv_freq: torch.Tensor,
                      layers: list[int]) -> list[int] | None:
    """--target deepseek-v3 with a rope-aware init: one plain rotary layout for every layer, pairs 0, k, 2k, ...
    (a plain RoPE of dim d_rope), the k whose pairs score highest summed over the layers (inits.pair_scores)."""
    if args.method.rope is None:
        return None  # fresh frequencies, plain for an unscaled source (check_target_source)
    m = args.rope_dim // 2
    candidates = deepseek.evenly_spaced_pairs(inv_freq, m)
    if not candidates:
        raise UserError(f"--target deepseek-v3: no evenly spaced set of {m} of the source's {len(inv_freq)} frequency "
                        "pairs is a plain RoPE (the source's RoPE scaling changes them); lower --rope-dim")
    rope = args.method.rope
    score = sum(pair_scores(layer_source(sd, i, shape), (stats.get(i) or {}).get("cov"), rope.select, inv_freq,
                            rope.distance) for i in layers)
    return best_pairs(candidates, score)


def norm_free(config: EcoMLAConfig) -> EcoMLAConfig:
    """The same model without latent norms: what the inits fit (the norms' gains are set afterwards)."""
    return EcoMLAConfig.from_dict({**config.to_dict(), "mla_layers": [
        None if s is None else {**s, "latent_norm": False} for s in config.mla_layers]})


@torch.no_grad()
def fit_latent_norms(args: ConvertArgs, config: EcoMLAConfig, new_sd: dict, src_path, log,
                     max_seqs: int = 16) -> None:
    """Latent norms that keep the model close to the norm-free one (norms.py): per MLA layer and latent, a change
    of latent basis B that steadies the latent's rms over calibration tokens (folded into the down-projection's
    rows and the up-projection's columns: the norm-free layer is unchanged), then the gain g = mean rms(B c).
    Measured on the norm-free model; updates `new_sd` in place."""
    model = materialise(norm_free(config), new_sd, torch.float32, args.seed)
    n_seqs = min(args.calib_seqs, max_seqs)
    latents: dict[tuple[int, str], list] = {}  # (layer, "kv" | "q") -> [c [B*T, r], ...]

    def record(key, width: int):
        def hook(_m, _args, out):
            latents.setdefault(key, []).append(out[..., :width].reshape(-1, width).float())
        return hook

    handles = []
    for i in config.mla_layer_indices:
        attn, spec = model.model.layers[i].self_attn, config.mla_spec(i)
        handles.append(attn.kv_a_proj_with_mqa.register_forward_hook(record((i, "kv"), spec.kv_lora_rank)))
        if spec.q_lora_rank is not None:
            handles.append(attn.q_a_proj.register_forward_hook(record((i, "q"), spec.q_lora_rank)))
    try:
        for ids in calibration_batches(load_tokenizer(src_path), args.calib_data, n_seqs, args.calib_len,
                                       args.calib_seed):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    names = {"kv": ("kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm"), "q": ("q_a_proj", "q_b_proj", "q_a_layernorm")}
    before, after = [], []
    for (i, kind), chunks in tqdm(latents.items(), desc="latent norms", leave=False):
        c = torch.cat(chunks)
        B = norms.steady_basis(c)
        down, up, norm = (f"model.layers.{i}.self_attn.{n}" for n in names[kind])
        r = c.shape[1]
        w = new_sd[down + ".weight"].double()
        new_sd[down + ".weight"] = torch.cat([B @ w[:r], w[r:]])  # kv_a also holds the rotary key rows
        if down + ".bias" in new_sd:
            b = new_sd[down + ".bias"].double()
            new_sd[down + ".bias"] = torch.cat([B @ b[:r], b[r:]])
        new_sd[up + ".weight"] = torch.linalg.solve(B.T, new_sd[up + ".weight"].double().T).T  # W_up B^-1
        c_new = c.double() @ B.T
        new_sd[norm + ".weight"] = torch.full((r,), norms.mean_rms(c_new), dtype=torch.float64)
        if kind == "kv":
            before.append(norms.steadiness(c))
            after.append(norms.steadiness(c_new))
    log(f"latent norms: on {n_seqs} x {args.calib_len} calibration tokens, the KV latent's rms varies by "
        f"{sum(before) / len(before):.3f} (mean coefficient of variation over layers), {sum(after) / len(after):.3f} "
        "after the change of basis; gains = mean rms")


def calibration_stats(args: ConvertArgs, src_model, src_path, layers: list[int], log) -> dict:
    """Per-layer input statistics for the inits that read activations (empty for the others)."""
    if not args.method.needs_calibration:
        return {}
    log(f"calibrating on {args.calib_seqs} x {args.calib_len} tokens of {args.calib_data} (train split)")
    return layer_input_stats(src_model.float(), load_tokenizer(src_path), str(src_path), args.calib_data,
                             args.calib_seqs, args.calib_len, args.calib_seed, layers)


def convert(args: ConvertArgs, log=print) -> dict:
    t0 = time.time()
    src_config, src_dir = load_config(args.src)  # validate everything cheap before touching weights
    inputs = (src_dir, args.calib_data)
    fields, shape = source_fields(src_config), SourceShape.of(src_config)
    d_nope = check_shapes(args, shape)
    if args.target == deepseek.FORMAT:
        check_target_source(args, EcoMLAConfig(**fields))
    mla_idx = parse_layers(args.layers, shape.num_layers)
    mla_rope = mla_rope_parameters(args, fields)
    check_out(args.out, "convert", inputs, overwrite=args.overwrite)
    src_model, src_path = load_model(args.src, dtype="auto")
    src_dtype = src_model.dtype  # calibration runs in float32 below
    sd = {k: v.detach().cpu() for k, v in src_model.state_dict().items()}
    stats = calibration_stats(args, src_model, src_path, mla_idx, log)
    inv_freq = rope_inv_freq(fields["rope_parameters"], shape.head_dim, fields["max_position_embeddings"])[0]
    pairs = target_rope_pairs(args, sd, shape, stats, inv_freq, mla_idx) if args.target == deepseek.FORMAT else None
    plans = {i: plan_layer(args.method, layer_source(sd, i, shape), args.rope_dim, d_nope, stats.get(i), inv_freq,
                           pairs=pairs)
             for i in mla_idx}
    specs = layer_specs(args, plans, shape, log)
    config = EcoMLAConfig(
        **fields,
        mla_layers=[specs[i].to_dict() if i in specs else None for i in range(shape.num_layers)],
        mla_rope_parameters=mla_rope,
        architectures=["EcoMLAForCausalLM"],
    )
    new_sd, report = build_state_dict(args, sd, shape.num_layers, plans, specs)
    if args.method.fit is not None:
        fit_layers(args, sd, fields, config, specs, new_sd, report, src_path, inv_freq, log)
    if args.latent_norm:
        fit_latent_norms(args, config, new_sd, src_path, log)
    if args.target == deepseek.FORMAT and (broken := deepseek.problems(config)):
        raise RuntimeError("bug: the --target deepseek-v3 conversion is not expressible: " + "; ".join(broken))
    dtype = src_dtype if args.dtype == "auto" else DTYPES[args.dtype]
    model = materialise(config, new_sd, dtype, args.seed)
    summary = kv_summary(config, dtype)
    summary.update(params=count_params(model), source_params=count_params(src_model), seconds=round(time.time() - t0, 2))
    with atomic_dir(args.out, "convert", inputs, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        try:
            load_tokenizer(src_path).save_pretrained(tmp)
        except UserError as err:
            log(f"warning: {err}; the output has no tokenizer")
        if src_model.generation_config is not None:
            src_model.generation_config.save_pretrained(tmp)
        meta = {"args": asdict(args), "source": src_path, "layers": report, "summary": summary}
        (tmp / "ecomla_convert.json").write_text(json.dumps(meta, indent=2))
    log(format_report(report, summary))
    return meta


def kv_summary(config: EcoMLAConfig, dtype: torch.dtype) -> dict:
    elems, src = config.kv_elements_per_token(), config.source_kv_elements_per_token()
    size = torch.empty((), dtype=dtype).element_size()
    return {"kv_elements_per_token": elems, "source_kv_elements_per_token": src, "compression": src / elems,
            "kv_bytes_per_token": elems * size, "source_kv_bytes_per_token": src * size, "dtype": str(dtype),
            "mla_layers": config.mla_layer_indices}


def format_report(report: list[dict], summary: dict) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    lines = [f"{'layer':>5} {'type':>4} {'r_q':>5} {'r_kv':>5} {'q_err':>7} {'kv_err':>7} {'kv_energy':>9}"]
    for r in report:
        lines.append(f"{r['layer']:>5} {r['type']:>4} {f(r.get('q_rank')):>5} {f(r.get('kv_rank')):>5} "
                     f"{f(r.get('q_error')):>7} {f(r.get('kv_error')):>7} {f(r.get('kv_energy')):>9}")
    s = summary
    lines.append(
        f"KV cache: {s['kv_elements_per_token']} elements/token over all layers (source {s['source_kv_elements_per_token']})"
        f" -> {s['compression']:.2f}x smaller; {s['kv_bytes_per_token']} B/token in {s['dtype']} "
        f"(source {s['source_kv_bytes_per_token']}); params {s['params']:,} (source {s['source_params']:,}); "
        f"converted in {s['seconds']:.1f} s"
    )
    return "\n".join(lines)
