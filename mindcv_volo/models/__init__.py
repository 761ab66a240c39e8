"""VOLO cells and the registered variants."""
from .volo import ALIASES, ARCHS, MODEL_NAMES, VARIANTS, VOLO, build_volo, create, data_config

__all__ = ["ALIASES", "ARCHS", "MODEL_NAMES", "VARIANTS", "VOLO", "build_volo", "create", "data_config"]
