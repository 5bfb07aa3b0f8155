"""`ecomla convert SRC OUT`: turn a GQA checkpoint into an MLA checkpoint (model plumbing around svd.py).

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32
    ecomla convert meta-llama/Llama-3.2-1B-Instruct out/llama1b-kv64 --kv-rank 64 --rope-dim 32 --q-rank 1424

Reads the source with transformers, factors each selected layer's Q/K/V (float64), copies o_proj, MLP,
norms and embeddings, and writes an HF folder (config.json + safetensors + tokenizer +
ecomla_convert.json with the per-layer report) atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..args import arg
from ..io import DTYPES, UserError, atomic_dir, count_params, load_config, load_model, load_tokenizer
from ..mla.config import EcoMLAConfig, MLASpec
from ..mla.rope import rope_inv_freq
from . import ranks as rank_alloc
from . import svd
from .factor import INITS, NEEDS_CALIBRATION, LayerPlan, factor_layer, plan_layer
from .families import ATTN_COPY_IF_KEPT, LAYER_COPY, MODEL_COPY, check_supported, source_fields



@dataclass
class ConvertArgs:
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
                    "aware SVD), 'rope-aware' (whole RoPE pairs, fitted shared key), 'rope-whitened' (both; "
                    "the best start measured on SmolLM2 at 2x/4x/8x: KL to the teacher 0.7/2.1/4.0 vs 6.7/7.2/9.7 for xecomla, "
                    "and still ahead after the same distillation; docs/RESULTS.md)",
                    default="xecomla", choices=INITS)
    kv_budget: str | None = arg("total KV budget, as a ratio ('4x') or elements/token over all layers: r_kv per "
                                "layer is allocated to minimise summed (whitened) reconstruction error", default=None)
    allow_hybrid: bool = arg("with --kv-budget: let the allocation keep some layers as GQA", default=False)
    budget_norm: str = arg("error each layer contributes to the allocation: absolute or relative (per-layer "
                           "share of energy)", default="absolute", choices=("absolute", "relative"))
    rope_select: str = arg("rope-aware inits: keep the pairs whose scores change most without rotation "
                           "('contribution': magnitude x rotation over 2k tokens), the largest 'magnitude' "
                           "(MHA2MLA 2-norm), or the fastest pairs ('high')", default="contribution",
                           choices=("contribution", "magnitude", "high"))
    rope_distance: int = arg("rope-aware 'contribution' rule: token distances over which a pair's lost rotation is "
                             "averaged (the context length that matters)", default=512)
    rope_key_fit: str = arg("rope-aware inits: shared rotary key = rank-1 PCA across KV heads ('pca') or their "
                            "mean ('mean')", default="pca", choices=("pca", "mean"))
    kv_balance: bool = arg("scale K rows so K and V carry equal energy before the joint K/V factorisation "
                           "(TransMLA's BKV); not for --init xecomla", default=False)
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
    latent_norm: bool = arg("RMSNorm on the q/kv latents (DeepSeek); off in the paper (Table 13)", default=False)
    mla_rope: str = arg("RoPE of the decoupled rotary dims: 'source' (the source's theta and scaling) or "
                        "'yarn' (what the authors' code silently does for Llama-3)", default="source",
                        choices=("source", "yarn"))
    dtype: str = arg("dtype of the written weights ('auto' = the source's)", default="auto",
                     choices=("auto", *DTYPES))
    seed: int = arg("seed for --init random", default=0)
    overwrite: bool = arg("replace OUT if it exists", default=False)

    def __post_init__(self):
        if [self.kv_rank, self.rank_energy, self.kv_budget].count(None) != 2:
            raise UserError("give exactly one of --kv-rank R, --rank-energy DELTA or --kv-budget B")
        if self.allow_hybrid and self.kv_budget is None:
            raise UserError("--allow-hybrid needs --kv-budget")
        if self.allow_hybrid and self.layers != "all":
            raise UserError("--allow-hybrid chooses the GQA layers itself; drop --layers")
        if self.init.startswith("rope") and self.nope_dim is not None:
            raise UserError("rope-aware inits use every non-rotary dim as NoPE (d_nope = head_dim - rope_dim); "
                            "drop --nope-dim")
        if self.kv_balance and self.init in ("xecomla", "random"):
            raise UserError("--kv-balance applies to the whitened / rope-aware inits, not to --init " + self.init)
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
        if self.q_rank not in ("auto", "none") and not str(self.q_rank).isdigit():
            raise UserError(f"--q-rank must be an integer, 'auto' or 'none', got {self.q_rank!r}")


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


def check_shapes(args: ConvertArgs, fields: dict) -> tuple[int, int, int]:
    """Validate rope/nope/v dims and fixed ranks against the source; returns (d_nope, d_v, kv rank limit)."""
    D, G, d_h = fields["hidden_size"], fields["num_key_value_heads"], fields["head_dim"]
    if args.rope_dim > d_h:
        raise UserError(f"--rope-dim {args.rope_dim} is larger than the source head dim {d_h}")
    d_nope = d_h - args.rope_dim if args.nope_dim is None else args.nope_dim
    if not 0 <= d_nope <= d_h:
        raise UserError(f"--nope-dim must be in [0, {d_h}] (the source head dim), got {d_nope}")
    d_v = d_h if args.v_dim is None else args.v_dim
    if d_v != d_h:
        raise UserError(f"--v-dim {d_v} must equal the source head dim {d_h}: o_proj is reused, so value heads stay whole")
    rows = G * (d_h - args.rope_dim) + G * d_h if args.init.startswith("rope") else 2 * G * d_h
    what = "[W_K nope; W_V]" if args.init.startswith("rope") else "[W_K; W_V]"
    kv_limit = min(D, rows)
    if args.kv_rank is not None and args.kv_rank > kv_limit:
        raise UserError(
            f"--kv-rank {args.kv_rank} exceeds the rank of {what} (at most min(D={D}, {rows}) = {kv_limit}); "
            f"pick a rank <= {kv_limit}"
        )
    q_limit = min(D, fields["num_attention_heads"] * d_h)
    if args.q_rank.isdigit() and not 1 <= int(args.q_rank) <= q_limit:
        raise UserError(f"--q-rank {args.q_rank} must be in [1, {q_limit}] (the rank of W_Q)")
    return d_nope, d_v, kv_limit


def layer_source(sd: dict, i: int, fields: dict) -> svd.Source:
    p = f"model.layers.{i}.self_attn."
    return svd.Source(
        w_q=sd[p + "q_proj.weight"], w_k=sd[p + "k_proj.weight"], w_v=sd[p + "v_proj.weight"],
        b_q=sd.get(p + "q_proj.bias"), b_k=sd.get(p + "k_proj.bias"), b_v=sd.get(p + "v_proj.bias"),
        H=fields["num_attention_heads"], G=fields["num_key_value_heads"], d_h=fields["head_dim"],
    )


def q_rank_for(args: ConvertArgs, plan: LayerPlan, fields: dict, r_kv: int) -> int | None:
    src = plan.src
    if args.q_rank == "none":
        return None
    if args.q_rank_energy is not None:
        return svd.energy_rank(inits_q_spectrum(plan), args.q_rank_energy)
    if args.q_rank == "auto":
        return svd.parity_q_rank(fields["hidden_size"], src.H, src.G, src.d_h, r_kv, plan.d_nope, plan.d_rope, plan.d_v)
    return int(args.q_rank)


def inits_q_spectrum(plan: LayerPlan) -> torch.Tensor:
    from .inits import whitened_svd

    return whitened_svd(plan.q_matrix(), plan.L)[1]


def choose_kv_ranks(args: ConvertArgs, plans: dict[int, LayerPlan], fields: dict) -> dict[int, int | None]:
    """r_kv per candidate layer: fixed, by energy threshold, or allocated from a total budget (None = keep GQA)."""
    if args.kv_rank is not None:
        return {i: args.kv_rank for i in plans}
    spectra = {i: (p.kv_spectrum if p.kv_spectrum is not None else svd.kv_singular_values(p.src)) for i, p in plans.items()}
    if args.rank_energy is not None:
        return {i: svd.energy_rank(s, args.rank_energy) for i, s in spectra.items()}
    gqa = 2 * fields["num_key_value_heads"] * fields["head_dim"]
    kept = fields["num_hidden_layers"] - len(plans)  # layers outside --layers stay GQA and use budget too
    total = rank_alloc.parse_budget(args.kv_budget, gqa * fields["num_hidden_layers"]) - kept * gqa
    idx = sorted(plans)
    limits = [min(fields["hidden_size"], len(spectra[i])) for i in idx]
    try:
        ranks, spare = rank_alloc.allocate([spectra[i] for i in idx], total, args.rope_dim, limits,
                                           gqa_cost=gqa if args.allow_hybrid else None, norm=args.budget_norm)
    except ValueError as err:
        raise UserError(str(err)) from err
    return dict(zip(idx, ranks))


def mla_rope_parameters(args: ConvertArgs, fields: dict) -> dict | None:
    if args.mla_rope == "source":
        return None
    rope = fields["rope_parameters"]
    factor = float(rope.get("factor") or 1.0)
    if factor <= 1.0:
        raise UserError("--mla-rope yarn needs a source with RoPE scaling (factor > 1); this source has none")
    return {"rope_type": "yarn", "rope_theta": rope["rope_theta"], "factor": factor, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0, "original_max_position_embeddings": 4096}


def build_state_dict(args, sd, fields, plans: dict[int, LayerPlan], specs: dict[int, MLASpec]):
    """New state dict (float64 for factored weights) and the per-layer report."""
    out = {k: sd[k] for k in MODEL_COPY if k in sd}
    report = []
    for i in range(fields["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + k: sd[p + k] for k in LAYER_COPY if p + k in sd})
        if i not in specs:
            out.update({p + k: sd[p + k] for k in ATTN_COPY_IF_KEPT if p + k in sd})
            report.append({"layer": i, "type": "gqa"})
            continue
        spec = specs[i]
        row = {"layer": i, "type": "mla", "q_rank": spec.q_lora_rank, "kv_rank": spec.kv_lora_rank}
        if args.init != "random":
            tensors, rep = factor_layer(plans[i], spec.q_lora_rank, spec.kv_lora_rank, args.sigma)
            out.update({p + "self_attn." + k: v for k, v in tensors.items()})
            row.update(rep)
        report.append(row)
    return out, report


def materialise(config: EcoMLAConfig, sd: dict, dtype: torch.dtype, seed: int):
    """An EcoMLAForCausalLM holding `sd`; MLA weights absent from `sd` (random init) are drawn here.
    Loading is strict: a missing or unexpected tensor is an error, never silently skipped."""
    from ..mla.model import EcoMLAForCausalLM

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
    model.reset_rope_buffers()
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert(args: ConvertArgs, log=print) -> dict:
    t0 = time.time()
    src_config, _ = load_config(args.src)  # validate everything cheap before touching weights
    try:
        fields = source_fields(src_config)
    except ValueError as err:
        raise UserError(str(err)) from err
    d_nope, d_v, _ = check_shapes(args, fields)
    mla_idx = parse_layers(args.layers, fields["num_hidden_layers"])
    if args.mla_rope != "source":
        mla_rope_parameters(args, fields)
    if Path(args.out).exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists; choose another OUT or pass --overwrite")
    src_model, src_path = load_model(args.src, dtype="auto")
    src_dtype = src_model.dtype  # calibration runs in float32 below
    sd = {k: v.detach().cpu() for k, v in src_model.state_dict().items()}
    stats = {}
    if args.init in NEEDS_CALIBRATION:
        from .calibrate import layer_input_stats

        log(f"calibrating on {args.calib_seqs} x {args.calib_len} tokens of {args.calib_data} (train split)")
        stats = layer_input_stats(src_model.float(), load_tokenizer(src_path), str(src_path), args.calib_data,
                                  args.calib_seqs, args.calib_len, args.calib_seed, mla_idx)
    inv_freq = rope_inv_freq(fields["rope_parameters"], fields["head_dim"], fields["max_position_embeddings"])[0]
    plans = {i: plan_layer(args.init, layer_source(sd, i, fields), args.rope_dim, d_nope, d_v, stats.get(i),
                           args.damp, args.rope_select, args.rope_key_fit, args.kv_balance, inv_freq,
                           args.rope_distance)
             for i in mla_idx}
    if args.init == "random" and (args.rank_energy is not None or args.kv_budget is not None):
        for plan in plans.values():
            plan.kv_spectrum = svd.kv_singular_values(plan.src)
    kv_ranks = choose_kv_ranks(args, plans, fields)
    specs = {}
    for i, r_kv in kv_ranks.items():
        if r_kv is None:
            continue  # the budget keeps this layer as GQA
        plan = plans[i]
        specs[i] = MLASpec(kv_lora_rank=r_kv, qk_rope_head_dim=args.rope_dim, qk_nope_head_dim=plan.d_nope,
                           v_head_dim=d_v, q_lora_rank=q_rank_for(args, plan, fields, r_kv),
                           latent_norm=args.latent_norm, rope_pairs=plan.rope_pairs,
                           softmax_scale=fields["head_dim"] ** -0.5 if plan.rope is not None else None)
    if not specs:
        raise UserError("the KV budget keeps every layer as GQA; lower --kv-budget or drop --allow-hybrid")
    for i, spec in specs.items():
        if spec.kv_lora_rank + spec.qk_rope_head_dim >= 2 * fields["num_key_value_heads"] * fields["head_dim"]:
            log(f"warning: layer {i} caches {spec.cache_elements} elements per token, not fewer than the source's "
                f"{2 * fields['num_key_value_heads'] * fields['head_dim']}")
    config = EcoMLAConfig(
        **fields,
        mla_layers=[specs[i].to_dict() if i in specs else None for i in range(fields["num_hidden_layers"])],
        mla_rope_parameters=mla_rope_parameters(args, fields),
        architectures=["EcoMLAForCausalLM"],
    )
    new_sd, report = build_state_dict(args, sd, fields, plans, specs)
    dtype = src_dtype if args.dtype == "auto" else DTYPES[args.dtype]
    model = materialise(config, new_sd, dtype, args.seed)
    summary = kv_summary(config, dtype)
    summary.update(params=count_params(model), source_params=count_params(src_model), seconds=round(time.time() - t0, 2))
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
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
