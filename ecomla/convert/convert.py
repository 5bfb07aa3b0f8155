"""`ecomla convert SRC OUT`: turn a GQA checkpoint into an MLA checkpoint.

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32 --init fitted
    ecomla convert meta-llama/Llama-3.2-1B-Instruct out/llama1b-kv64 --kv-rank 64 --rope-dim 32 --q-rank 1424

Reads the source with transformers (layers.py: every check a config allows comes first), builds the MLA attention
of each selected layer by the chosen init (the fitted one: fitted.py; the others: `factored_init`), copies o_proj,
MLP, norms and embeddings, and writes an HF folder (config.json + safetensors + tokenizer + ecomla_convert.json with
the arguments, the init they resolve to and the per-layer report) atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..common import DTYPES, UserError
from ..io import count_params, load_tokenizer
from ..mla import deepseek
from ..mla.config import EcoMLAConfig
from ..outputs import atomic_dir
from .args import ConvertArgs
from .fitted import fitted_init
from .layers import (SourceModel, build_state_dict, calibration_stats, materialise, mla_config, open_source,
                     plan_layers)
from .norms import fit_latent_norms


def convert(args: ConvertArgs, log=print) -> dict:
    t0 = time.time()
    source = open_source(args)
    init = factored_init if args.method.fit is None else fitted_init
    config, new_sd, report = init(args, source, log)
    if args.target == deepseek.FORMAT and (broken := deepseek.problems(config)):
        raise RuntimeError("bug: the --target deepseek-v3 conversion is not expressible: " + "; ".join(broken))
    dtype = source.dtype if args.dtype == "auto" else DTYPES[args.dtype]
    model = materialise(config, new_sd, dtype, args.seed)
    summary = kv_summary(config, dtype)
    summary.update(params=count_params(model), source_params=count_params(source.model),
                   seconds=round(time.time() - t0, 2))
    meta = {"args": dataclasses.asdict(args), "method": dataclasses.asdict(args.method),
            "q_rank": args.q_rank_choice, "source": source.path, "layers": report, "summary": summary}
    write(args, source, model, meta, log)
    log(format_report(report, summary))
    return meta


def factored_init(args: ConvertArgs, source: SourceModel, log) -> tuple[EcoMLAConfig, dict, list[dict]]:
    """Every init but the fitted one: calibrate (the inits that read activations), plan, size and factor each layer
    once, or leave the MLA attention to `materialise`'s random draw (--init random); then the latent norms."""
    plans = plan_layers(args, source, calibration_stats(args, source, log))
    config = mla_config(args, source, plans, log)
    new_sd, report = build_state_dict(source, config, plans if args.method.factored else None, args.sigma)
    if args.latent_norm:
        fit_latent_norms(args, config, new_sd, source.path, log)
    return config, new_sd, report


def write(args: ConvertArgs, source: SourceModel, model, meta: dict, log) -> None:
    """OUT, atomically: the model, the source's tokenizer and generation config, and ecomla_convert.json."""
    with atomic_dir(args.out, "convert", (source.path, args.calib_data), overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        try:
            load_tokenizer(source.path).save_pretrained(tmp)
        except UserError as err:
            log(f"warning: {err}; the output has no tokenizer")
        if source.model.generation_config is not None:
            source.model.generation_config.save_pretrained(tmp)
        (tmp / "ecomla_convert.json").write_text(json.dumps(meta, indent=2))


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
