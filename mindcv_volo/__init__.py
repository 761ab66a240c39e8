"""mindcv-volo: the official VOLO in MindSpore, registered in MindCV's model zoo on import."""
import mindcv.models  # noqa: F401  (MindCV's own VOLO entries register first, ours replace them)

from .models import ALIASES, ARCHS, VARIANTS, VOLO, build_volo, data_config

__version__ = "0.1.0"
__all__ = ["ALIASES", "ARCHS", "VARIANTS", "VOLO", "build_volo", "data_config"]
