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

from ..engine.data import epoch_order, order_seed, rank_slice
from ..errors import UserError
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

    def __init__(self, model, loss_fn, num_classes, mixer):
        super().__init__(model, loss_fn, num_classes)
        self.mixer = mixer

    def step_inputs(self, batch, epoch, step):
        return (*(Tensor(column) for column in batch), *self.mixer(epoch, step))

    @staticmethod
    def create_train_loader(args, split, epoch, steps, rank, world):
        return create_label_map_loader(args, split, epoch, steps, rank, world)


def build_token_label_loss(model, args):
    if args.mixup > 0 or args.cutmix > 0:
        raise UserError("loss token_label mixes with MixToken (mix_token) instead of mixup/cutmix; "
                        "set mixup 0 and cutmix 0")
    loss_fn = TokenLabelCrossEntropy(args.cls_weight, args.dense_weight, args.label_smoothing)
    mixer = MixTokenSampler(args.seed, model.img_size // TOKEN_STRIDE, args.rank_id, args.mix_token)
    cell = LabelMapTokenLoss if args.token_label_dir else GroundTruthTokenLoss
    return cell(model, loss_fn, args.num_classes, mixer)


def create_label_map_loader(args, split, epoch, steps, rank, world):
    """This rank's batches of one epoch with their label maps, in the same (seed, epoch) order as train.py's."""
    order = epoch_order(split.count, args.batch_size * world, steps, args.seed, epoch, args.shuffle)
    source = ImageFolderWithMaps(split.folder, args.token_label_dir, args.num_classes)
    # One worker reading and cropping: the crops then meet the generator in order (reproducible resume).
    indices = [int(i) for i in rank_slice(order, args.batch_size, rank, world)]
    dataset = ds.GeneratorDataset(source, column_names=source.columns, num_parallel_workers=1,
                                  sampler=ds.SubsetSampler(indices))
    crop = RandomResizedCropWithMap(args.image_resize, scale=args.scale, ratio=args.ratio,
                                    interpolation=args.interpolation, hflip=args.hflip,
                                    rng=np.random.default_rng([args.seed, epoch, rank]))
    dataset = dataset.map(operations=crop, input_columns=["image", "map_indices", "map_scores"],
                          output_columns=MAP_COLUMNS[:1] + MAP_COLUMNS[2:], num_parallel_workers=1)
    ds.config.set_seed(order_seed(args.seed, epoch) % (2 ** 32))  # RandAugment and erasing, per (seed, epoch)
    _, augment, finish = transforms_imagenet_train(
        image_resize=args.image_resize, auto_augment=args.auto_augment, color_jitter=args.color_jitter,
        interpolation=args.interpolation, mean=list(args.mean), std=list(args.std), re_prob=args.re_prob,
        separate=True)
    dataset = dataset.map(operations=augment + finish, input_columns=["image"], num_parallel_workers=1)
    return dataset.project(MAP_COLUMNS).batch(args.batch_size, drop_remainder=True)

