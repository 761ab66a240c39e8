"""mindcv-volo: the official VOLO in MindSpore, registered in MindCV's model zoo on import."""
import atexit

import mindcv.models  # noqa: F401  (MindCV's own VOLO entries register first; ours replace them)
import mindcv.models.model_factory as _mindcv_factory
from mindspore import nn as _nn

from .models import ALIASES, ARCHS, MODEL_NAMES, VARIANTS, VOLO, build_volo, create, data_config
from .weights import convert_into, load_checkpoint_into

__version__ = "0.1.0"
__all__ = ["ALIASES", "ARCHS", "MODEL_NAMES", "VARIANTS", "VOLO", "build_volo", "convert_into", "create",
           "data_config", "load_checkpoint_into"]

_mindcv_load_model_checkpoint = _mindcv_factory.load_model_checkpoint


def _load_model_checkpoint(model, checkpoint_path="", ema=False, auto_mapping=False):
    # MindCV's loader silently skips a missing file and loads mismatched names partially;
    # for VOLO models create_model(checkpoint_path=...) loads strictly or fails with one line.
    if isinstance(model, VOLO):
        return load_checkpoint_into(model, checkpoint_path, ema=ema)
    return _mindcv_load_model_checkpoint(model, checkpoint_path, ema, auto_mapping)


_mindcv_factory.load_model_checkpoint = _load_model_checkpoint


def _quiet_cell_teardown():
    """At interpreter exit, MindSpore 2.10's Cell.__del__ runs after its module's globals are gone and prints
    an "Exception ignored" traceback for every cell still alive (hundreds for one VOLO). Registered here, it
    runs before that teardown and makes a failing __del__ silent: by then there is nothing left to free."""
    original = _nn.Cell.__del__

    def __del__(self):
        try:
            original(self)
        except (AttributeError, TypeError):
            pass

    _nn.Cell.__del__ = __del__


atexit.register(_quiet_cell_teardown)
