"""The fitted init (`--init fitted`): every MLA layer fitted to what the layer computes, in seven steps.

    config, new_sd, report = fitted_init(args, source, log)

1. calibrate: the layer inputs on calibration tokens, from the source alone (calibrate.py), then from the source and
   the converted model side by side, one layer at a time (layer_pass.py; one-shot: on the teacher's own inputs);
2. rotary pairs and shared key: rope-whitened's layout (inits.py);
3. attention metric: keys judged by the attention they receive and by the logits of their queries, values on the
   mixtures attention forms and through o_proj, K against V by alpha (fit.py);
4. latent SVD in that metric (K/V and query latents); 5. least-squares up-projections in it;
6. ridge o_proj refit towards the teacher's attention output; 7. latent norms (--latent-norm; norms.py).
Why each step, and the choices that lost: docs/DESIGN-NOTES.md ("fitted"), `benchmarks/fit_ablation.py`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..io import load_tokenizer
from ..mla.config import EcoMLAConfig
from . import fit, svd
from .args import ConvertArgs
from .calibrate import calibration_batches
from .factor import kv_tensors, q_tensors
from .inits import FitChoice, rope_aware_rows
from .layer_pass import layer_pass
from .layers import SourceModel, build_state_dict, calibration_stats, materialise, mla_config, norm_free, plan_layers
from .norms import fit_latent_norms


@torch.no_grad()
def fitted_init(args: ConvertArgs, source: SourceModel, log) -> tuple[EcoMLAConfig, dict, list[dict]]:
    """The fitted init, one call per step (module docstring): the MLA config, state dict and per-layer report."""
    choice, damp = args.method.fit, args.damp
    plans = plan_layers(args, source, calibration_stats(args, source, log))  # 1, 2: rotary pairs from calibration
    config = mla_config(args, source, plans, log)
    new_sd, report = build_state_dict(source, config)  # the copied weights; attention is fitted below
    student = materialise(norm_free(config), new_sd, torch.float32, args.seed)
    batches = calibration_batches(load_tokenizer(source.path), args.calib_data, args.calib_seqs, args.calib_len,
                                  args.calib_seed)
    log(f"fitting {len(plans)} layers in turn on {args.calib_seqs} x {args.calib_len} calibration tokens")
    for layer in layer_pass(teacher_model(source, args.seed), student, batches, choice):  # 1. calibrate, in turn
        spec, moments = config.mla_spec(layer.index), layer.moments
        src = layer_weights(source, layer.index, moments, choice, damp)
        rows = rope_aware_rows(src, spec.rope_pairs, svd.whitening(moments["cov"], damp),
                               args.method.rope.key_fit)  # 2. rotary pairs and shared key
        metric = fit.fit_metric(rows, src, moments, choice, damp)  # 3. attention metric
        q, q_report = q_tensors(rows, src.H, metric.L, spec.q_lora_rank, args.sigma)  # 4. latent SVDs in it
        down, kv_report = fit.latent(rows, metric, spec.kv_lora_rank, args.sigma)
        up = fit.up_projections(rows, down, metric, src.G)  # 5. least-squares up-projections
        layer.load(tensors := q | kv_tensors(rows, src, down, up))
        o_proj, o_report = layer.refit_o(choice)  # 6. ridge o_proj refit
        layer.load(o_proj)
        new_sd.update({f"model.layers.{layer.index}.self_attn.{k}": v for k, v in (tensors | o_proj).items()})
        report[layer.index].update(q_report, **kv_report, metric="fitted", rope_pairs=rows.pairs,
                                   key_weight=choice.key_weight, **o_report)
    if args.latent_norm:
        fit_latent_norms(args, config, new_sd, source.path, log)  # 7. latent norms
    return config, new_sd, report


def teacher_model(source: SourceModel, seed: int):
    """The source as an all-GQA EcoMLAForCausalLM in float32: the fitting pass's teacher."""
    config = EcoMLAConfig(**source.fields, mla_layers=[None] * source.shape.num_layers,
                          architectures=["EcoMLAForCausalLM"])
    return materialise(config, build_state_dict(source, config)[0], torch.float32, seed)


def layer_weights(source: SourceModel, i: int, moments: dict, choice: FitChoice, damp: float) -> svd.Source:
    """Layer i's source projections; with sequential calibration W A for Q, K and V, A = C_ts C_ss^-1 the input map
    (fit.input_map). One-shot, the student's inputs are the teacher's (x_s = x_t): no map."""
    src = source.layer(i)
    if not choice.sequential:
        return src
    a = fit.input_map(moments["cov_ts"], moments["cov"], damp)
    return dataclasses.replace(src, w_q=src.w_q.double() @ a, w_k=src.w_k.double() @ a, w_v=src.w_v.double() @ a)
