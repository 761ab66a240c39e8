"""infer.py: classify pictures with a checkpoint, MindCV's command and options.

    python infer.py --ckpt_path X.ckpt --image_path PICTURE_OR_FOLDER [--top_k 5]

Each image is preprocessed as the model evaluates (`mindcv_volo_serve.Preprocessing`, from the checkpoint's
description) and printed as one JSON line: {"image": path, "top5": [[class name, probability], ...]}.
Class names are the checkpoint's (train.py stores its training folders' names), ImageNet's 1,000 for a
1000-class model without names, else the class indices. An image that cannot be read gives one error line
naming it on stderr, the others are still classified, and the exit code is then 2.
"""
import logging
from pathlib import Path

from mindspore import Tensor

from mindcv_volo_serve.pictures import image_files, predict, print_predictions

from ..errors import UserError
from .evaluate import EvalNetwork
from .model_spec import load_model, preprocessing
from .runtime import setup_runtime

logger = logging.getLogger("mindcv_volo")

IMAGENET_CLASSES = Path(__file__).resolve().parent.parent / "models" / "imagenet_classes.txt"


def class_names(spec):
    if spec.class_names:
        return list(spec.class_names)
    if spec.num_classes == 1000:
        return IMAGENET_CLASSES.read_text(encoding="utf-8").splitlines()
    return [str(index) for index in range(spec.num_classes)]


def infer(config):
    """Print one JSON line per image; exit code 2 after them when an image could not be read."""
    if not config.tools.image_path:
        raise UserError("image_path is not set; pass --image_path PICTURE_OR_FOLDER")
    files = image_files(config.tools.image_path)
    setup_runtime(config.system)
    model, spec, description = load_model(config.model, config.model.ckpt_path, ema=config.model.ema)
    prep = preprocessing(model, spec, config.augmentation, description)
    network = EvalNetwork(model)
    network.set_train(False)
    names = class_names(spec)

    def run(batch):
        return network(Tensor(batch)).asnumpy()

    print_predictions(predict(run, prep, files, names, min(config.tools.top_k, spec.num_classes),
                              config.data.batch_size))
