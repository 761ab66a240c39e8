"""Official VOLO weights (PyTorch .pth.tar / .pth, timm .safetensors) -> MindSpore .ckpt, without torch.

    python -m mindcv_volo.convert --src d1_224_84.2.pth.tar --dst volo_d1_224.ckpt --model volo_d1_224
"""
import argparse
import logging

from .errors import run_cli
from .model_args import add_model_arguments, create_from_args
from .weights.convert import convert_into


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="official .pth.tar/.pth or timm .safetensors file")
    parser.add_argument("--dst", required=True, help="MindSpore checkpoint to write (.ckpt)")
    add_model_arguments(parser, "class count of the new model; when it differs, head and aux_head are dropped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    convert_into(create_from_args(args), args.src, args.dst)
    print(f"wrote {args.dst} ({args.model})")


if __name__ == "__main__":
    run_cli(main)
