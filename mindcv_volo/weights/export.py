"""A VOLO for deployment: MindIR or ONNX, written atomically.

The exported graph is the eval model (logits = head(class token) + 0.5 * max of aux_head) with the input
"image" (batch, 3, img_size, img_size). A MindIR has a fixed batch size; load it with `mindspore.load` +
`nn.GraphCell`. An ONNX file (opset 11, MindSpore's own exporter) needs a model built for the "onnx" backend,
needs the `onnx` package, carries the model's preprocessing and class names in its metadata (for
`python -m mindcv_volo_serve`), and can have a symbolic batch axis (`onnx_batch`).
"""
import os
import tempfile

import mindspore as ms
import numpy as np

from ..errors import UserError
from ..files import atomic_path

SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx"}


def example_input(model, batch_size):
    return ms.Tensor(np.zeros((batch_size, 3, model.img_size, model.img_size), np.float32))


def export_model(model, out, file_format="MINDIR", batch_size=1, dynamic_batch=False, metadata=None):
    """Write `model` (eval mode) to `out`; `out` must end with the format's suffix. An ONNX file carries
    `metadata` ({key: text}; `mindcv_volo_serve.runner.onnx_metadata`)."""
    if not out.endswith(SUFFIX[file_format]):
        raise UserError(f"--out {out} must end with {SUFFIX[file_format]} for format {file_format}")
    if dynamic_batch and file_format != "ONNX":
        raise UserError("--dynamic_batch is for --file_format ONNX; a MindIR has the fixed --batch_size")
    model.set_train(False)
    with atomic_path(out) as tmp:
        if file_format == "ONNX":
            export_onnx(model, tmp, batch_size, dynamic_batch, metadata)
        else:  # ms.export appends the suffix itself
            ms.export(model, example_input(model, batch_size), file_name=tmp[: -len(SUFFIX[file_format])],
                      file_format=file_format)
    return out


def require_onnx():
    """The onnx package, which every ONNX export needs (for its metadata and symbolic batch axis)."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise UserError('an ONNX export needs the onnx package, which is not installed: '
                        'pip install "mindcv-volo[onnx]"') from None
    return onnx


def export_onnx(model, path, batch_size=1, dynamic_batch=False, metadata=None):
    """Write `model`, built for the "onnx" backend, to the ONNX file `path`: input "image", output "logits", and
    `metadata` ({key: text}) as the file's metadata_props."""
    if model.backend != "onnx":  # models.backend.Backend.ONNX (a str enum): weights/ imports nothing of models/
        raise UserError(f"an ONNX export needs the model built with backend=\"onnx\", not \"{model.backend}\" "
                        "(MindSpore's exporter maps no Erf, Im2Col or Col2Im)")
    onnx = require_onnx()
    from .onnx_batch import EXPORTED_BATCHES, symbolic_batch

    exports = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as folder:
        for batch in EXPORTED_BATCHES if dynamic_batch else (batch_size,):
            _onnx_export(model, os.path.join(folder, f"batch{batch}.onnx"), batch)
            exports.append(onnx.load(os.path.join(folder, f"batch{batch}.onnx")))
    exported = symbolic_batch(*exports) if dynamic_batch else exports[0]
    onnx.helper.set_model_props(exported, metadata or {})
    onnx.save(exported, path)


def _onnx_export(model, path, batch_size):
    try:
        ms.onnx.export(model, example_input(model, batch_size), file_name=path, input_names=["image"],
                       output_names=["logits"])
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"MindSpore {ms.__version__} cannot export this model to ONNX "
                        f"({str(err).splitlines()[0]}); export MINDIR instead") from None
    finally:
        # The exporter rewrites the compiled graph in place (shape inputs into attributes), and MindSpore 2.10
        # would reuse that graph for the next export at the same input shape, which then fails ("i: 2 out of
        # range: 2" at BroadcastTo): forget it.
        model.compile_cache.discard(model.compile_phase)
