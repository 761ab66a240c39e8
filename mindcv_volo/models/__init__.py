"""VOLO cells and the registered variants."""
from .volo import ALIASES, ARCHS, VARIANTS, VOLO, build_volo, data_config

__all__ = ["ALIASES", "ARCHS", "VARIANTS", "VOLO", "build_volo", "data_config"]
