"""Model weights in and out: official names, strict checks, fine-tuning adaptation, atomic files.

One name mapping serves everything: a MindSpore parameter's official (PyTorch) name is its own name
with the LayerNorm/BatchNorm leaf renamed (the cell tree mirrors the official module tree).
"""
import logging
import os

import mindspore as ms
import numpy as np

from .errors import UserError
from .pos_embed import resize_pos_embed

logger = logging.getLogger("mindcv_volo")

MINDSPORE_TO_TORCH_LEAF = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                           "moving_variance": "running_var"}
TORCH_ONLY_LEAVES = ("num_batches_tracked",)  # BatchNorm's step counter: no information for inference
HEAD_NAMES = ("head.weight", "head.bias", "aux_head.weight", "aux_head.bias")
EMA_PREFIX = "ema."
# A training checkpoint holds the model under its own names and the training state under these prefixes.
TRAINING_STATE_PREFIXES = (EMA_PREFIX, "optimizer.", "train_state.")


def official_name(name):
    base, _, leaf = name.rpartition(".")
    return f"{base}.{MINDSPORE_TO_TORCH_LEAF.get(leaf, leaf)}" if base else leaf


def model_shapes(model):
    """MindSpore name -> shape for every parameter and BatchNorm statistic of the model."""
    return {p.name: tuple(p.shape) for p in model.get_parameters()}


def from_official_names(model, state):
    """Rename an official (PyTorch-named) state dict to the model's MindSpore names.

    Keys the model does not have are kept under their official names, so the check names them.
    """
    by_official = {official_name(name): name for name in model_shapes(model)}
    return {by_official.get(key, key): value for key, value in state.items()
            if key.rpartition(".")[2] not in TORCH_ONLY_LEAVES}


def check_state(model, state, source):
    """Raise a UserError naming every missing, unexpected and mis-shaped entry of `state`."""
    shapes = model_shapes(model)
    problems = [f"missing {name} {shape}" for name, shape in shapes.items() if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in shapes]
    problems += [f"mis-shaped {name}: file {tuple(np.shape(value))}, model {shapes[name]}"
                 for name, value in state.items() if name in shapes and tuple(np.shape(value)) != shapes[name]]
    if problems:
        raise UserError(f"{source} does not fit the model ({len(problems)} problems): " + "; ".join(problems))


def adapt_state(model, state, source):
    """Fine-tuning adaptation: resize pos_embed to the model's grid; drop heads of another class count."""
    shapes = model_shapes(model)
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 4 and pos.shape != shapes["pos_embed"] and pos.shape[3] == shapes["pos_embed"][3]:
        new_grid = shapes["pos_embed"][1:3]
        logger.info("%s: resizing pos_embed from %sx%s to %sx%s (bicubic)", source, *pos.shape[1:3], *new_grid)
        state["pos_embed"] = resize_pos_embed(pos, new_grid)
    head_mismatch = [name for name in HEAD_NAMES
                     if name in state and name in shapes and tuple(state[name].shape) != shapes[name]]
    if head_mismatch:
        logger.warning("%s: class count differs from the model's (%s); head and aux_head are left "
                       "freshly initialised for fine-tuning", source, head_mismatch[0])
        for name in HEAD_NAMES:
            state.pop(name, None)
            if name in shapes:
                state[name] = next(p for p in model.get_parameters() if p.name == name).asnumpy()
    return state


def assign_state(model, state):
    """Copy a checked state (MindSpore names -> arrays) into the model's parameters."""
    for param in model.get_parameters():
        param.set_data(ms.Tensor(np.asarray(state[param.name]), dtype=param.dtype))


def save_checkpoint(entries, path):
    """Write {name: array or Tensor} as a MindSpore checkpoint, atomically (temporary file, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # save_checkpoint appends ".ckpt" to names without it, so the temporary name keeps the suffix.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp.ckpt")
    records = [{"name": name, "data": value if isinstance(value, ms.Tensor) else ms.Tensor(np.asarray(value))}
               for name, value in entries.items()]
    try:
        ms.save_checkpoint(records, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path):
    """A MindSpore .ckpt file as {name: numpy array}; a one-line UserError when it cannot be read."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, OSError) as err:
        raise UserError(f"{path} is not a readable MindSpore checkpoint (truncated or another format?): "
                        f"{str(err).splitlines()[0]}") from None
    return {name: param.asnumpy() for name, param in params.items()}


def model_entries(state, ema=False, source=""):
    """The model's weights in a checkpoint: plain names, or the EMA copy when `ema` is set."""
    if ema:
        weights = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        if not weights:
            raise UserError(f"{source} holds no EMA weights; drop the ema option to load its plain weights")
        return weights
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_STATE_PREFIXES)}


def load_checkpoint_into(model, path, ema=False, adapt=False):
    """Load a .ckpt into `model`, strictly: a missing file or any entry that does not fit is an error.

    `adapt=True` is for fine-tuning: pos_embed is resized and heads of another class count are dropped.
    """
    state = model_entries(read_checkpoint(path), ema, path)
    if adapt:
        state = adapt_state(model, state, path)
    check_state(model, state, path)
    assign_state(model, state)
    return model
