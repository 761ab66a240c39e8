"""The model of a command: which variant, classes, architecture and preprocessing, from the options over
the checkpoint's own description; the model built from it.

A checkpoint written by train.py or the converter describes itself (`weights.checkpoint.read_description`):
validate.py, infer.py, export and relabel then need only --ckpt_path, and train.py fine-tunes the model it
describes. An option given on the command line wins over the description; a recipe's value is a default, and
the description wins over it. An option on the command line that asks for weights of other shapes than the
checkpoint's is one error line saying what the checkpoint holds and which options fit it.
"""
import inspect
import json
import logging
from pathlib import Path
from typing import NamedTuple, Optional

from ..errors import UserError
from ..models import ALIASES, ARCHS, VARIANTS, VOLO, create, data_config
from ..models.volo import NUM_CLASSES, check_arch_overrides, check_model_name
from ..weights.checkpoint import load_checkpoint_into, read_description
from .data import IMAGENET_MEAN_255, IMAGENET_STD_255, Preprocessing

logger = logging.getLogger("mindcv_volo")

IMAGENET_CLASSES = Path(__file__).resolve().parent.parent / "models" / "imagenet_classes.txt"
# VOLO constructor arguments that decide the weights' shapes; img_size is not one (pos_embed is resized).
SHAPING_ARGS = ("layers", "embed_dims", "num_heads", "mlp_ratio", "stem_hidden_dim", "qkv_bias")


def imagenet_class_names():
    """The 1,000 ImageNet-1k class names, in the official label order."""
    return tuple(IMAGENET_CLASSES.read_text(encoding="utf-8").splitlines())


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


def resolve(model_options, description=None, num_classes=None, class_names=None, given=frozenset()):
    """The spec from the `model` section and a checkpoint `description`: the options in `given` (set on the
    command line, Config.given) over the description, over the section's other values (a recipe's defaults);
    `num_classes` and `class_names` (a training set's folders) stand in where none says. Folder names are
    kept when num_classes is larger (the outputs past them are never trained)."""
    description = description or {}

    def pick(option):
        value, described = getattr(model_options, option), description.get(option)
        return value if value is not None and (option in given or described is None) else described

    name = pick("model")
    if name is None:
        raise UserError("which model? pass --model NAME (e.g. volo_d1_224), or --ckpt_path of a checkpoint written "
                        "by train.py or mindcv_volo.convert (it names its model)")
    check_model_name(name)
    described_overrides = description.get("arch_overrides")
    if described_overrides is None:
        overrides = model_options.arch_overrides
    else:
        overrides = {**described_overrides, **(model_options.arch_overrides if "arch_overrides" in given else {})}
    classes = pick("num_classes") or num_classes or NUM_CLASSES
    names = class_names
    if names is None and description.get("num_classes") == classes:
        names = description.get("class_names")  # labels of another class count (a fine-tune's start) do not apply
    return ModelSpec(name, int(classes), check_arch_overrides(overrides), model_options.in_channels,
                     tuple(names) if names else None)


def weight_shapes(name, arch_overrides):
    """The constructor arguments of model `name` with `arch_overrides` that decide its weights' shapes."""
    defaults = {key: p.default for key, p in inspect.signature(VOLO).parameters.items()}
    args = {**defaults, **ARCHS[VARIANTS[ALIASES.get(name, name)]["arch"]], **arch_overrides}
    return {key: list(args[key]) if isinstance(args[key], (list, tuple)) else args[key] for key in SHAPING_ARGS}


def check_fits(spec, description, path, given, same_classes=True):
    """A one-line UserError when the options `given` on the command line ask for weights of other shapes than
    the checkpoint at `path` holds (its `description`): what it holds, and which options fit it."""
    if not description.get("model"):
        return
    theirs = description.get("arch_overrides") or {}
    shapes_differ = weight_shapes(spec.name, spec.arch_overrides) != weight_shapes(description["model"], theirs)
    classes_differ = same_classes and spec.num_classes != description.get("num_classes")
    if not (shapes_differ or classes_differ):
        return
    asked = [option for option in (("model", "arch_overrides") if shapes_differ else ())
             + (("num_classes",) if classes_differ else ()) if option in given]
    fitting = [f"--model {description['model']}"] + ([f"--arch_overrides '{_flow(theirs)}'"] if theirs else [])
    if same_classes:
        fitting.append(f"--num_classes {description.get('num_classes')}")
    holds = (f"{description['model']}" + (f" with arch_overrides {_flow(theirs)}" if theirs else "")
             + f" ({description.get('num_classes')} classes)")
    flags = " ".join(f"--{option}" for option in asked)
    raise UserError(f"{path} holds {holds}, not what the command line's {flags} asks for: drop {flags} to use "
                    f"the checkpoint's model, or pass {' '.join(fitting)}")


def _flow(mapping):
    """A mapping as the one-line JSON a command line takes for a mapping option."""
    return json.dumps(mapping, separators=(", ", ": "))


def follow_checkpoint(config):
    """train.py's config with the model of a --ckpt_path that describes itself (its variant and
    arch_overrides, the command line's options over them, a recipe's in no way), and image_resize the
    model's img_size unless given on the command line (then the model is built at that size and pos_embed is
    resized). The heads follow the data: num_classes is not taken from the checkpoint."""
    path = config.model.ckpt_path
    description = read_description(path) if path else {}
    if not description.get("model"):
        return config
    given = config.given
    overrides = dict(description.get("arch_overrides") or {})
    if "image_resize" in given:
        overrides["img_size"] = config.augmentation.image_resize
    described = dict(description, arch_overrides=overrides)
    spec = resolve(config.model, described, given=given)
    check_fits(spec, description, path, given, same_classes=False)
    size = spec.arch_overrides.get("img_size", VARIANTS[ALIASES.get(spec.name, spec.name)]["img_size"])
    image_resize = config.augmentation.image_resize if "image_resize" in given else size
    logger.info("model from %s: %s, arch_overrides %s, image_resize %d", path, spec.name, _flow(spec.arch_overrides),
                image_resize)
    return config.replace(model=spec.name, arch_overrides=spec.arch_overrides, image_resize=image_resize)


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


def official_spec(model_options):
    """The spec of the options' model with the official weights: at 1000 classes its outputs are ImageNet-1k's
    classes, and named so (what infer.py, validate.py and an exported file print)."""
    spec = resolve(model_options)
    imagenet = imagenet_class_names()
    return spec._replace(class_names=imagenet) if spec.num_classes == len(imagenet) else spec


def load_model(model_options, path, ema=False, given=frozenset(), drop_rate=None, drop_path_rate=None, **extra):
    """(model with the weights of `path` loaded strictly, its spec, the checkpoint's description); with the
    `pretrained` option, the official weights of the options' model instead (no description). `given`: the
    options set on the command line (Config.given)."""
    if model_options.pretrained:
        if ema:
            raise UserError("the official weights have no EMA copy: drop --ema (it picks a checkpoint's EMA weights)")
        spec = official_spec(model_options)
        return build_model(spec, drop_rate, drop_path_rate, pretrained=True, **extra), spec, {}
    if not path:
        raise UserError("ckpt_path is not set; pass --ckpt_path FILE.ckpt (from train.py or mindcv_volo.convert), "
                        "or --pretrained True and --model NAME for the official weights")
    description = read_description(path)
    spec = resolve(model_options, description, given=given)
    check_fits(spec, description, path, given)
    model = build_model(spec, drop_rate, drop_path_rate, **extra)
    logger.info("loading %s%s", path, " (EMA weights)" if ema else "")
    load_checkpoint_into(model, path, ema=ema, hint=fit_hint(spec, path, description))
    return model, spec, description
