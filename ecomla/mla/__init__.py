"""MLA model: config, attention, latent cache."""

from .cache import LatentCacheLayer, cache_stats, reserve_latent
from .config import LATENT_LAYER_TYPE, EcoMLAConfig, MLASpec
from .model import EcoMLAForCausalLM, EcoMLAModel

__all__ = [
    "EcoMLAConfig", "MLASpec", "LATENT_LAYER_TYPE", "EcoMLAForCausalLM", "EcoMLAModel",
    "LatentCacheLayer", "cache_stats", "reserve_latent",
]
