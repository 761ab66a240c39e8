"""Export a VOLO checkpoint for deployment: MindIR or ONNX (which carries the model's preprocessing and class
names in its metadata: `python -m mindcv_volo_serve` runs it on pictures without MindSpore).

    python -m mindcv_volo.export --ckpt_path volo_d1_224.ckpt --out volo_d1_224.mindir [--batch_size 8]
    python -m mindcv_volo.export --ckpt_path volo_d1_224.ckpt --out volo_d1_224.onnx --file_format ONNX --dynamic_batch
"""
from mindcv_volo_serve.runner import onnx_metadata

from .engine.config import parse_config
from .engine.infer import class_names
from .engine.model_spec import load_model, preprocessing
from .errors import UserError, run_cli
from .models.backend import Backend, resolve_backend
from .weights.export import export_model, require_onnx


def main(argv=None):
    config = parse_config(argv, "export")
    tools = config.tools
    if not ((config.model.ckpt_path or config.model.pretrained) and tools.out):
        raise UserError("export needs --ckpt_path FILE.ckpt (or --pretrained True and --model NAME) and --out FILE "
                        "(.mindir or .onnx)")
    if tools.file_format == "ONNX":
        require_onnx()  # before the model is loaded: a missing package is said at once
    # the exported graph must not call this machine's compiled CPU kernels; ONNX needs ops its exporter maps
    backend = Backend.ONNX if tools.file_format == "ONNX" else resolve_backend().without_kernels()
    model, spec, description = load_model(config.model, config.model.ckpt_path, ema=config.model.ema,
                                          given=config.given, backend=backend)
    # an ONNX file carries what running it needs: the model's preprocessing and class names
    metadata = onnx_metadata(spec.name, preprocessing(model, spec, config.augmentation, description),
                             class_names(spec))
    written = export_model(model, tools.out, tools.file_format, config.data.batch_size, tools.dynamic_batch, metadata)
    print(f"wrote {written}")


if __name__ == "__main__":
    run_cli(main)
