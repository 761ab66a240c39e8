"""Official VOLO weights (PyTorch .pth.tar / .pth, timm .safetensors) -> MindSpore .ckpt, without torch.

    python -m mindcv_volo.convert --src d1_224_84.2.pth.tar --dst volo_d1_224.ckpt --model volo_d1_224
    python -m mindcv_volo.convert --src hub --dst volo_d1_224.ckpt --model volo_d1_224

`--src hub` (or `--pretrained True`) takes the model's official weights from the Hugging Face hub
(`weights.hub`: timm's repository, or huggingface_hub's local cache).

The .ckpt describes itself (model, classes, preprocessing), so validate.py, infer.py and export need only it.
"""
import logging

from .engine.config import parse_config
from .engine.model_spec import build_model, official_spec, preprocessing
from .errors import UserError, run_cli
from .models.volo import hub_id
from .weights.convert import convert_into
from .weights.hub import download

HUB_SOURCE = "hub"  # --src hub: the official weights of --model, from the Hugging Face hub


def main(argv=None):
    config = parse_config(argv, "convert")
    tools = config.tools
    src = HUB_SOURCE if config.model.pretrained and not tools.src else tools.src
    if not (src and tools.dst and config.model.model):
        raise UserError("convert needs --src FILE (official .pth.tar/.pth or .safetensors, or hub), --dst FILE.ckpt "
                        "and --model NAME (e.g. volo_d1_224)")
    if config.model.pretrained and src != HUB_SOURCE:
        raise UserError(f"--pretrained True converts the official weights from the hub, --src {src} another file; "
                        "give one of them")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    spec = official_spec(config.model)
    model = build_model(spec)
    if src == HUB_SOURCE:
        src = download(hub_id(spec.name))
    convert_into(model, src, tools.dst, ema=config.model.ema,
                 description=spec.describe(preprocessing(model, spec, config.augmentation)))
    print(f"wrote {tools.dst} ({spec.name}, {spec.num_classes} classes)")


if __name__ == "__main__":
    run_cli(main)
