"""The conversion's model plumbing: the source as it is read, each layer's plan and shape, the new state dict.

    source = open_source(args)                     # every cheap check first, then the weights
    plans = plan_layers(args, source, stats)       # per MLA layer: the rows to factor, in which metric
    config = mla_config(args, source, plans, log)  # one MLASpec per MLA layer (r_kv, r_q, rotary pairs)
    new_sd, report = build_state_dict(source, config, plans, args.sigma)  # copies, and the factored inits' weights
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common import UserError
from ..io import load_config, load_model, load_tokenizer
from ..mla import EcoMLAForCausalLM, deepseek
from ..mla.config import EcoMLAConfig, MLASpec, SourceShape
from ..mla.rope import rope_inv_freq
from ..outputs import check_out
from . import svd
from .args import ConvertArgs, check_shapes, mla_rope_parameters, parse_layers
from .calibrate import layer_input_stats
from .factor import LayerPlan, factor_layer, plan_layer
from .families import ATTN_COPY_IF_KEPT, LAYER_COPY, MODEL_COPY, source_fields
from .inits import best_pairs, pair_scores


@dataclass
class SourceModel:
    """The source checkpoint as the conversion reads it, and what the flags derive from its config."""

    model: torch.nn.Module  # as loaded (calibration turns it to float32)
    dtype: torch.dtype  # its dtype as loaded: the output's with --dtype auto
    path: str  # where it was loaded from (tokenizer, generation config; OUT stays apart from it)
    sd: dict[str, torch.Tensor]  # its state dict as loaded
    fields: dict  # EcoMLAConfig fields copied from its config (families.py)
    shape: SourceShape
    inv_freq: torch.Tensor  # [d_h/2]: its rotary frequencies
    layers: list[int]  # the layers --layers makes MLA
    d_nope: int  # --nope-dim, or head_dim - rope_dim
    mla_rope: dict | None  # rope_parameters of the decoupled rotary dims (--mla-rope)

    def layer(self, i: int) -> svd.Source:
        p = f"model.layers.{i}.self_attn."
        sd, s = self.sd, self.shape
        return svd.Source(
            w_q=sd[p + "q_proj.weight"], w_k=sd[p + "k_proj.weight"], w_v=sd[p + "v_proj.weight"],
            b_q=sd.get(p + "q_proj.bias"), b_k=sd.get(p + "k_proj.bias"), b_v=sd.get(p + "v_proj.bias"),
            H=s.num_heads, G=s.num_kv_heads, d_h=s.head_dim, w_o=sd[p + "o_proj.weight"],
        )


def open_source(args: ConvertArgs) -> SourceModel:
    """Every check a config allows (a UserError before any weight is read or any file written), then the weights."""
    src_config, src_dir = load_config(args.src)
    fields, shape = source_fields(src_config), SourceShape.of(src_config)
    d_nope = check_shapes(args, shape)
    if args.target == deepseek.FORMAT:
        check_target_source(args, EcoMLAConfig(**fields), d_nope)
    layers = parse_layers(args.layers, shape.num_layers)
    mla_rope = mla_rope_parameters(args, fields)
    check_out(args.out, "convert", (src_dir, args.calib_data), overwrite=args.overwrite)
    model, path = load_model(args.src, dtype="auto")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    inv_freq = rope_inv_freq(fields["rope_parameters"], shape.head_dim, fields["max_position_embeddings"])[0]
    return SourceModel(model, model.dtype, path, sd, fields, shape, inv_freq, layers, d_nope, mla_rope)


def check_target_source(args: ConvertArgs, source: EcoMLAConfig, d_nope: int) -> None:
    """--target deepseek-v3, before any weight is read: the source's own obstacles, d_nope and the rotary layout."""
    nope = deepseek.nope_problem(d_nope, args.rope_dim, source.head_dim)
    broken = deepseek.source_problems(source) + ([nope] if nope else [])
    if broken:
        raise UserError("--target deepseek-v3: " + "; ".join(broken))
    if args.method.rope is None and not deepseek.fresh_rope_is_plain(source, args.rope_dim):
        kind = source.rope_parameters.get("rope_type", "default")
        raise UserError(f"--target deepseek-v3: this init gives the rotary dims fresh frequencies with the "
                        f"source's {kind!r} RoPE scaling, which engines rewrite to DeepSeek's YaRN; use a rope-aware "
                        "init (--init rope-whitened or fitted), which keeps a plain subset of the source's pairs")


def calibration_stats(args: ConvertArgs, source: SourceModel, log) -> dict:
    """Per-layer input statistics for the inits that read activations (empty for the others)."""
    if not args.method.needs_calibration:
        return {}
    log(f"calibrating on {args.calib_seqs} x {args.calib_len} tokens of {args.calib_data} (train split)")
    return layer_input_stats(source.model.float(), load_tokenizer(source.path), str(source.path), args.calib_data,
                             args.calib_seqs, args.calib_len, args.calib_seed, source.layers)


def plan_layers(args: ConvertArgs, source: SourceModel, stats: dict) -> dict[int, LayerPlan]:
    pairs = target_rope_pairs(args, source, stats) if args.target == deepseek.FORMAT else None
    return {i: plan_layer(args.method, source.layer(i), args.rope_dim, source.d_nope, stats.get(i), source.inv_freq,
                          pairs=pairs) for i in source.layers}


def target_rope_pairs(args: ConvertArgs, source: SourceModel, stats: dict) -> list[int] | None:
    """--target deepseek-v3 with a rope-aware init: one plain rotary layout for every layer, pairs 0, k, 2k, ...
    (a plain RoPE of dim d_rope), the k whose pairs score highest summed over the layers (inits.pair_scores)."""
    if args.method.rope is None:
        return None  # fresh frequencies, plain for an unscaled source (check_target_source)
    m = args.rope_dim // 2
    candidates = deepseek.evenly_spaced_pairs(source.inv_freq, m)
    if not candidates:
        raise UserError(f"--target deepseek-v3: no evenly spaced set of {m} of the source's {len(source.inv_freq)} "
                        "frequency pairs is a plain RoPE (the source's RoPE scaling changes them); lower --rope-dim")
    rope = args.method.rope
    score = sum(pair_scores(source.layer(i), (stats.get(i) or {}).get("cov"), rope.select, source.inv_freq,
                            rope.distance) for i in source.layers)
    return best_pairs(candidates, score)


def mla_config(args: ConvertArgs, source: SourceModel, plans: dict[int, LayerPlan], log) -> EcoMLAConfig:
    """The converted model's config: an MLASpec per MLA layer, r_kv fixed or by energy threshold (--rank-energy)."""
    shape, specs = source.shape, {}
    for i, plan in plans.items():
        r_kv = args.kv_rank if args.kv_rank is not None else svd.energy_rank(plan.kv_spectrum(), args.rank_energy)
        q_rank = args.q_rank_choice
        if q_rank is not None and args.q_rank_energy is not None:
            q_rank = svd.energy_rank(plan.q_spectrum(), args.q_rank_energy)
        specs[i] = MLASpec.for_source(shape, r_kv, args.rope_dim, q_rank, nope_dim=plan.rows.d_nope,  # the source's
                                      latent_norm=args.latent_norm, rope_pairs=plan.rows.pairs,  # pairs: its scale
                                      softmax_scale=None if plan.rows.pairs is None else shape.head_dim**-0.5)
        if specs[i].cache_elements >= shape.kv_elements_per_layer:
            log(f"warning: layer {i} caches {specs[i].cache_elements} elements per token, not fewer than the "
                f"source's {shape.kv_elements_per_layer}")
    return student_config(source.fields, specs, source.mla_rope)


def student_config(fields: dict, specs: dict[int, MLASpec], mla_rope: dict | None) -> EcoMLAConfig:
    """The converted model's config from the source's fields (families.py) and the MLA spec of each MLA layer."""
    return EcoMLAConfig(**fields, architectures=["EcoMLAForCausalLM"], mla_rope_parameters=mla_rope,
                        mla_layers=[specs[i].to_dict() if i in specs else None
                                    for i in range(fields["num_hidden_layers"])])


def planned_config(args: ConvertArgs, src_config) -> EcoMLAConfig:
    """The config `ecomla convert` would write for `args`, from the source's config alone (no weights): the shapes
    `ecomla plan` needs. The rank must be fixed (--kv-rank; --rank-energy reads the weights); rotary pairs and
    latent norm gains change no shape."""
    if args.kv_rank is None or args.q_rank_energy is not None:
        raise UserError("a plan needs the ranks without the weights: give --kv-rank R (and an integer or 'auto' "
                        "--q-rank), not --rank-energy / --q-rank-energy")
    fields, shape = source_fields(src_config), SourceShape.of(src_config)
    d_nope = check_shapes(args, shape)
    spec = MLASpec.for_source(shape, args.kv_rank, args.rope_dim, args.q_rank_choice, nope_dim=d_nope,
                              latent_norm=args.latent_norm)
    specs = {i: spec for i in parse_layers(args.layers, shape.num_layers)}
    return student_config(fields, specs, mla_rope_parameters(args, fields))


def build_state_dict(source: SourceModel, config: EcoMLAConfig, plans: dict[int, LayerPlan] | None = None,
                     sigma: str = "up") -> tuple[dict, list[dict]]:
    """The new state dict and its per-layer report: the source's tensors for what is copied, and with `plans` the
    factored MLA attention (float64); without, MLA attention is left to the caller (fitted or random init)."""
    sd = source.sd
    out = {k: sd[k] for k in MODEL_COPY if k in sd}
    report = []
    for i in range(config.num_hidden_layers):
        p, spec = f"model.layers.{i}.", config.mla_spec(i)
        out.update({p + k: sd[p + k] for k in LAYER_COPY if p + k in sd})
        if spec is None:
            out.update({p + k: sd[p + k] for k in ATTN_COPY_IF_KEPT if p + k in sd})
            report.append({"layer": i, "type": "gqa"})
            continue
        row = {"layer": i, "type": "mla", "q_rank": spec.q_lora_rank, "kv_rank": spec.kv_lora_rank}
        if plans is not None:
            tensors, rep = factor_layer(plans[i], spec.q_lora_rank, spec.kv_lora_rank, sigma)
            out.update({p + "self_attn." + k: v for k, v in tensors.items()})
            row.update(rep)
        report.append(row)
    return out, report


def factored_init(args: ConvertArgs, source: SourceModel, log) -> tuple[EcoMLAConfig, dict, list[dict]]:
    """Every init but the fitted one: calibrate (if the init reads activations), plan, size and factor each layer
    once; or draw the MLA attention at random (--init random, in `materialise`)."""
    plans = plan_layers(args, source, calibration_stats(args, source, log))
    config = mla_config(args, source, plans, log)
    new_sd, report = build_state_dict(source, config, plans if args.method.factored else None, args.sigma)
    return config, new_sd, report


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


def norm_free(config: EcoMLAConfig) -> EcoMLAConfig:
    """The same model without latent norms: what the inits fit (the norms' gains are set afterwards)."""
    return EcoMLAConfig.from_dict({**config.to_dict(), "mla_layers": [
        None if s is None else {**s, "latent_norm": False} for s in config.mla_layers]})
