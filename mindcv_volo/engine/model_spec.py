"""The model of a command: which variant, classes, architecture and preprocessing, from the options over
the checkpoint's own description; the model built from it.

A checkpoint written by train.py or the converter describes itself (`weights.checkpoint.read_description`):
validate.py, infer.py, export and relabel then need only --ckpt_path, and an option given on the command
line or in a recipe still wins over the description.
"""
import logging
from typing import NamedTuple, Optional

from ..errors import UserError
from ..models import MODEL_NAMES, create, data_config
from ..models.volo import NUM_CLASSES, check_arch_overrides
from ..weights.checkpoint import load_checkpoint_into, read_description
from .data import IMAGENET_MEAN_255, IMAGENET_STD_255, Preprocessing

logger = logging.getLogger("mindcv_volo")


class ModelSpec(NamedTuple):
    """What rebuilds and labels a model; saved with its checkpoints as their description."""
    name: str
    num_classes: int
    arch_overrides: dict
    in_channels: int = 3
    class_names: Optional[tuple] = None

    def describe(self, preprocessing):
        return {"model": self.name, "num_classes": self.num_classes, "arch_overrides": self.arch_overrides,
                "in_channels": self.in_channels, "class_names": list(self.class_names or []) or None,
                "preprocessing": preprocessing._asdict()}


def resolve(model_options, description=None, num_classes=None, class_names=None):
    """The spec from the `model` section over a checkpoint `description`; `num_classes` and `class_names`
    (from a training set) stand in where neither says."""
    description = description or {}
    name = model_options.model or description.get("model")
    if name is None:
        raise UserError("which model? pass --model NAME (e.g. volo_d1_224), or --ckpt_path of a checkpoint written "
                        "by train.py or mindcv_volo.convert (it names its model)")
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODEL_NAMES))}")
    overrides = model_options.arch_overrides or description.get("arch_overrides") or {}
    classes = (model_options.num_classes or description.get("num_classes") or num_classes
               or NUM_CLASSES)
    names = class_names if class_names is not None else description.get("class_names")
    if names is not None and len(names) != classes:
        names = None  # labels of another class count (a fine-tune's start point) do not apply
    return ModelSpec(name, int(classes), check_arch_overrides(overrides), model_options.in_channels,
                     tuple(names) if names else None)


def build_model(spec, drop_rate=None, drop_path_rate=None, **extra):
    """The registered model of `spec`; None rates leave the model's own. `pretrained=True` (in `extra`) loads
    the official weights (`weights.hub`)."""
    try:
        return create(spec.name, num_classes=spec.num_classes, in_channels=spec.in_channels, drop_rate=drop_rate,
                      drop_path_rate=drop_path_rate, **spec.arch_overrides, **extra)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot build {spec.name} with arch_overrides {spec.arch_overrides}: {err}") from None


def preprocessing(model, spec, aug_options, description=None):
    """Evaluation preprocessing: the options' crop_pct, mean, std over the description's over the variant's."""
    described = (description or {}).get("preprocessing") or {}
    variant = data_config(spec.name)

    def pick(option, key, fallback):
        value = option if option is not None else described.get(key)
        return fallback if value is None else value

    return Preprocessing(size=model.img_size, crop_pct=pick(aug_options.crop_pct, "crop_pct", variant["crop_pct"]),
                         interpolation=described.get("interpolation") or variant["interpolation"],
                         mean=tuple(pick(aug_options.mean, "mean", IMAGENET_MEAN_255)),
                         std=tuple(pick(aug_options.std, "std", IMAGENET_STD_255)))


def fit_hint(spec, path, description):
    """What to do when the checkpoint at `path` does not fit the model of `spec`."""
    if description:
        theirs = (f"{description.get('model')}, {description.get('num_classes')} classes"
                  + (f", arch_overrides {description.get('arch_overrides')}" if description.get("arch_overrides") else ""))
        return (f"the checkpoint describes {theirs}, the options ask for {spec.name}, {spec.num_classes} classes: "
                "drop --model/--num_classes/--arch_overrides to use the checkpoint's")
    return ("the checkpoint does not describe its model: pass the --model, --num_classes and --arch_overrides "
            "it was trained with (train.py saves them in config.yaml beside it: -c that file)")


def load_model(model_options, path, ema=False, drop_rate=None, drop_path_rate=None, **extra):
    """(model with the weights of `path` loaded strictly, its spec, the checkpoint's description); with the
    `pretrained` option, the official weights of the options' model instead (no description)."""
    if model_options.pretrained:
        if ema:
            raise UserError("the official weights have no EMA copy: drop --ema (it picks a checkpoint's EMA weights)")
        spec = resolve(model_options)
        return build_model(spec, drop_rate, drop_path_rate, pretrained=True, **extra), spec, {}
    if not path:
        raise UserError("ckpt_path is not set; pass --ckpt_path FILE.ckpt (from train.py or mindcv_volo.convert), "
                        "or --pretrained True and --model NAME for the official weights")
    description = read_description(path)
    spec = resolve(model_options, description)
    model = build_model(spec, drop_rate, drop_path_rate, **extra)
    logger.info("loading %s%s", path, " (EMA weights)" if ema else "")
    load_checkpoint_into(model, path, ema=ema, hint=fit_hint(spec, path, description))
    return model, spec, description
