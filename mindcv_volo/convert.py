"""Official VOLO weights (PyTorch .pth.tar / .pth, timm .safetensors) -> MindSpore .ckpt, without torch.

    python -m mindcv_volo.convert --src d1_224_84.2.pth.tar --dst volo_d1_224.ckpt --model volo_d1_224

The file is read by `torch_zip` (a restricted unpickler: a file that asks for code is refused), renamed
to MindSpore names, checked entry by entry, adapted (pos_embed resized to the model's resolution, the
heads dropped when --num-classes differs) and written atomically. Nothing is written on any mismatch.
"""
import argparse
import logging

from .model_args import add_model_arguments, create_from_args
from .errors import run_cli
from .torch_zip import load_state_dict_file
from .weights import adapt_state, assign_state, check_state, from_official_names, save_checkpoint


def convert_into(model, src, dst=None):
    """Load the official weights in `src` into `model` (any VOLO instance); write `dst` if given."""
    state = from_official_names(model, load_state_dict_file(src))
    state = adapt_state(model, state, src)
    check_state(model, state, src)
    assign_state(model, state)
    if dst:
        save_checkpoint({param.name: param for param in model.get_parameters()}, dst)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="official .pth.tar/.pth or timm .safetensors file")
    parser.add_argument("--dst", required=True, help="MindSpore checkpoint to write (.ckpt)")
    add_model_arguments(parser, "class count of the new model; when it differs, head and aux_head are dropped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model = create_from_args(args)
    convert_into(model, args.src, args.dst)
    print(f"wrote {args.dst} ({args.model})")


if __name__ == "__main__":
    run_cli(main)
