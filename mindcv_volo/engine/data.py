"""Data: ImageFolder splits, MindCV's transforms and loaders, and a data order keyed by (seed, epoch).

Training reads `data_dir/train_split` through `mindcv.data` (create_dataset on the ImageFolder layout,
create_transforms, create_loader, MindCV's Mixup). The order of the images is not left to MindSpore's
shuffle: each epoch a permutation is drawn from numpy's generator seeded with (seed, epoch), cut into
global batches, and every rank takes its own slice of each global batch (a SubsetSampler). So:
  * the union of the ranks' batches at step s is the batch a single process with the global batch size
    sees at step s;
  * a resumed run sees exactly the order of a run that was never stopped.
The augmentation's random state is also re-seeded from (seed, epoch) when an epoch's pipeline is built.

Evaluation uses the model's own preprocessing (`Preprocessing`, `eval_transforms`: the one definition used
by validation, inference and the relabelling teacher): resize to size / crop_pct (PIL bicubic, as the
official), center crop, mean/std normalisation, on every image of the split in file order, each rank a
stride.
"""
import math
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import mindspore.dataset as ds
from mindspore.dataset import vision
from mindspore.dataset.vision import Inter
from mindcv.data import create_dataset, create_loader, create_transforms
from mindcv.data.mixup import Mixup

from ..errors import UserError
from ..models.volo import IMAGENET_MEAN, IMAGENET_STD
from .runtime import available_cores

class SplitInfo:
    """One split folder of an ImageFolder data set: its classes (sorted sub-folders) and image count."""

    def __init__(self, data_dir, split):
        self.folder = os.path.join(data_dir, split)
        if not data_dir:
            raise UserError("data_dir is not set; pass --data_dir DIR (a folder holding train/ and val/)")
        if not os.path.isdir(data_dir):
            raise UserError(f"data_dir not found: {data_dir}")
        if not os.path.isdir(self.folder):
            present = sorted(e for e in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, e)))
            raise UserError(f"split folder not found: {self.folder} (folders in {data_dir}: "
                            f"{', '.join(present) or 'none'})")
        self.classes = sorted(e for e in os.listdir(self.folder) if os.path.isdir(os.path.join(self.folder, e)))
        # MindSpore's ImageFolderDataset reads every file of a class folder; count them the same way.
        self.count = sum(1 for c in self.classes for f in os.scandir(os.path.join(self.folder, c)) if f.is_file())
        if not self.count:
            raise UserError(f"split {self.folder} is empty: it needs one sub-folder per class holding the images")

    def check_same_classes(self, other):
        if self.classes != other.classes:
            only_self = sorted(set(self.classes) - set(other.classes))
            only_other = sorted(set(other.classes) - set(self.classes))
            parts = [f"only in {self.folder}: {', '.join(only_self[:5])}" if only_self else "",
                     f"only in {other.folder}: {', '.join(only_other[:5])}" if only_other else ""]
            raise UserError(f"{self.folder} and {other.folder} have different classes "
                            f"({'; '.join(p for p in parts if p)})")

    def check_num_classes(self, num_classes):
        if len(self.classes) > num_classes:
            raise UserError(f"{self.folder} has {len(self.classes)} classes but num_classes is {num_classes}; "
                            f"set --num_classes {len(self.classes)}")


def order_seed(seed, epoch):
    """One integer seed for (seed, epoch): numpy's SeedSequence mixes the pair, so epochs do not collide."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(num_images, global_batch, steps, seed, epoch, shuffle=True):
    """The image indices of one epoch for all ranks: `steps` global batches, from (seed, epoch) alone.

    When the images do not fill `steps` batches the permutation wraps around (drop_remainder off).
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_images) if shuffle else np.arange(num_images)
    return np.resize(order, steps * global_batch)


def rank_slice(order, batch_size, rank, world):
    """This rank's part of each global batch: rows [rank * batch_size, (rank + 1) * batch_size)."""
    return order.reshape(-1, world, batch_size)[:, rank].reshape(-1)


def train_steps(num_images, global_batch, accumulation, drop_remainder):
    """Micro-steps of an epoch over `num_images` (the split's, or num_samples of them): whole global batches,
    a multiple of the accumulation steps."""
    batches = num_images // global_batch if drop_remainder else math.ceil(num_images / global_batch)
    return batches // accumulation * accumulation


def train_transforms(aug):
    """MindCV's training transforms for the `augmentation` section (mean/std null: ImageNet's)."""
    return create_transforms(
        "imagenet", image_resize=aug.image_resize, is_training=True, auto_augment=aug.auto_augment,
        scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip, vflip=aug.vflip,
        color_jitter=aug.color_jitter, interpolation=aug.interpolation, mean=list(aug.mean or IMAGENET_MEAN_255),
        std=list(aug.std or IMAGENET_STD_255), re_prob=aug.re_prob, re_scale=tuple(aug.re_scale),
        re_ratio=tuple(aug.re_ratio), re_value=aug.re_value, re_max_attempts=aug.re_max_attempts)


class Preprocessing(NamedTuple):
    """How a model's input is made from an image: the fact checkpoints carry and every evaluator uses."""
    size: int
    crop_pct: Optional[float]  # None: the whole image, resized to size x size (the relabelling teacher's view)
    interpolation: str
    mean: tuple  # per channel, 0-255 pixel scale
    std: tuple

    def transforms(self):
        """The steps, as the official (timm on PIL images) does them.

        Decode to a PIL image, resize the shorter side to floor(size / crop_pct) with PIL's filter (MindSpore's
        Resize runs PIL on PIL images; on arrays it runs a kernel without PIL's antialiasing, which moves the
        pixels of a downscaled photo by ~10 levels), center crop, then mean/std on the 0-255 scale, CHW.
        MindCV's eval transforms are the same steps on arrays.
        """
        if self.crop_pct is None:
            resize = [vision.Resize((self.size, self.size), _INTER[self.interpolation])]
        else:
            resize = [vision.Resize(int(math.floor(self.size / self.crop_pct)), _INTER[self.interpolation]),
                      vision.CenterCrop(self.size)]
        return [vision.Decode(to_pil=True), *resize, vision.ToNumpy(),
                vision.Normalize(mean=list(self.mean), std=list(self.std)), vision.HWC2CHW()]

    def load(self, path):
        """One image file as the model's input: float32 (3, size, size); a UserError naming an unreadable file."""
        try:
            image = np.fromfile(path, np.uint8)
            for step in self.transforms():
                image = step(image)
        except (OSError, RuntimeError, ValueError):
            raise UserError(f"cannot read image {path}: corrupt or not an image") from None
        return image.astype(np.float32)


IMAGENET_MEAN_255 = tuple(round(m * 255, 3) for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(round(s * 255, 3) for s in IMAGENET_STD)
_INTER = {"bicubic": Inter.BICUBIC, "bilinear": Inter.BILINEAR, "nearest": Inter.NEAREST, "area": Inter.AREA,
          "pilcubic": Inter.PILCUBIC}


def _workers(requested):
    """MindSpore refuses more data workers than CPU cores (recipes written for big hosts ask for 8)."""
    return max(1, min(requested, available_cores()))


def _image_folder(folder, indices, workers):
    data_dir, split = os.path.split(folder.rstrip(os.sep))
    dataset = create_dataset(name="imagenet", root=data_dir, split=split, shuffle=False,
                             num_parallel_workers=workers)
    dataset.use_sampler(ds.SubsetSampler([int(i) for i in indices]))
    return dataset


def create_train_loader(split, epoch, steps, data, aug, num_classes, seed, runtime):
    """This rank's batches of one epoch: (image float32 NCHW, label int32 (B,) or float32 (B, K) with mixup).

    `data`, `aug`: the run's data and augmentation sections; `runtime`: its rank and world size.
    """
    order = epoch_order(split.count, data.batch_size * runtime.world, steps, seed, epoch, data.shuffle)
    epoch_seed = order_seed(seed, epoch)
    ds.config.set_seed(epoch_seed % (2 ** 32))  # the augmentation's random state, per (seed, epoch)
    np.random.seed(epoch_seed % (2 ** 32))  # MindCV's Mixup draws from numpy's global generator
    workers = _workers(data.num_parallel_workers)
    dataset = _image_folder(split.folder, rank_slice(order, data.batch_size, runtime.rank, runtime.world), workers)
    loader = create_loader(dataset, data.batch_size, drop_remainder=True, is_training=True,
                           transform=train_transforms(aug), num_parallel_workers=workers)
    if aug.mixup > 0 or aug.cutmix > 0:
        mix = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.cutmix_prob,
                    switch_prob=aug.mixup_switch_prob, label_smoothing=0.0, num_classes=num_classes)
        # One worker: the batches then meet numpy's generator in order, so the mixing is reproducible.
        loader = loader.map(operations=mix, input_columns=["image", "label"], num_parallel_workers=1)
    return loader


def create_eval_loader(split, batch_size, preprocessing, rank=0, world=1, workers=4):
    """Every image of the split once, in file order; rank r takes images r, r + world, ... (last batch short)."""
    workers = _workers(workers)
    dataset = _image_folder(split.folder, range(rank, split.count, world), workers)
    return create_loader(dataset, batch_size, drop_remainder=False, is_training=False,
                         transform=preprocessing.transforms(), num_parallel_workers=workers)


_BAD_FILE = re.compile(r"The corresponding data file is: (.+?)\.(?: |\n|$)")


def pipeline_error(err):
    """A UserError for a data-pipeline failure caused by a file (e.g. an unreadable image), else None."""
    match = _BAD_FILE.search(str(err))
    if match is None:
        return None
    # MindSpore's own words differ between its decoders (C++ or PIL); the file is what matters.
    return UserError(f"cannot read image {match.group(1)}: corrupt or not an image; remove or replace it")


def iterate(loader, num_epochs=1):
    """numpy batches of `loader`; a failure to read an image becomes a one-line UserError."""
    iterator = loader.create_tuple_iterator(output_numpy=True, num_epochs=num_epochs)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            user_error = pipeline_error(err)
            if user_error is None:
                raise
            raise user_error from None
        yield batch
