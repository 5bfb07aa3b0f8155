"""The latent norms' sink weighting on an existing `--target deepseek-v3` conversion: its latent norms refitted by
`ecomla.convert.norms.fit_latent_norms` as committed (on the norm-free model, where any earlier change of basis
composes), then held-out chat KL to the teacher (`ecomla eval --max-tokens 1024`'s chat sample, 3,234 target tokens): as
converted, refitted, and without the norms.

    python benchmarks/latent_norm_refit.py out/s4x-ds3     # a conversion made before the sink weighting

2026-12-07 (AMD EPYC, 4x --init fitted --target deepseek-v3): converted at 962de55 (no sink weight): as converted
10.77, refitted with the sink weight 2.46, norm-free 1.24; converted at 976a53d (sink weight): as converted 4.48,
refitted with the pad-or-basis rule 1.61 (1 of 60 latents padded: the refit starts from the basis the conversion
already chose, so its bases compound), norm-free 1.24 (docs/notebook/LOG.md).
"""

import copy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ecomla.convert.norms import fit_latent_norms  # noqa: E402
from ecomla.eval.fidelity import fidelity  # noqa: E402
from ecomla.eval.run import EvalArgs, heldout_batches  # noqa: E402
from ecomla.io import load_model, load_tokenizer  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    spec = sys.argv[1]
    teacher, _ = load_model("default", dtype="float32")
    m, path = load_model(spec, dtype="float32")
    tok = load_tokenizer(path)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    args = types.SimpleNamespace(calib_seqs=128, calib_len=256, calib_data="default", calib_seed=0, seed=0)
    fit_latent_norms(args, m.config, sd, path, print)
    new = copy.deepcopy(m)
    new.load_state_dict({k: v.float() for k, v in sd.items()})
    free = copy.deepcopy(m)
    for a in free.mla_attention():
        a.kv_a_layernorm = None; a.q_a_layernorm = None
    batches = heldout_batches(tok, EvalArgs(models=[spec], tasks="none", max_tokens=1024))
    fid = fidelity({"as-is": m, "refit": new, "no-norms": free}, teacher, batches["chat"], desc="chat")
    print({k: round(v["kl"], 4) for k, v in fid.items()})


if __name__ == "__main__":
    main()
