"""ecomla: upcycle a GQA LLM into Multi-head Latent Attention (X-EcoMLA) with a latent KV cache.

`import ecomla` registers the "ecomla" model type, so `AutoConfig` / `AutoModelForCausalLM.from_pretrained`
load converted checkpoints. Nothing is downloaded at import time.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .mla import EcoMLAConfig, EcoMLAForCausalLM, EcoMLAModel, MLASpec, cache_stats

__version__ = "0.1.0"

AutoConfig.register(EcoMLAConfig.model_type, EcoMLAConfig, exist_ok=True)
AutoModel.register(EcoMLAConfig, EcoMLAModel, exist_ok=True)
AutoModelForCausalLM.register(EcoMLAConfig, EcoMLAForCausalLM, exist_ok=True)

__all__ = ["EcoMLAConfig", "EcoMLAForCausalLM", "EcoMLAModel", "MLASpec", "cache_stats", "__version__"]
