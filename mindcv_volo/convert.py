"""Official VOLO weights (PyTorch .pth.tar / .pth, timm .safetensors) -> MindSpore .ckpt, without torch.

    python -m mindcv_volo.convert --src d1_224_84.2.pth.tar --dst volo_d1_224.ckpt --model volo_d1_224

The .ckpt describes itself (model, classes, preprocessing), so validate.py, infer.py and export need only it.
"""
import logging

from .engine.config import parse_config
from .engine.model_spec import build_model, imagenet_class_names, preprocessing, resolve
from .errors import UserError, run_cli
from .weights.convert import convert_into


def main(argv=None):
    config = parse_config(argv, "convert")
    tools = config.tools
    if not (tools.src and tools.dst and config.model.model):
        raise UserError("convert needs --src FILE (official .pth.tar/.pth or .safetensors), --dst FILE.ckpt and "
                        "--model NAME (e.g. volo_d1_224)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    spec = resolve(config.model)
    imagenet = imagenet_class_names()
    if spec.num_classes == len(imagenet):  # the official weights are ImageNet-1k's: their outputs are its classes
        spec = spec._replace(class_names=imagenet)
    model = build_model(spec)
    convert_into(model, tools.src, tools.dst, ema=config.model.ema,
                 description=spec.describe(preprocessing(model, spec, config.augmentation)))
    print(f"wrote {tools.dst} ({spec.name}, {spec.num_classes} classes)")


if __name__ == "__main__":
    run_cli(main)
