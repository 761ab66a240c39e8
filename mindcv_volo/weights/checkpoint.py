"""MindSpore .ckpt files: atomic writes, one-line errors, the layout of a training checkpoint, strict loading.

A checkpoint written here describes itself: one text entry, DESCRIPTION_KEY, holds JSON saying what
rebuilds and labels its model (variant, arch_overrides, class count and names, preprocessing;
`engine.model_spec`), so validate.py, infer.py, export and relabel need only the file.
A training checkpoint (train.py) holds the model under its own parameter names, so it loads as any weights
file, and the rest of the training state under prefixes:
  * `ema.<name>`: the EMA weights (when ema is on),
  * `optimizer.<name>`: the optimizer's state (moments, step counter),
  * `train_state.<name>`: epoch, global step, loss scale and the like (engine.checkpoints).
"""
import json
import os

import mindspore as ms
import numpy as np

from ..errors import UserError
from ..files import atomic_path
from .state import adapt_state, assign_state, check_state, model_shapes

EMA_PREFIX = "ema."
OPTIMIZER_PREFIX = "optimizer."
STATE_PREFIX = "train_state."
TRAINING_STATE_PREFIXES = (EMA_PREFIX, OPTIMIZER_PREFIX, STATE_PREFIX)
DESCRIPTION_KEY = "mindcv_volo.description"


def save_checkpoint(entries, path, description=None):
    """Write {name: array or Tensor} as a MindSpore checkpoint, atomically, with its `description` (a dict)."""
    records = [{"name": name, "data": value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))}
               for name, value in entries.items()]
    extra = {DESCRIPTION_KEY: json.dumps(description, sort_keys=True)} if description else None
    with atomic_path(path) as tmp:
        ms.save_checkpoint(records, tmp, append_dict=extra)


def _load(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return ms.load_checkpoint(path)
    except (ValueError, RuntimeError, OSError):
        raise UserError(f"{path} is not a readable MindSpore checkpoint (truncated, or another format: convert "
                        "PyTorch files with `python -m mindcv_volo.convert`)") from None


def read_checkpoint(path):
    """A MindSpore .ckpt file's tensors as {name: numpy array}; a one-line UserError when it cannot be read."""
    return {name: value.asnumpy() for name, value in _load(path).items() if not isinstance(value, str)}


def read_description(path):
    """The checkpoint's description (a dict), or {} for a checkpoint written elsewhere."""
    text = _load(path).get(DESCRIPTION_KEY)
    return json.loads(text) if isinstance(text, str) else {}


def model_entries(state, ema=False, source=""):
    """The model's weights in a checkpoint: plain names, or the EMA copy when `ema` is set."""
    if ema:
        weights = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        if not weights:
            raise UserError(f"{source} holds no EMA weights; drop the ema option to load its plain weights")
        return weights
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_STATE_PREFIXES)}


def load_checkpoint_into(model, path, ema=False, adapt=False, hint=""):
    """Load a .ckpt into `model`, strictly: a missing file or any entry that does not fit is an error, which
    ends with `hint` (what would fit).

    `adapt=True` is for fine-tuning: pos_embed is resized and heads of another class count are dropped.
    """
    state = model_entries(read_checkpoint(path), ema, path)
    if adapt:
        state = adapt_state(model, state, path)
    check_state(model_shapes(model), state, path, hint)
    assign_state(model, state)
    return model
