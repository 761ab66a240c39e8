"""infer.py: classify pictures with a checkpoint, MindCV's command and options.

    python infer.py --ckpt_path X.ckpt --image_path PICTURE_OR_FOLDER [--top_k 5]

Each image is preprocessed as the model evaluates (`mindcv_volo_serve.Preprocessing`, from the checkpoint's
description) and printed as one JSON line: {"image": path, "top5": [[class name, probability], ...]}.
Class names are the checkpoint's: train.py stores its training folders' names, the converter ImageNet-1k's
for the official weights. A checkpoint that names no class (or fewer than its outputs) gets `class_<index>`
for the unnamed ones, and one log line says so; ImageNet's names are never guessed from a class count. An image that cannot be read gives one error line
naming it on stderr, the others are still classified, and the exit code is then 2.
"""
import logging

from mindspore import Tensor

from mindcv_volo_serve.pictures import image_files, predict, print_predictions

from ..errors import UserError
from .evaluate import EvalNetwork
from .model_spec import load_model, preprocessing
from .runtime import compile_before_first_run, setup_runtime

logger = logging.getLogger("mindcv_volo")



def class_names(spec):
    """The name of each output: the checkpoint's, `class_<index>` past them."""
    named = list(spec.class_names or ())
    if len(named) < spec.num_classes:
        logger.info("the checkpoint names %s of its %d classes: the unnamed ones are printed as class_<index>",
                    len(named) or "none", spec.num_classes)
    return named + [f"class_{index}" for index in range(len(named), spec.num_classes)]


def infer(config):
    """Print one JSON line per image; exit code 2 after them when an image could not be read."""
    if not config.tools.image_path:
        raise UserError("image_path is not set; pass --image_path PICTURE_OR_FOLDER")
    files = image_files(config.tools.image_path)
    setup_runtime(config.system)
    model, spec, description = load_model(config.model, config.model.ckpt_path, ema=config.model.ema,
                                          given=config.given)
    prep = preprocessing(model, spec, config.augmentation, description)
    network = EvalNetwork(model)
    network.set_train(False)
    names = class_names(spec)

    def run(batch):
        batch = Tensor(batch)
        compile_before_first_run(network, batch)  # one shape: predict pads every batch to batch_size
        return network(batch).asnumpy()

    print_predictions(predict(run, prep, files, names, min(config.tools.top_k, spec.num_classes),
                              config.data.batch_size))
