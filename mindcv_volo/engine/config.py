"""Training and validation options: one table, MindCV's option names, YAML defaults overridden by the command line.

`train.py -c recipe.yaml --lr 1e-3`: the table gives the built-in defaults, the YAML file replaces some of
them, and command-line options replace those. A value goes through the same conversion wherever it comes
from, so `resume: "False"` in YAML and `--resume false` on the command line mean the same thing. Every
mistake raises `UserError` before anything runs.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from typing import NamedTuple, Optional

import yaml

from ..errors import UserError


class Option(NamedTuple):
    name: str
    type: str  # "str", "int", "float", "bool", "floats" (a list) or "mapping"; a trailing "?" also allows null
    default: object
    choices: Optional[tuple]
    help: str


O = Option
# Grouped only for --help; names and meanings follow MindCV's config.py so its recipes read the same.
SECTIONS = {
    "system": [
        O("config", "str", "", None, "YAML file whose keys set the defaults; command-line options override it"),
        O("mode", "int", 0, (0, 1), "MindSpore execution mode: 0 graph, 1 pynative"),
        O("distribute", "bool", False, None, "data-parallel training on all devices (also on when started by msrun)"),
        O("device_target", "str", "auto", ("Ascend", "GPU", "CPU", "auto"),
          "device to run on; auto: what MindSpore has"),
        O("seed", "int", 42, None, "random seed"),
        O("log_interval", "int", 10, None, "log the training loss every this many steps"),
        O("val_while_train", "bool", False, None, "validate during training"),
        O("val_interval", "int", 1, None, "validate every this many epochs when val_while_train is on"),
    ],
    "dataset": [
        O("dataset", "str", "imagenet", None, "dataset name"),
        O("data_dir", "str", "", None, "dataset root folder, holding the train_split and val_split folders"),
        O("train_split", "str", "train", None, "sub-folder of data_dir used for training"),
        O("val_split", "str", "val", None, "sub-folder of data_dir used for validation"),
        O("split", "str?", None, None, "validate.py: sub-folder of data_dir to evaluate; null: val_split"),
        O("num_parallel_workers", "int", 4, None, "data loading workers per device"),
        O("shuffle", "bool", True, None, "shuffle the training set"),
        O("batch_size", "int", 128, None, "images per device per step"),
        O("drop_remainder", "bool", True, None, "drop the last incomplete training batch"),
    ],
    "augmentation": [
        O("image_resize", "int", 224, None, "training crop size"),
        O("scale", "floats", [0.08, 1.0], None, "random-resized-crop area range"),
        O("ratio", "floats", [0.75, 1.333], None, "random-resized-crop aspect-ratio range"),
        O("hflip", "float", 0.5, None, "horizontal flip probability"),
        O("vflip", "float", 0.0, None, "vertical flip probability"),
        O("color_jitter", "float?", 0.4, None, "color jitter strength; null: none"),
        O("interpolation", "str", "bicubic", ("bilinear", "bicubic", "nearest"), "resize interpolation"),
        O("auto_augment", "str?", None, None, "auto-augment policy, e.g. randaug-m9-mstd0.5-inc1; null: none"),
        O("re_prob", "float", 0.0, None, "random erasing probability"),
        O("mixup", "float", 0.0, None, "mixup alpha; 0: off"),
        O("cutmix", "float", 0.0, None, "cutmix alpha; 0: off"),
        O("mixup_prob", "float", 1.0, None, "probability of applying mixup or cutmix to a batch"),
        O("mixup_switch_prob", "float", 0.5, None, "probability of cutmix instead of mixup when both are on"),
        O("crop_pct", "float?", None, None, "validation center-crop fraction; null: the model's own"),
        # MindCV normalizes on the 0-255 pixel scale, so its recipes write mean/std that way.
        O("mean", "floats", [123.675, 116.28, 103.53], None, "per-channel mean on the 0-255 pixel scale"),
        O("std", "floats", [58.395, 57.12, 57.375], None, "per-channel std on the 0-255 pixel scale"),
    ],
    "model": [
        O("model", "str", "volo_d1_224", None, "model name"),
        O("num_classes", "int", 1000, None, "number of classes"),
        O("in_channels", "int", 3, None, "input image channels"),
        O("arch_overrides", "mapping", {}, None,
          "VOLO constructor arguments replacing the variant's (layers, embed_dims, num_heads, mlp_ratio, "
          "stem_hidden_dim, img_size), e.g. '{layers: [1, 1, 1, 1], img_size: 32}' for a small model"),
        O("pretrained", "bool", False, None, "start from the released pretrained weights"),
        O("ckpt_path", "str", "", None, "checkpoint to load (and to resume from with resume)"),
        O("drop_rate", "float", 0.0, None, "dropout rate before the classifier"),
        O("drop_path_rate", "float", 0.1, None, "stochastic depth rate"),
        O("ema", "bool", False, None, "keep an exponential moving average of the weights"),
        O("ema_decay", "float", 0.9999, None, "EMA decay"),
        O("amp_level", "str", "O0", ("O0", "O1", "O2", "O3"), "mixed-precision level"),
        O("dataset_sink_mode", "bool", False, None, "feed data through MindSpore's dataset sink"),
    ],
    "checkpoint": [
        O("resume", "bool", False, None, "resume training from ckpt_path: weights, optimizer state and epoch"),
        O("ckpt_save_dir", "str", "./ckpt", None, "folder for checkpoints and the resolved config"),
        O("ckpt_save_interval", "int", 1, None, "save a checkpoint every this many epochs"),
        O("ckpt_save_policy", "str", "latest_k", ("latest_k", "top_k"),
          "keep the latest checkpoints, or the best ones (needs val_while_train)"),
        O("keep_checkpoint_max", "int", 10, None, "number of checkpoints kept"),
    ],
    "loss": [
        O("loss", "str", "ce", ("ce", "token_label"), "ce: cross entropy; token_label: VOLO's token labeling"),
        O("label_smoothing", "float", 0.0, None, "label smoothing"),
        O("token_label_dir", "str", "", None, "folder of token-label maps (loss token_label)"),
        O("mix_token", "bool", False, None, "VOLO's MixToken augmentation (loss token_label)"),
        O("cls_weight", "float", 1.0, None, "weight of the class-token loss (loss token_label)"),
        O("dense_weight", "float", 0.5, None, "weight of the dense token loss (loss token_label)"),
    ],
    "optimizer": [
        O("opt", "str", "adamw", ("adamw", "adam", "sgd", "momentum", "lamb", "lion"), "optimizer"),
        O("lr", "float", 1.6e-3, None, "peak learning rate"),
        O("momentum", "float", 0.9, None, "momentum (sgd, momentum)"),
        O("use_nesterov", "bool", False, None, "Nesterov momentum (sgd, momentum)"),
        O("eps", "float", 1e-8, None, "epsilon of adaptive optimizers"),
        O("weight_decay", "float", 0.05, None, "weight decay"),
        O("filter_bias_and_bn", "bool", True, None, "no weight decay on biases and norm parameters"),
        O("loss_scale_type", "str", "fixed", ("fixed", "dynamic"), "loss scaling for mixed precision"),
        O("loss_scale", "float", 1024.0, None, "(initial) loss scale"),
        O("drop_overflow_update", "bool", False, None, "skip the update of a step whose gradients overflow"),
        O("clip_grad", "bool", False, None, "clip the gradient norm"),
        O("clip_value", "float", 5.0, None, "gradient norm limit when clip_grad is on"),
        O("gradient_accumulation_steps", "int", 1, None, "steps whose gradients are summed per update"),
    ],
    "scheduler": [
        O("epoch_size", "int", 300, None, "training epochs"),
        O("scheduler", "str", "cosine_decay", ("cosine_decay", "warmup_cosine_decay", "constant", "step_decay"),
          "learning-rate schedule"),
        O("min_lr", "float", 1e-5, None, "final learning rate"),
        O("warmup_epochs", "int", 20, None, "epochs of linear warmup"),
        O("warmup_lr", "float", 1e-6, None, "learning rate at the start of warmup"),
        O("cooldown_epochs", "int", 0, None, "epochs at min_lr after the decay (VOLO trains 10)"),
        O("decay_epochs", "int?", None, None,
          "cosine: decay length (null: what is left after warmup and cooldown); step: decay every this many epochs"),
        O("decay_rate", "float", 0.9, None, "step_decay: factor applied every decay_epochs"),
    ],
}
OPTIONS = {opt.name: opt for options in SECTIONS.values() for opt in options}

_TRUE, _FALSE, _NULL = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"null", "none"}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number",
             "bool": "a boolean (true/false, yes/no, on/off, 1/0)", "floats": "a list of numbers",
             "mapping": "a mapping of names to values, e.g. '{a: 1, b: [2, 3]}'"}
_METAVAR = {"str": "STR", "int": "INT", "float": "FLOAT", "bool": "BOOL", "floats": "FLOAT", "mapping": "YAML"}


def parse_config(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """Resolve every option of the table: table default < YAML file (-c/--config) < command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # A first pass reads only -c, so the YAML values are known before the full parser (and its --help) is built.
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default="")
    path = pre.parse_known_args(argv)[0].config
    values = {name: opt.default for name, opt in OPTIONS.items()}
    if path:
        for key, raw in _load_yaml(path).items():
            values[key] = _convert(OPTIONS[key], raw, f"{key} in {path}")

    given, extras = _build_parser(description, values).parse_known_args(argv)
    if extras:
        flags = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-")]
        if not flags:
            raise UserError(f"unexpected command-line arguments: {' '.join(extras)} (options are written --name value)")
        hints = ", ".join(flag + _did_you_mean(flag.lstrip("-"), "--{}") for flag in flags)
        raise UserError(f"unknown command-line option{'s' * (len(flags) > 1)}: {hints}; "
                        "run with --help to list the valid options")
    for key, raw in vars(given).items():
        values[key] = _convert(OPTIONS[key], raw, f"--{key} on the command line")
    values["config"] = path  # a `config:` key inside a YAML file (e.g. a saved one) is not the file we read
    return argparse.Namespace(**values)


def save_config(args, path: str) -> None:
    """Write the table's options of `args` (Namespace or dict) to `path` as YAML with sorted keys, atomically."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    # Only table options: attributes a script adds at run time would make the file fail to load again.
    text = yaml.safe_dump({k: v for k, v in values.items() if k in OPTIONS}, sort_keys=True, default_flow_style=False)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # Same folder, so os.replace is a rename: a crash leaves the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a config is meant to be read by others
        os.replace(tmp, path)
    except OSError as err:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot write config {path}: {err.strerror or err}") from None


class _Parser(argparse.ArgumentParser):
    """argparse would print usage and exit; raise UserError so its mistakes read like every other one."""

    def error(self, message):
        raise UserError(f"{message}; run with --help to list the valid options")


def _build_parser(description, values):
    # SUPPRESS: only options actually given appear in the result, so they can override the YAML values.
    parser = _Parser(description=description, usage="%(prog)s [-c CONFIG.yaml] [--option value ...]",
                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for section, options in SECTIONS.items():
        group = parser.add_argument_group(section)
        for opt in options:
            base = opt.type.rstrip("?")
            flags = ["-c", "--config"] if opt.name == "config" else [f"--{opt.name}"]
            # Lists: `--scale 0.08 1.0` or `--scale 0.08,1.0`; booleans: a bare `--resume` means true.
            extra = {"nargs": "+"} if base == "floats" else {"nargs": "?", "const": "true"} if base == "bool" else {}
            metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else _METAVAR[base]
            text = f"{opt.help} (default: {json.dumps(values[opt.name])})"
            group.add_argument(*flags, metavar=metavar, help=text.replace("%", "%%"), **extra)
    return parser


def _load_yaml(path):
    """The mapping in the YAML file at `path`, every key a valid option name."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"invalid YAML in {path}{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:  # empty, or only comments
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option names to values (`key: value` lines), "
                        f"not a {type(data).__name__}")
    data = {str(key): value for key, value in data.items()}
    unknown = [key for key in data if key not in OPTIONS]
    if unknown:
        hints = ", ".join(f"'{key}'" + _did_you_mean(key, "'{}'") for key in unknown)
        raise UserError(f"unknown key{'s' * (len(unknown) > 1)} in {path}: {hints}; "
                        "run with --help to list the valid keys")
    return data


def _did_you_mean(name, form):
    close = difflib.get_close_matches(name, OPTIONS, n=3)
    return f" (did you mean {' or '.join(form.format(c) for c in close)}?)" if close else ""


def _convert(opt, value, source):
    """`value` (from YAML or the command line) as `opt.type`; UserError naming `source` if it does not fit."""
    base = opt.type.rstrip("?")
    try:
        if opt.type.endswith("?") and (value is None or isinstance(value, str) and value.strip().lower() in _NULL):
            result = None
        elif base == "floats":
            result = [_scalar("float", item) for item in _items(value)]
            if not result:
                raise ValueError
        elif base == "mapping":
            result = _mapping(value)
        else:
            result = _scalar(base, value)
    except ValueError:
        expected = _EXPECTED[base] + " or null" * opt.type.endswith("?")
        raise UserError(f"{source} must be {expected}, got {value!r}") from None
    if opt.choices is not None and result is not None and result not in opt.choices:
        raise UserError(f"{source} must be one of {', '.join(map(str, opt.choices))}; got {value!r}")
    return result


def _scalar(base, value):
    # Strings are parsed as on the command line: YAML users quote values, and PyYAML reads `1e-5` as a string.
    if isinstance(value, bool):
        if base == "bool":
            return value
    elif base == "bool":
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif base == "int" and isinstance(value, (int, str)):
        return int(value)
    elif base == "float" and isinstance(value, (int, float, str)):
        return float(value)
    elif base == "str" and isinstance(value, str):
        return value
    raise ValueError(value)


def _items(value):
    """The items of a list written as a YAML list, as command-line words, or as one "a,b" or "[a, b]" string."""
    items = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str):
            items += item.translate(str.maketrans(",[]()", "     ")).split()
        else:
            items.append(item)
    return items


def _mapping(value):
    """A YAML mapping, or its text (`{layers: [1, 1, 1, 1]}` on the command line), as a dict with str keys."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            raise ValueError(value) from None
    if not isinstance(value, dict):
        raise ValueError(value)
    return {str(key): item for key, item in value.items()}
