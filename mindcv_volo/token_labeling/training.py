"""`loss: token_label`: token labeling and MixToken in train.py's step (the engine's loss seam).

Two modes, chosen by `token_label_dir`:
  * ground truth (no maps): every token's target is its image's label; the loader is train.py's own;
  * label maps (`token_label_dir` from `python -m mindcv_volo.relabel`): the loader crops and flips each
    image and its map with one box (`RandomResizedCropWithMap`), then applies MindCV's other
    training transforms (RandAugment, normalisation, random erasing) to the image alone.
With `mix_token` on, each step's MixToken box is drawn on the host from (seed, epoch, step, rank), so a
resumed run draws the same boxes; the box reaches the graph as a mask tensor of static shape.
"""
import mindspore.dataset as ds
import numpy as np
from mindcv.data.transforms_factory import transforms_imagenet_train
from mindspore import Tensor

from ..engine.data import IMAGENET_MEAN_255, IMAGENET_STD_255, epoch_order, order_seed, rank_slice
from ..models.volo import TOKEN_STRIDE
from .label_maps import ImageFolderWithMaps, RandomResizedCropWithMap
from .loss import LabelMapsWithLoss, LabelsWithLoss, TokenLabelCrossEntropy
from .mix_token import MixTokenSampler

MAP_COLUMNS = ["image", "label", "cls_indices", "cls_scores", "token_indices", "token_scores"]


class GroundTruthTokenLoss(LabelsWithLoss):
    """Batches (image, label): each token's target is the image's label."""

    def __init__(self, model, loss_fn, num_classes, mixer):
        super().__init__(model, loss_fn, num_classes)
        self.mixer = mixer

    def step_inputs(self, batch, epoch, step):
        return (Tensor(batch[0]), Tensor(batch[1].astype(np.int32)), *self.mixer(epoch, step))


class LabelMapTokenLoss(LabelMapsWithLoss):
    """Batches in MAP_COLUMNS order: the teacher's top-k per crop and per token are the targets."""

    def __init__(self, model, loss_fn, num_classes, mixer, map_dir):
        super().__init__(model, loss_fn, num_classes)
        self.mixer = mixer
        self.map_dir = map_dir

    def step_inputs(self, batch, epoch, step):
        return (*(Tensor(column) for column in batch), *self.mixer(epoch, step))

    def create_train_loader(self, split, epoch, steps, data, aug, num_classes, seed, runtime):
        return create_label_map_loader(self.map_dir, split, epoch, steps, data, aug, num_classes, seed, runtime)


def build_token_label_loss(model, loss_options, num_classes, seed, runtime):
    """The loss builder of `loss: token_label` (engine.step's seam): label maps when token_label_dir is set."""
    loss_fn = TokenLabelCrossEntropy(loss_options.cls_weight, loss_options.dense_weight, loss_options.label_smoothing)
    mixer = MixTokenSampler(seed, model.img_size // TOKEN_STRIDE, runtime.rank, loss_options.mix_token)
    if loss_options.token_label_dir:
        return LabelMapTokenLoss(model, loss_fn, num_classes, mixer, loss_options.token_label_dir)
    return GroundTruthTokenLoss(model, loss_fn, num_classes, mixer)


def create_label_map_loader(map_dir, split, epoch, steps, data, aug, num_classes, seed, runtime):
    """This rank's batches of one epoch with their label maps, in the same (seed, epoch) order as train.py's."""
    order = epoch_order(split.count, data.batch_size * runtime.world, steps, seed, epoch, data.shuffle)
    source = ImageFolderWithMaps(split.folder, map_dir, num_classes)
    # One worker reading and cropping: the crops then meet the generator in order (reproducible resume).
    indices = [int(i) for i in rank_slice(order, data.batch_size, runtime.rank, runtime.world)]
    dataset = ds.GeneratorDataset(source, column_names=source.columns, num_parallel_workers=1,
                                  sampler=ds.SubsetSampler(indices))
    crop = RandomResizedCropWithMap(aug.image_resize, scale=aug.scale, ratio=aug.ratio,
                                    interpolation=aug.interpolation, hflip=aug.hflip,
                                    rng=np.random.default_rng([seed, epoch, runtime.rank]))
    dataset = dataset.map(operations=crop, input_columns=["image", "map_indices", "map_scores"],
                          output_columns=MAP_COLUMNS[:1] + MAP_COLUMNS[2:], num_parallel_workers=1)
    ds.config.set_seed(order_seed(seed, epoch) % (2 ** 32))  # RandAugment and erasing, per (seed, epoch)
    _, augment, finish = transforms_imagenet_train(
        image_resize=aug.image_resize, auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
        interpolation=aug.interpolation, mean=list(aug.mean or IMAGENET_MEAN_255),
        std=list(aug.std or IMAGENET_STD_255), re_prob=aug.re_prob, re_scale=tuple(aug.re_scale),
        re_ratio=tuple(aug.re_ratio), re_value=aug.re_value, re_max_attempts=aug.re_max_attempts, separate=True)
    dataset = dataset.map(operations=augment + finish, input_columns=["image"], num_parallel_workers=1)
    return dataset.project(MAP_COLUMNS).batch(data.batch_size, drop_remainder=True)
