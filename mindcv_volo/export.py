"""Export a VOLO checkpoint for deployment: MindIR or ONNX.

    python -m mindcv_volo.export --ckpt_path volo_d1_224.ckpt --out volo_d1_224.mindir [--batch_size 8]
    python -m mindcv_volo.export --ckpt_path volo_d1_224.ckpt --out volo_d1_224.onnx --file_format ONNX --dynamic_batch
"""
from .engine.config import parse_config
from .engine.model_spec import load_model
from .errors import UserError, run_cli
from .models.backend import Backend, resolve_backend
from .weights.export import export_model


def main(argv=None):
    config = parse_config(argv, "export")
    tools = config.tools
    if not (config.model.ckpt_path and tools.out):
        raise UserError("export needs --ckpt_path FILE.ckpt and --out FILE (.mindir or .onnx)")
    # the exported graph must not call this machine's compiled CPU kernels; ONNX needs ops its exporter maps
    backend = Backend.ONNX if tools.file_format == "ONNX" else resolve_backend().without_kernels()
    model, _, _ = load_model(config.model, config.model.ckpt_path, ema=config.model.ema, backend=backend)
    print(f"wrote {export_model(model, tools.out, tools.file_format, config.data.batch_size, tools.dynamic_batch)}")


if __name__ == "__main__":
    run_cli(main)
