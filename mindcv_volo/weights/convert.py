"""Official VOLO weights (PyTorch .pth.tar / .pth, timm .safetensors) into a VOLO model, without torch.

The file is read by `torch_zip` (a restricted unpickler: a file that asks for code is refused), renamed
to MindSpore names, adapted (pos_embed resized to the model's resolution, the heads dropped when the
class count differs), checked entry by entry and written atomically. Nothing is written on any mismatch.
"""
from .checkpoint import save_checkpoint
from .state import adapt_state, assign_state, check_state, from_official_names, model_shapes
from .torch_zip import load_state_dict_file


def convert_into(model, src, dst=None, ema=False, description=None):
    """Load the official weights in `src` (its EMA weights with `ema`) into `model` (any VOLO instance);
    write `dst`, with its `description`, if given."""
    state = from_official_names(model, load_state_dict_file(src, ema))
    state = adapt_state(model, state, src)
    check_state(model_shapes(model), state, src)
    assign_state(model, state)
    if dst:
        save_checkpoint({param.name: param for param in model.get_parameters()}, dst, description)
    return model
