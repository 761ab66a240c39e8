"""A model's state as {name: array}: official names, strict checks, fine-tuning adaptation, assignment.

One name mapping serves everything: a MindSpore parameter's official (PyTorch) name is its own name
with the LayerNorm/BatchNorm leaf renamed (the cell tree mirrors the official module tree).
"""
import logging

import mindspore as ms
import numpy as np

from ..errors import UserError
from .pos_embed import resize_pos_embed

logger = logging.getLogger("mindcv_volo")

MINDSPORE_TO_TORCH_LEAF = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                           "moving_variance": "running_var"}
TORCH_ONLY_LEAVES = ("num_batches_tracked",)  # BatchNorm's step counter: no information for inference
HEAD_NAMES = ("head.weight", "head.bias", "aux_head.weight", "aux_head.bias")


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


SHOWN_PROBLEMS = 6  # a checkpoint of another architecture differs everywhere: the first few say enough


def check_state(shapes, state, source, hint=""):
    """Raise a UserError naming the entries of `state` missing from, unexpected by or mis-shaped for `shapes`
    ({name: shape}, e.g. `model_shapes(model)`; the first few, and how many), then `hint`: what would fit."""
    problems = [f"missing {name} {shape}" for name, shape in shapes.items() if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in shapes]
    problems += [f"mis-shaped {name}: file {tuple(np.shape(value))}, model {shapes[name]}"
                 for name, value in state.items() if name in shapes and tuple(np.shape(value)) != shapes[name]]
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UserError(f"{source} does not fit the model ({len(problems)} problems): {shown}{more}"
                        + (f"; {hint}" if hint else ""))


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
