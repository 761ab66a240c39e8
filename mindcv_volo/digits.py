"""scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes) as an ImageFolder data set.

    python -m mindcv_volo.digits --out DIR [--val_fraction 0.2] [--seed 0]

writes DIR/train/<digit>/<index>.png and DIR/val/<digit>/<index>.png: a fixed stratified split (the same
files for the same seed), 8-bit RGB PNGs upscaled from 8x8 to `--size` pixels (nearest), so the training
pipeline reads them like any photo folder. The data ships inside scikit-learn: nothing is downloaded.
The split folders are written beside the target and renamed into place, so an interrupted run never
leaves a half-written data set behind.
"""
import argparse
import os
import shutil

import numpy as np

from .errors import UserError, run_cli
from .files import atomic_path

SPLITS = ("train", "val")


def load_digits_arrays():
    """(images uint8 (N, 8, 8) on 0-255, labels (N,)) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("scikit-learn is needed for the digits: pip install -e .[quickstart]") from None
    digits = load_digits()
    # Values are 0..16 (ink counts): stretch to 0..255.
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def stratified_split(labels, val_fraction, seed):
    """Index arrays (train, val): per class, a seeded shuffle and the first round(n * fraction) to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * val_fraction))
        val.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def write_split(folder, images, labels, indices, size):
    from PIL import Image

    for label in np.unique(labels):
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
    for index in indices:
        image = Image.fromarray(images[index], mode="L").resize((size, size), Image.NEAREST).convert("RGB")
        image.save(os.path.join(folder, str(labels[index]), f"{index:04d}.png"))


def write_digits(out, val_fraction=0.2, seed=0, size=32):
    """Write the ImageFolder set under `out`; returns {split: image count}."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    images, labels = load_digits_arrays()
    splits = dict(zip(SPLITS, stratified_split(labels, val_fraction, seed)))
    for split, indices in splits.items():
        target = os.path.join(out, split)
        with atomic_path(target) as tmp:
            write_split(tmp, images, labels, indices, size)
            if os.path.isdir(target):
                shutil.rmtree(target)
    return {split: len(indices) for split, indices in splits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write train/ and val/ into")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=0.2,
                        help="share of each class held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--size", type=int, default=32, help="side of the written PNGs in pixels (default 32)")
    args = parser.parse_args(argv)
    counts = write_digits(args.out, args.val_fraction, args.seed, args.size)
    print(f"wrote {counts['train']} train and {counts['val']} val images of 10 classes to {args.out}")


if __name__ == "__main__":
    run_cli(main)
