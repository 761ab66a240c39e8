"""Make token-label maps with any teacher: `python -m mindcv_volo.relabel --teacher MODEL --ckpt X --data_dir D --out DIR`.

See `token_labeling.relabel` for what is written and how a run resumes or shards under msrun.
"""
import argparse

from .errors import UserError, run_cli
from .model_args import arch_overrides
from .token_labeling.relabel import relabel


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo.relabel", description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="VOLO name of this project (volo_d5_512, ...) or a MindCV model")
    parser.add_argument("--ckpt", required=True, help="the teacher's MindSpore checkpoint (.ckpt)")
    parser.add_argument("--data_dir", "--data-dir", required=True, help="ImageFolder root holding SPLIT/<class>/<image>")
    parser.add_argument("--out", required=True, help="folder for the maps: OUT/<class>/<image stem>.npz")
    parser.add_argument("--split", default="train")
    parser.add_argument("--top-k", type=int, default=5, help="classes kept per token (default 5, the official)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=None,
                        help="teacher input size (default: the model's; a VOLO gets its pos_embed resized)")
    parser.add_argument("--arch-overrides", type=arch_overrides, default={},
                        help="JSON of constructor arguments over the model's")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    parser.add_argument("--device-target", default="auto", choices=("auto", "Ascend", "GPU", "CPU"))
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"))
    parser.add_argument("--log-interval", type=int, default=10, help="batches between progress lines")
    args = parser.parse_args(argv)
    for name in ("top_k", "batch_size", "log_interval"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    relabel(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
