"""Export a VOLO for deployment: MindIR (or ONNX where MindSpore can export every op).

    python -m mindcv_volo.export --model volo_d1_224 --ckpt volo_d1_224.ckpt --out volo_d1_224.mindir

The exported graph is the eval model (logits = head(class token) + 0.5 * max of aux_head) with a fixed
input shape (batch, 3, img_size, img_size); load it with `mindspore.load` + `nn.GraphCell`.
"""
import argparse
import os

import mindspore as ms
import numpy as np

from .model_args import add_model_arguments, create_from_args
from .errors import UserError, run_cli
from .models.cpu_kernels import portable_ops
from .weights import load_checkpoint_into

SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx"}


def export_model(model, out, file_format="MINDIR", batch_size=1):
    """Write `model` (eval mode) to `out`, atomically; `out` must end with the format's suffix."""
    if not out.endswith(SUFFIX[file_format]):
        raise UserError(f"--out {out} must end with {SUFFIX[file_format]} for format {file_format}")
    model.set_train(False)
    example = ms.Tensor(np.zeros((batch_size, 3, model.img_size, model.img_size), np.float32))
    # ms.export appends the MindIR suffix itself, so the temporary name keeps it at the end.
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.getpid()}.{os.path.basename(out)}")
    try:
        if file_format == "ONNX":
            ms.onnx.export(model, example, file_name=tmp)
        else:
            ms.export(model, example, file_name=tmp[: -len(SUFFIX[file_format])], file_format=file_format)
    except (RuntimeError, TypeError, ValueError) as err:
        if file_format == "ONNX":
            raise UserError(f"MindSpore {ms.__version__} cannot export this model to ONNX "
                            f"({str(err).splitlines()[0]}); export MINDIR instead") from None
        raise
    os.replace(tmp, out)
    return out


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
