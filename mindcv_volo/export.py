"""Export a VOLO for deployment: MindIR (or ONNX where MindSpore can export every op).

    python -m mindcv_volo.export --model volo_d1_224 --ckpt volo_d1_224.ckpt --out volo_d1_224.mindir
"""
import argparse

from .errors import run_cli
from .model_args import add_model_arguments, create_from_args
from .models.cpu_kernels import portable_ops
from .weights import load_checkpoint_into
from .weights.export import SUFFIX, export_model


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo.export", description=__doc__.split("\n")[0])
    add_model_arguments(parser, "class count of the checkpoint")
    parser.add_argument("--ckpt", required=True, help="MindSpore checkpoint (from mindcv_volo.convert or train.py)")
    parser.add_argument("--out", required=True, help="file to write (.mindir or .onnx)")
    parser.add_argument("--format", default="MINDIR", choices=sorted(SUFFIX), help="default: MINDIR")
    parser.add_argument("--batch-size", type=int, default=1, help="the exported graph's fixed batch size")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    args = parser.parse_args(argv)
    with portable_ops():  # the exported graph must not call this machine's compiled CPU kernels
        model = create_from_args(args)
    load_checkpoint_into(model, args.ckpt, ema=args.ema)
    print(f"wrote {export_model(model, args.out, args.format, args.batch_size)}")


if __name__ == "__main__":
    run_cli(main)
