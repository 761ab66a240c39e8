"""`loss: token_label`: token labeling and MixToken in train.py's step (the engine's loss seam).

Two modes, chosen by `token_label_dir`:
  * ground truth (no maps): every token's target is its image's label; the loader is train.py's own;
  * label maps (`token_label_dir` from `python -m mindcv_volo.relabel`): each sample's map follows every
    geometric operation of its image (crop, flips, RandAugment's rotate, shear, translate: the image's
    `Geometry`) and is resampled to the token grid (`label_maps.label_map_columns`). The maps are checked
    before anything runs: a map for every training image.
With `mix_token` on, each step's MixToken box is drawn on the host from (seed, epoch, step, rank), so a
resumed run draws the same boxes; the box reaches the graph as a mask tensor of static shape. The drop-path
masks come the same way (`engine.step.DropPathMasks`).
"""
import os

import numpy as np
from mindspore import Tensor

from ..engine.data import TrainSamples, epoch_order, sample_batches, train_augmentation
from ..engine.step import DropPathMasks
from ..errors import UserError
from ..models.volo import TOKEN_STRIDE
from .label_maps import find_label_map, label_map_columns, label_map_path, missing_label_maps, read_label_map
from .loss import LabelMapsWithLoss, LabelsWithLoss, TokenLabelCrossEntropy
from .mix_token import MixTokenSampler

MAP_COLUMNS = ("image", "label", "cls_indices", "cls_scores", "token_indices", "token_scores")


class GroundTruthTokenLoss(LabelsWithLoss):
    """Batches (image, label): each token's target is the image's label."""

    def __init__(self, model, loss_fn, num_classes, mixer, drop_masks):
        super().__init__(model, loss_fn, num_classes)
        self.mixer, self.drop_masks = mixer, drop_masks

    def step_inputs(self, batch, epoch, step):
        images, labels = batch
        return (Tensor(images), Tensor(labels.astype(np.int32)), *self.mixer(epoch, step),
                self.drop_masks(epoch, step, len(images)))


class LabelMapTokenLoss(LabelMapsWithLoss):
    """Batches in MAP_COLUMNS order: the teacher's top-k per image and per token are the targets."""

    def __init__(self, model, loss_fn, num_classes, mixer, drop_masks, map_dir):
        super().__init__(model, loss_fn, num_classes)
        self.mixer, self.drop_masks = mixer, drop_masks
        self.map_dir = map_dir

    def step_inputs(self, batch, epoch, step):
        return (*(Tensor(column) for column in batch), *self.mixer(epoch, step),
                self.drop_masks(epoch, step, len(batch[0])))

    def check_inputs(self, split):
        """A map for every image of the training split (names only: no map is read)."""
        if not os.path.isdir(self.map_dir):
            raise UserError(f"token_label_dir not found: {self.map_dir}; make the maps with "
                            "`python -m mindcv_volo.relabel`")
        missing = missing_label_maps(self.map_dir, split.items)
        if missing:
            raise UserError(f"token_label_dir {self.map_dir} has no label map for {missing[0]} (expected "
                            f"{label_map_path(self.map_dir, missing[0])}); {len(missing)} of the {split.count} "
                            f"images of {split.folder} have none; make them with `python -m mindcv_volo.relabel`")

    def create_train_loader(self, split, epoch, steps, data, aug, num_classes, seed, runtime, first_step=0):
        order = epoch_order(split.count, data.batch_size * runtime.world, steps, seed, epoch, data.shuffle)
        source = TrainSamplesWithMaps(split, order, train_augmentation(aug), seed, epoch, self.map_dir, num_classes,
                                      aug.image_resize // TOKEN_STRIDE)
        return sample_batches(source, data.batch_size, runtime, first_step, data.num_parallel_workers,
                              data.skip_unreadable_images)


class TrainSamplesWithMaps(TrainSamples):
    """Training samples with their label-map targets (MAP_COLUMNS), the maps moved as their images (an
    unreadable image's replacement brings its own map)."""

    columns = MAP_COLUMNS

    def __init__(self, split, order, augmentation, seed, epoch, map_dir, num_classes, grid):
        super().__init__(split, order, augmentation, seed, epoch)
        self.map_dir, self.num_classes, self.grid = map_dir, num_classes, grid

    def extra_columns(self, relpath, geometry):
        indices, scores = read_label_map(find_label_map(self.map_dir, relpath))
        if indices.max() >= self.num_classes:
            raise UserError(f"label map of {relpath} has class {indices.max()} but num_classes is "
                            f"{self.num_classes}: the teacher's classes differ from the model's")
        return label_map_columns(indices, scores, geometry, self.grid)


def build_token_label_loss(model, loss_options, num_classes, seed, runtime):
    """The loss builder of `loss: token_label` (engine.step's seam): label maps when token_label_dir is set."""
    loss_fn = TokenLabelCrossEntropy(loss_options.cls_weight, loss_options.dense_weight, loss_options.label_smoothing)
    mixer = MixTokenSampler(seed, model.img_size // TOKEN_STRIDE, runtime.rank, loss_options.mix_token)
    drop_masks = DropPathMasks(model.drop_path_keep_probs(), seed, runtime.rank)
    if loss_options.token_label_dir:
        return LabelMapTokenLoss(model, loss_fn, num_classes, mixer, drop_masks, loss_options.token_label_dir)
    return GroundTruthTokenLoss(model, loss_fn, num_classes, mixer, drop_masks)
