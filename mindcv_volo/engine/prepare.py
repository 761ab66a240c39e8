"""What train.py checks and builds before its compiled steps: the options that change nothing here, the data
splits, the steps of an epoch, the model to train (its start point loaded)."""
import logging
import os

from ..errors import UserError
from ..weights.checkpoint import load_checkpoint_into
from .data import SplitInfo, train_steps
from .model_spec import build_model

logger = logging.getLogger("mindcv_volo")


def log_options_that_do_not_apply(config):
    """One line for each option a recipe sets that changes nothing on this run."""
    if config.data.dataset_sink_mode:
        logger.info("dataset_sink_mode: the loop feeds each step from the host (its inputs are drawn per step "
                    "on the host), on every device")
    if config.augmentation.auto_augment and config.augmentation.color_jitter is not None:
        logger.info("color_jitter is not applied with auto_augment (as MindCV's training transforms)")


def warn_what_is_not_reproduced(model_options):
    """One warning for the randomness this project cannot draw on the host (see README, Reproducibility)."""
    rates = {"drop_rate": model_options.drop_rate or 0.0,
             "attn_drop_rate": model_options.arch_overrides.get("attn_drop_rate") or 0.0}
    on = [f"{name} {rate:g}" for name, rate in rates.items() if rate > 0]
    if on:
        logger.warning("warning: %s: dropout draws inside the graph (MindSpore's nn.Dropout), so a resumed run does "
                       "not redraw it exactly and devices do not reproduce it from the seed", ", ".join(on))


def open_splits(data_options, val_while_train):
    """(training SplitInfo, validation SplitInfo or None: without its folder the run ends without an
    evaluation, unless val_while_train asks for one)."""
    data = data_options
    train = SplitInfo(data.data_dir, data.train_split)
    folder = os.path.join(data.data_dir, data.val_split)
    if not os.path.isdir(folder):
        if val_while_train:
            raise UserError(f"val_while_train is on but the split folder is missing: {folder}")
        logger.info("no validation split at %s: the run ends without an evaluation", folder)
        return train, None
    val = SplitInfo(data.data_dir, data.val_split)
    train.check_same_classes(val)
    return train, val


def epoch_steps(data_options, accumulation, train_split, world):
    """(global batch, micro-steps per epoch, optimizer updates per epoch) on `world` devices."""
    data = data_options
    global_batch = data.batch_size * world
    per_update = global_batch * accumulation
    images = min(train_split.count, data.num_samples or train_split.count)
    if images < per_update:
        raise UserError(f"batch_size {data.batch_size} x {world} device(s) x {accumulation} accumulation step(s) = "
                        f"{per_update} images per update is more than the {images} images an epoch of "
                        f"{train_split.folder} has; lower batch_size")
    steps = train_steps(images, global_batch, accumulation, data.drop_remainder)
    return global_batch, steps, steps // accumulation


def build_train_model(model_options, spec, image_resize, resume):
    """The model of `spec` with the section's drop rates and recompute, at the img_size `image_resize` says,
    with the official weights (`pretrained`) or ckpt_path's (adapted: fine-tuning) as its start point unless the
    run resumes."""
    options = model_options
    model = build_model(spec, options.drop_rate, options.drop_path_rate, pretrained=options.pretrained)
    if options.recompute:
        try:
            model.set_grad_checkpointing(True)
        except RuntimeError as err:
            raise UserError(f"recompute: {err}") from None
    if model.img_size != image_resize:
        raise UserError(f"image_resize {image_resize} differs from the model's img_size {model.img_size}; set "
                        f"image_resize to {model.img_size} (or img_size in arch_overrides)")
    if options.ckpt_path and not resume:
        logger.info("starting from %s", options.ckpt_path)
        load_checkpoint_into(model, options.ckpt_path, adapt=True)  # fine-tuning start point
    return model
