"""A VOLO for deployment: MindIR (or ONNX where MindSpore can export every op), written atomically.

The exported graph is the eval model (logits = head(class token) + 0.5 * max of aux_head) with a fixed
input shape (batch, 3, img_size, img_size); load a MindIR with `mindspore.load` + `nn.GraphCell`.
"""
import mindspore as ms
import numpy as np

from ..errors import UserError
from ..files import atomic_path

SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx"}


def export_model(model, out, file_format="MINDIR", batch_size=1):
    """Write `model` (eval mode) to `out`; `out` must end with the format's suffix."""
    if not out.endswith(SUFFIX[file_format]):
        raise UserError(f"--out {out} must end with {SUFFIX[file_format]} for format {file_format}")
    model.set_train(False)
    example = ms.Tensor(np.zeros((batch_size, 3, model.img_size, model.img_size), np.float32))
    with atomic_path(out) as tmp:
        try:
            if file_format == "ONNX":
                ms.onnx.export(model, example, file_name=tmp)
            else:  # ms.export appends the suffix itself
                ms.export(model, example, file_name=tmp[: -len(SUFFIX[file_format])], file_format=file_format)
        except (RuntimeError, TypeError, ValueError) as err:
            if file_format == "ONNX":
                raise UserError(f"MindSpore {ms.__version__} cannot export this model to ONNX "
                                f"({str(err).splitlines()[0]}); export MINDIR instead") from None
            raise
    return out
