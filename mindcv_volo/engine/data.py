"""Data: ImageFolder splits, the training samples and their order keyed by (seed, epoch), evaluation loaders.

Training reads `data_dir/train_split` image by image (`TrainSamples`, a random-access source for MindSpore's
GeneratorDataset). The order of the images is not left to MindSpore's shuffle: each epoch a permutation is
drawn from (seed, epoch), cut into global batches, and every rank takes its own slice of each global batch.
Each sample is augmented by `augment.TrainAugmentation` with the generator of (seed, epoch, its position in
the epoch's global order), and each batch is mixed (mixup/cutmix) with the generator of (seed, epoch, step,
rank). So:
  * the union of the ranks' batches at step s is the batch a single process with the global batch size
    sees at step s, with the same per-sample augmentation;
  * a resumed run, even one resumed in the middle of an epoch, sees exactly the data of a run that was
    never stopped, and nothing but the position needs saving;
  * the number of data workers, and which worker takes which sample, change nothing.

Evaluation uses the model's own preprocessing (`mindcv_volo_serve.Preprocessing`: the one definition used
by validation, inference, the relabelling teacher and exported ONNX files): resize to size / crop_pct (PIL
bicubic, as the official), center crop, mean/std normalisation, on every image of the split in file order,
each rank a stride.
"""
import logging
import math
import os
import re

import numpy as np
import mindspore.dataset as ds
from mindcv.data import create_dataset, create_loader
from PIL import Image

from mindcv_volo_serve.preprocessing import Preprocessing  # noqa: F401  (the engine's callers import it from here)

from ..errors import UserError
from ..models.volo import IMAGENET_MEAN, IMAGENET_STD
from .augment import BatchMixer, TrainAugmentation
from .randomness import generator, sample_generator
from .runtime import available_cores

logger = logging.getLogger("mindcv_volo")


def list_images(folder):
    """(relative path, class index) of every file of an ImageFolder split: classes and files sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    items = _class_files(folder)[1]
    if not items:
        raise UserError(f"{folder} holds no images (expected one sub-folder per class)")
    return items


def _class_files(folder):
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    items = [(f"{name}/{f.name}", label) for label, name in enumerate(classes)
             for f in sorted(os.scandir(os.path.join(folder, name)), key=lambda e: e.name) if f.is_file()]
    return classes, items


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
        # Every file of a class folder is an image (MindSpore's ImageFolderDataset, evaluation's reader, agrees).
        self.classes, self.items = _class_files(self.folder)
        self.count = len(self.items)
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
        """A UserError when the folders hold more classes than the model has outputs; one warning when fewer."""
        folders = len(self.classes)
        if folders > num_classes:
            raise UserError(f"{self.folder} has {folders} classes but num_classes is {num_classes}; "
                            f"set --num_classes {folders}")
        if folders < num_classes:
            logger.warning("warning: num_classes is %d but %s has %d class folders: %d of the model's outputs are "
                           "never trained (set num_classes %d, or null to follow the folders)", num_classes,
                           self.folder, folders, num_classes - folders, folders)


def epoch_order(num_images, global_batch, steps, seed, epoch, shuffle=True):
    """The image indices of one epoch for all ranks: `steps` global batches, from (seed, epoch) alone.

    When the images do not fill `steps` batches the permutation wraps around (drop_remainder off).
    """
    order = generator("order", seed, epoch).permutation(num_images) if shuffle else np.arange(num_images)
    return np.resize(order, steps * global_batch)


def rank_slice(order, batch_size, rank, world):
    """This rank's part of each global batch: rows [rank * batch_size, (rank + 1) * batch_size)."""
    return order.reshape(-1, world, batch_size)[:, rank].reshape(-1)


def train_steps(num_images, global_batch, accumulation, drop_remainder):
    """Micro-steps of an epoch over `num_images` (the split's, or num_samples of them): whole global batches,
    a multiple of the accumulation steps."""
    batches = num_images // global_batch if drop_remainder else math.ceil(num_images / global_batch)
    return batches // accumulation * accumulation


def pixel_mean_std(aug):
    """The `augmentation` section's mean and std per channel, 0-255 scale (null: ImageNet's)."""
    return aug.mean or IMAGENET_MEAN_255, aug.std or IMAGENET_STD_255


def normalizes_on_device(aug):
    """Whether training images leave the host as uint8 pixels, for the compiled step to normalise and erase
    (a quarter of float32's bytes, and the host's cores spared the arithmetic): unless mixup/cutmix (which mixes
    normalised batches on the host) or erasing with random values (drawn per sample on the host) is on."""
    return aug.mixup <= 0 and aug.cutmix <= 0 and aug.re_value != "random"


def train_augmentation(aug):
    """The per-sample training transform of the `augmentation` section, (PIL image, Generator) -> (array,
    Geometry): uint8 pixels (`TrainAugmentation.pixels`) where the step normalises, else float32 CHW (mean/std
    null: ImageNet's)."""
    augmentation = TrainAugmentation(aug, *pixel_mean_std(aug))
    return augmentation.pixels if normalizes_on_device(aug) else augmentation


def read_image(path):
    """An image file as an RGB PIL image; a UserError naming a file that cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise unreadable_image(path) from None


def unreadable_image(path):
    return UserError(f"cannot read image {path}: corrupt or not an image; remove or replace it")


class TrainSamples:
    """Random-access source (for GeneratorDataset) of one epoch's training samples, by position.

    Item `position` (in the epoch's global order, all ranks together) is the image order[position] of the
    split, augmented with the generator of (seed, epoch, position): (image as `train_augmentation` makes it,
    label int32, and the columns `extra_columns` adds). A subclass adds columns that follow the image (label maps).
    An unreadable image is replaced by the next readable one of the epoch's order, a choice that depends on
    nothing but the order and the files (`flagged`); `sample_batches` then stops the run at that batch, or
    with skip_unreadable_images counts and trains on the replacement.
    """

    columns = ("image", "label")

    def __init__(self, split, order, augmentation, seed, epoch):
        self.folder, self.items = split.folder, split.items
        self.order, self.augmentation, self.seed, self.epoch = order, augmentation, seed, epoch

    def __len__(self):
        return len(self.order)

    def __getitem__(self, position):
        return self.flagged(position)[:-1]

    def flagged(self, position):
        """The sample's columns, then the split index of its own image if that could not be read, else -1."""
        image, relpath, label, unreadable = self.readable_image(position)
        array, geometry = self.augmentation(image, sample_generator(self.seed, self.epoch, position))
        return (array, np.int32(label), *self.extra_columns(relpath, geometry), np.int32(unreadable))

    def readable_image(self, position):
        """(PIL image, relative path, label) of the first readable image from `position` on in the epoch's
        order (wrapping around), and the split index of `position`'s own image if it could not be read, else
        -1."""
        unreadable = -1
        for offset in range(len(self.order)):
            index = self.order[(position + offset) % len(self.order)]
            relpath, label = self.items[index]
            try:
                return read_image(os.path.join(self.folder, relpath)), relpath, label, unreadable
            except UserError:
                if offset == 0:
                    unreadable = index
        raise UserError(f"no training image of {self.folder} can be read")

    def extra_columns(self, relpath, geometry):
        """More columns of a sample, from its file and the geometry its image went through."""
        return ()


IMAGENET_MEAN_255 = tuple(round(m * 255, 3) for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(round(s * 255, 3) for s in IMAGENET_STD)


def _workers(requested):
    """MindSpore refuses more data workers than CPU cores (recipes written for big hosts ask for 8)."""
    return max(1, min(requested, available_cores()))


def _image_folder(folder, indices, workers):
    data_dir, split = os.path.split(folder.rstrip(os.sep))
    dataset = create_dataset(name="imagenet", root=data_dir, split=split, shuffle=False,
                             num_parallel_workers=workers)
    dataset.use_sampler(ds.SubsetSampler([int(i) for i in indices]))
    return dataset


def sample_batches(source, batch_size, runtime, first_step, workers, skip_unreadable=False):
    """This rank's batches of `source` (TrainSamples) from `first_step` on, as numpy arrays.

    Any number of workers gives the same batches: each sample carries its own randomness, and
    GeneratorDataset returns the samples in the sampler's order. An unreadable image raises its UserError at
    its batch (a worker meets it earlier), or with `skip_unreadable` is named and counted (`_unreadable`).
    """
    positions = rank_slice(np.arange(len(source)), batch_size, runtime.rank, runtime.world)[first_step * batch_size:]
    workers = _workers(workers)
    dataset = ds.GeneratorDataset(_Flagged(source), column_names=[*source.columns, "unreadable"],
                                  sampler=ds.SubsetSampler(positions.tolist()),
                                  num_parallel_workers=workers, python_multiprocessing=workers > 1)
    batches = iterate(dataset.batch(batch_size, drop_remainder=True))
    return _unreadable(batches, source, skip_unreadable, first_step, runtime.rank)


class _Flagged:
    """`source`'s samples with their unreadable-image column (TrainSamples.flagged), for GeneratorDataset."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, position):
        return self.source.flagged(position)


def _unreadable(batches, source, skip, first_step, rank):
    """The batches without their last column, the split index of the unreadable image each sample replaced
    (-1: none): off `skip`, the first one is a UserError; on, each file is named once per process and the
    epoch's count logged at the end. Read here, in the main process, the names and count hold whichever
    worker process read the images."""
    replaced, step = 0, first_step
    for *batch, unreadable in batches:
        for index in unreadable[unreadable >= 0]:
            path = os.path.join(source.folder, source.items[index][0])
            if not skip:
                raise unreadable_image(path)
            if path not in _REPORTED:
                _REPORTED.add(path)
                logger.warning("warning: skipping unreadable image %s (skip_unreadable_images): its samples take "
                               "the next readable image of the epoch's order", path)
            replaced += 1
        step += 1
        yield batch
    if replaced:
        logger.warning("warning: epoch %d steps %d-%d: %d of rank %d's samples replaced an unreadable image "
                       "(skip_unreadable_images)", source.epoch + 1, first_step + 1, step, replaced, rank)


# The unreadable images this process has named (once each: every epoch meets them again).
_REPORTED = set()


def create_train_loader(split, epoch, steps, data, aug, num_classes, seed, runtime, first_step=0):
    """This rank's batches of one epoch from `first_step` on: (image, label int32 (B,), or float32 (B, K)
    targets with mixup/cutmix), numpy. The images are uint8 NHWC (with an erased-box channel under erasing) where
    `normalizes_on_device`, else float32 NCHW.

    `data`, `aug`: the run's data and augmentation sections; `runtime`: its rank and world size.
    """
    order = epoch_order(split.count, data.batch_size * runtime.world, steps, seed, epoch, data.shuffle)
    source = TrainSamples(split, order, train_augmentation(aug), seed, epoch)
    batches = sample_batches(source, data.batch_size, runtime, first_step, data.num_parallel_workers,
                             data.skip_unreadable_images)
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return batches
    mixer = BatchMixer(aug, num_classes, seed, runtime.rank)
    return (mixer(images, labels, epoch, step) for step, (images, labels) in enumerate(batches, start=first_step))


def create_eval_loader(split, batch_size, preprocessing, rank=0, world=1, workers=4):
    """Every image of the split once, in file order; rank r takes images r, r + world, ... (last batch short)."""
    workers = _workers(workers)
    dataset = _image_folder(split.folder, range(rank, split.count, world), workers)
    return create_loader(dataset, batch_size, drop_remainder=False, is_training=False,
                         transform=preprocessing.transforms(), num_parallel_workers=workers)


_BAD_FILE = re.compile(r"The corresponding data file is: (.+?)\.(?: |\n|$)")
# A UserError raised by a pipeline source (an unreadable image, a label map that does not fit), as MindSpore
# quotes it: "UserError: ..." or "mindcv_volo.errors.UserError: ..." on a line of its own.
_RAISED = re.compile(r"^(?:[\w.]+\.)?UserError: (.+)$", re.MULTILINE)


def pipeline_error(err):
    """A UserError for a data-pipeline failure caused by a file (e.g. an unreadable image), else None."""
    raised = _RAISED.findall(str(err))
    if raised:
        return UserError(raised[-1].strip())
    match = _BAD_FILE.search(str(err))
    if match is None:
        return None
    # MindSpore's own words differ between its decoders (C++ or PIL); the file is what matters.
    return unreadable_image(match.group(1))


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
