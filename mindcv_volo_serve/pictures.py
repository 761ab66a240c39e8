"""Which pictures a command classifies, the top-k of each in batches, and the line it prints for each."""
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import UserError

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


def top_k(logits, names, k):
    """[[name, probability], ...] of the k most probable classes (softmax of the logits, float64)."""
    shifted = logits.astype(np.float64) - logits.max()
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [[names[i], round(float(probabilities[i]), 6)] for i in best]


def prediction_line(path, top):
    """The JSON line printed for one picture: {"image": path, "top5": [[class name, probability], ...]}."""
    return json.dumps({"image": str(path), f"top{len(top)}": top})


def predict(run, preprocessing, paths, names, k, batch_size):
    """For each picture of `paths`, in order: (path, top-k [[name, probability], ...], None), or (path, None,
    UserError) when it cannot be read. `run` maps a float32 batch of exactly `batch_size` inputs to their logits
    (a short last batch is padded with its last picture: one compiled shape)."""
    for first in range(0, len(paths), batch_size):
        inputs, readable = [], []
        for path in paths[first:first + batch_size]:
            try:
                inputs.append(preprocessing.load(path))
                readable.append(path)
            except UserError as err:
                yield path, None, err
        if not inputs:
            continue
        logits = run(np.stack(inputs + [inputs[-1]] * (batch_size - len(inputs))))
        for path, row in zip(readable, logits):
            yield path, top_k(row, names, k), None


def print_predictions(results):
    """Print one JSON line per picture to stdout and one error line per unreadable picture to stderr; exit code 2
    after them when any was unreadable."""
    failed = 0
    for path, top, error in results:
        if error is not None:
            print(f"error: {error}", file=sys.stderr, flush=True)
            failed += 1
        else:
            print(prediction_line(path, top), flush=True)
    if failed:
        raise SystemExit(2)
