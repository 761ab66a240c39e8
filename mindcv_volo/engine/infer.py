"""infer.py: classify pictures with a checkpoint, MindCV's command and options.

    python infer.py --ckpt_path X.ckpt --image_path PICTURE_OR_FOLDER [--top_k 5]

Each image is preprocessed as the model evaluates (`engine.data.Preprocessing`, from the checkpoint's
description) and printed as one JSON line: {"image": path, "top5": [[class name, probability], ...]}.
Class names are the checkpoint's: train.py stores its training folders' names, the converter ImageNet-1k's
for the official weights. A checkpoint that names no class (or fewer than its outputs) gets `class_<index>`
for the unnamed ones, and one log line says so; ImageNet's names are never guessed from a class count. An image that cannot be read gives one error line
naming it on stderr, the others are still classified, and the exit code is then 2.
"""
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from mindspore import Tensor

from ..errors import UserError
from .evaluate import EvalNetwork
from .model_spec import load_model, preprocessing
from .runtime import setup_runtime

logger = logging.getLogger("mindcv_volo")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_files(path):
    """The image at `path`, or the images under the folder `path` (recursively, sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"image_path not found: {path}")
    found = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise UserError(f"no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return found


def class_names(spec):
    """The name of each output: the checkpoint's, `class_<index>` past them."""
    named = list(spec.class_names or ())
    if len(named) < spec.num_classes:
        logger.info("the checkpoint names %s of its %d classes: the unnamed ones are printed as class_<index>",
                    len(named) or "none", spec.num_classes)
    return named + [f"class_{index}" for index in range(len(named), spec.num_classes)]


def top_k(logits, names, k):
    """[[name, probability], ...] of the k most probable classes (softmax of the logits, float64)."""
    shifted = logits.astype(np.float64) - logits.max()
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [[names[i], round(float(probabilities[i]), 6)] for i in best]


def infer(config):
    """Print one JSON line per image; returns the number of images that could not be read."""
    if not config.model.ckpt_path:
        raise UserError("ckpt_path is not set; pass --ckpt_path FILE.ckpt (from train.py or mindcv_volo.convert)")
    if not config.tools.image_path:
        raise UserError("image_path is not set; pass --image_path PICTURE_OR_FOLDER")
    files = image_files(config.tools.image_path)
    setup_runtime(config.system)
    model, spec, description = load_model(config.model, config.model.ckpt_path, ema=config.model.ema,
                                          given=config.given)
    prep = preprocessing(model, spec, config.augmentation, description)
    network = EvalNetwork(model)
    network.set_train(False)
    names, k, batch_size = class_names(spec), min(config.tools.top_k, spec.num_classes), config.data.batch_size
    failed = 0
    for first in range(0, len(files), batch_size):
        images, paths = [], []
        for path in files[first:first + batch_size]:
            try:
                images.append(prep.load(path))
                paths.append(path)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                failed += 1
        if not images:
            continue
        batch = np.stack(images + [images[-1]] * (batch_size - len(images)))  # one graph: pad the last batch
        logits = network(Tensor(batch)).asnumpy()
        for path, row in zip(paths, logits):
            print(json.dumps({"image": path, f"top{k}": top_k(row, names, k)}), flush=True)
    if failed:
        raise SystemExit(2)
    return failed
