"""The MLA model: config and shapes, rotary tables, attention (decompressed and absorbed), decode preparation,
latent cache. Imports nothing from the pipeline stages."""

from .cache import LatentCacheLayer, cache_stats, reserve_latent
from .config import LATENT_LAYER_TYPE, EcoMLAConfig, MLASpec, SourceShape
from .model import EcoMLAForCausalLM, EcoMLAModel

__all__ = [
    "EcoMLAConfig", "MLASpec", "SourceShape", "LATENT_LAYER_TYPE", "EcoMLAForCausalLM", "EcoMLAModel",
    "LatentCacheLayer", "cache_stats", "reserve_latent",
]
