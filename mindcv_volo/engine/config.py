"""Options of every command: one table, MindCV's names and values, YAML defaults overridden by the command line.

`train.py -c recipe.yaml --lr 1e-3`: the table gives the built-in defaults, the YAML file replaces some of
them, and command-line options replace those. A value goes through the same conversion wherever it comes
from, so `resume: "False"` in YAML and `--resume false` on the command line mean the same thing.

The table holds every option of MindCV 0.3.0's config.py, with MindCV's meaning, so MindCV's own recipes
run unchanged; where this project had documented another name, both work (`aliases`). A MindCV option this
project cannot honour is refused with the reason (`UNSUPPORTED`), never accepted and ignored. Every command
(train, validate, infer, convert, export, relabel) reads its options from this table: one spelling per
concept everywhere (`--ckpt_path`, `--num_classes`, ...; `--num-classes` works too). Every mistake raises
`UserError` before anything runs.

A parsed configuration is a `Config`: one immutable section per part of a run (`config.data.batch_size`,
`config.optimizer.weight_decay`), so each part receives the section it needs and nothing writes back.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import json
import sys
from typing import Callable, NamedTuple, Optional

import yaml

from ..errors import UserError
from ..files import write_text
from .augment import RandAugment


class Bound(NamedTuple):
    """A range an option's value must lie in, checked once every source is read."""
    words: str  # what the value must be, as the error says it
    holds: Callable


AT_LEAST_1 = Bound("at least 1", lambda value: value >= 1)
NOT_NEGATIVE = Bound("0 (off) or more", lambda value: value >= 0)
POSITIVE = Bound("positive", lambda value: value > 0)


class Option(NamedTuple):
    name: str
    type: str  # see _EXPECTED; a trailing "?" also allows null
    default: object
    choices: Optional[tuple]
    help: str
    aliases: tuple = ()  # other names for the same option (MindCV's, or this project's earlier ones)
    bound: Optional[Bound] = None
    per_command: dict = {}  # a command's own default, in place of `default`


O = Option
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "pilcubic")

# Grouped by the part of a run that reads them; the group is also the section of the parsed Config.
SECTIONS = {
    "system": [
        O("config", "str", "", None, "YAML file whose keys set the defaults; command-line options override it"),
        O("mode", "mode", 0, (0, 1), "MindSpore execution mode: 0 (or graph) for GRAPH_MODE, 1 (or pynative)"),
        O("distribute", "bool", False, None,
          "data-parallel training: on by itself when started by msrun; without msrun one process trains"),
        O("device_target", "str", "auto", ("Ascend", "GPU", "CPU", "auto"), "device to run on; auto: what MindSpore has"),
        O("seed", "int", 42, None, "random seed (the same on every device)"),
        O("cpu_threads", "int?", None, None, "MindSpore's CPU kernel threads; null: this process's share of the "
          "cores (affinity, cgroup quota, divided among msrun's workers)"),
        O("log_interval", "int", 10, None, "log the training loss every this many steps", bound=AT_LEAST_1),
    ],
    "data": [
        O("dataset", "str", "imagenet", None, "imagenet (or ''): an ImageFolder data set, data_dir/<split>/<class>/<image>"),
        O("data_dir", "str", "", None, "dataset root folder, holding the train_split and val_split folders"),
        O("train_split", "str", "train", None, "sub-folder of data_dir used for training"),
        O("val_split", "str", "val", None, "sub-folder of data_dir used for validation"),
        O("split", "str?", None, None, "validate.py and relabel: sub-folder of data_dir to read; null: val_split",
          per_command={"relabel": "train"}),
        O("dataset_download", "bool", False, None, "MindCV: download mnist/cifar (not read here: must be false)"),
        O("num_parallel_workers", "int", 4, None, "data loading workers per device (at most the CPU cores)",
          bound=AT_LEAST_1),
        O("shuffle", "bool", True, None, "shuffle the training set (an order drawn from seed and epoch)"),
        O("num_samples", "int?", None, None, "training images per epoch, drawn from the whole set; null: all"),
        O("batch_size", "int", 128, None, "images per device per step", bound=AT_LEAST_1,
          per_command={"infer": 8, "export": 1, "relabel": 16}),
        O("drop_remainder", "bool", True, None, "drop the last incomplete training batch"),
        O("skip_unreadable_images", "bool", False, None,
          "train: a training image that cannot be read is replaced by the next readable one of the epoch's order "
          "(the same on every device and in a resumed run), named once and counted per epoch; off: the run "
          "stops with a checkpoint to resume from"),
        O("eval_shuffle", "bool", False, None, "MindCV: shuffle the evaluation data (changes no metric)"),
        O("aug_repeats", "int", 0, None, "MindCV: repeated augmentation (not supported: must be 0 or 1)"),
        O("dataset_sink_mode", "bool", False, None,
          "MindCV: feed batches through the device's data queue; the loop here feeds from the host (logged)"),
    ],
    "augmentation": [
        O("image_resize", "int", 224, None, "training crop size; the model's img_size (from a ckpt_path that describes "
          "its model: that model's, unless given on the command line)", bound=AT_LEAST_1),
        O("scale", "floats", [0.08, 1.0], None, "random-resized-crop area range"),
        O("ratio", "floats", [0.75, 1.333], None, "random-resized-crop aspect-ratio range"),
        O("hflip", "float", 0.5, None, "horizontal flip probability"),
        O("vflip", "float", 0.0, None, "vertical flip probability"),
        O("color_jitter", "jitter?", 0.4, None,
          "colour jitter: one strength, or [brightness, contrast, saturation(, hue)]; not applied with auto_augment"),
        O("interpolation", "str", "bicubic", INTERPOLATIONS, "resize interpolation"),
        O("auto_augment", "str?", None, None,
          "RandAugment policy with timm's rules, e.g. randaug-m9-mstd0.5-inc1 (m magnitude, n ops, mstd, mmax, "
          "inc, w); null: none. MindCV's other policies (autoaug, 3a, trivialaugwide, augmix) are refused: "
          "only RandAugment draws reproducibly per sample here"),
        O("aug_splits", "int", 0, None, "MindCV: AugMix splits for the JSD loss (not supported: must be 0)"),
        O("re_prob", "float", 0.0, None, "random erasing probability"),
        O("re_scale", "floats", [0.02, 0.33], None, "random erasing: area range of the erased box"),
        O("re_ratio", "floats", [0.3, 3.3], None, "random erasing: aspect-ratio range of the erased box"),
        O("re_value", "erase_value", 0, None, "random erasing: the fill value, or 'random'"),
        O("re_max_attempts", "int", 10, None, "random erasing: attempts to place the box"),
        O("mixup", "float", 0.0, None, "mixup alpha; 0: off"),
        O("cutmix", "float", 0.0, None, "cutmix alpha; 0: off"),
        O("cutmix_prob", "float", 1.0, None, "probability of applying mixup or cutmix to a batch", ("mixup_prob",)),
        O("mixup_switch_prob", "float", 0.5, None, "probability of cutmix instead of mixup when both are on"),
        O("crop_pct", "float?", None, None, "evaluation centre-crop fraction; null: the model's own"),
        # MindCV normalizes on the 0-255 pixel scale, so its recipes write mean/std that way.
        O("mean", "floats?", None, None, "per-channel mean, 0-255 pixel scale; null: the checkpoint's, else ImageNet's"),
        O("std", "floats?", None, None, "per-channel std, 0-255 pixel scale; null: the checkpoint's, else ImageNet's"),
    ],
    "model": [
        O("model", "str?", None, None, "model name, e.g. volo_d1_224; null: train volo_d1_224, others read the "
          "checkpoint's. A ckpt_path that describes its model wins over a recipe's model and arch_overrides, not "
          "over the command line", per_command={"train": "volo_d1_224"}),
        O("num_classes", "int?", None, None,
          "number of classes; null: the training set's class folders, or the checkpoint's"),
        O("in_channels", "int", 3, None, "input image channels"),
        O("arch_overrides", "mapping", {}, None,
          "VOLO constructor arguments replacing the variant's (layers, embed_dims, num_heads, mlp_ratio, "
          "stem_hidden_dim, img_size, qkv_bias, attn_drop_rate), e.g. '{layers: [1, 1, 1, 1], img_size: 32}'"),
        O("pretrained", "bool", False, None, "the official weights of the model option's variant, from the Hugging "
          "Face hub (timm's repository, or its local cache offline), converted once into MindCV's download "
          "folder; instead of ckpt_path"),
        O("ckpt_path", "str", "", None, "checkpoint to start from, evaluate, export or resume", ("ckpt",)),
        O("ema", "bool", False, None, "train: keep an exponential moving average; elsewhere: use a checkpoint's EMA weights"),
        O("drop_rate", "float?", None, None, "dropout after the position embedding; null: the model's (0)"),
        O("drop_path_rate", "float?", None, None, "stochastic depth rate of the last block; null: the model's (0)"),
        O("recompute", "bool", False, None, "recompute each block's activations in the backward pass (less memory)"),
    ],
    "optimizer": [
        O("opt", "str", "adamw", ("sgd", "momentum", "nesterov", "adam", "adamw", "lion", "nadam", "adan", "rmsprop",
                                  "adagrad", "lamb"), "optimizer (MindCV's create_optimizer)"),
        O("momentum", "float", 0.9, None, "momentum (sgd, momentum, rmsprop)"),
        O("use_nesterov", "bool", False, None, "Nesterov momentum (sgd, momentum, adam)"),
        O("weight_decay", "float", 0.05, None, "weight decay"),
        O("weight_decay_filter", "str", "norm_and_bias", ("disable", "auto", "norm_and_bias"),
          "parameters without weight decay: norm_and_bias (norms, biases, pos_embed, cls_token), auto (norms), "
          "disable (none)"),
        O("eps", "float?", None, None, "epsilon of adam, adamw, nadam, adan, lamb, rmsprop; null: the optimizer's"),
        O("layer_decay", "float?", None, None, "MindCV: layer-wise lr decay (not supported for VOLO: must be null)"),
    ],
    "scheduler": [
        O("epoch_size", "int", 300, None, "training epochs", bound=AT_LEAST_1),
        O("scheduler", "str", "cosine_decay",
          ("constant", "cosine_decay", "warmup_cosine_decay", "exponential_decay", "polynomial_decay", "step_decay",
           "multi_step_decay", "one_cycle", "cyclic"), "learning-rate schedule (MindCV's create_scheduler)"),
        O("lr", "float", 1.6e-3, None, "peak learning rate"),
        O("min_lr", "float", 1e-5, None, "final learning rate (cosine, one_cycle, cyclic)"),
        O("warmup_epochs", "int", 20, None, "epochs of linear warmup"),
        O("warmup_factor", "float?", None, None, "warmup starts at lr * warmup_factor (MindCV's name)"),
        O("warmup_lr", "float?", 1e-6, None, "warmup starts at this lr (when warmup_factor is null)"),
        O("cooldown_epochs", "int", 0, None, "epochs at min_lr after the decay (VOLO trains 10)"),
        O("decay_epochs", "int?", None, None,
          "cosine: decay length (null: what is left after warmup and cooldown); step: decay every this many epochs"),
        O("decay_rate", "float", 0.9, None, "step, multi-step, exponential: factor per decay; polynomial: power"),
        O("multi_step_decay_milestones", "ints", [30, 60, 90], None, "multi_step_decay: epochs at which lr decays"),
        O("lr_epoch_stair", "bool", False, None, "one lr per epoch instead of one per step"),
        O("warmup_prefix", "bool", True, None, "cosine: the decay starts after the warmup (MindCV); false: the "
          "warmup epochs count in the cosine's length, as the official (timm's warmup_prefix=False)"),
        O("num_cycles", "int", 1, None, "cosine_decay and cyclic: number of cycles"),
        O("cycle_decay", "float", 1.0, None, "cosine_decay: factor on the peak lr of each new cycle"),
    ],
    "train_step": [
        O("gradient_accumulation_steps", "int", 1, None, "steps whose gradients are summed per update",
          bound=AT_LEAST_1),
        O("clip_grad", "bool", False, None, "clip the global gradient norm"),
        O("clip_value", "float", 5.0, None, "gradient norm limit when clip_grad is on"),
        O("ema_decay", "float", 0.9999, None, "EMA decay"),
        O("amp_level", "str", "O0", ("O0", "O1", "O2", "O3"), "mixed-precision level (float16 on Ascend and GPU)"),
        O("val_amp_level", "str?", None, None, "validate.py's mixed-precision level; null: amp_level"),
        O("amp_cast_list", "str?", None, None, "MindCV: cells cast to float16 (not supported: amp_level decides)"),
        O("loss_scale_type", "str", "fixed", ("fixed", "dynamic", "auto"),
          "loss scaling; auto: dynamic where the run computes in float16 (O2/O3), fixed otherwise"),
        O("loss_scale", "float", 1024.0, None, "(initial) loss scale", bound=POSITIVE),
        O("drop_overflow_update", "bool", False, None, "skip the update of a step whose gradients overflow"),
    ],
    "loss": [
        O("loss", "str", "ce", ("ce", "bce", "asl_single_label", "asl_multi_label", "token_label"),
          "ce, bce, asl_*: MindCV's losses on the logits; token_label: VOLO's token labeling"),
        O("label_smoothing", "float", 0.0, None, "label smoothing"),
        O("aux_factor", "float", 0.0, None, "MindCV: weight of auxiliary logits (VOLO's aux head: loss token_label)"),
        O("reduction", "str", "mean", ("mean", "sum"), "reduction of the loss over the batch"),
        O("token_label_dir", "str", "", None, "folder of token-label maps (loss token_label)"),
        O("mix_token", "bool", False, None, "VOLO's MixToken augmentation (loss token_label)"),
        O("cls_weight", "float", 1.0, None, "weight of the class-token loss (loss token_label)"),
        O("dense_weight", "float", 0.5, None, "weight of the dense token loss (loss token_label)"),
    ],
    "checkpoint": [
        O("resume", "bool", False, None,
          "continue from ckpt_path, or the latest checkpoint in ckpt_save_dir (a weights-only ckpt_path is the "
          "run's starting point): weights, optimizer, EMA, loss scale, epoch and step (also mid-epoch)",
          ("resume_opt",)),
        O("overwrite", "bool", False, None,
          "a fresh run (no resume) in a ckpt_save_dir holding checkpoints of an earlier run of the same model "
          "removes them; off: the run refuses to start"),
        O("ckpt_save_dir", "str", "./ckpt", None, "folder for checkpoints, the log, metrics and the resolved config"),
        O("ckpt_save_interval", "int", 1, None, "save a checkpoint every this many epochs (and at the end)",
          bound=AT_LEAST_1),
        O("ckpt_save_policy", "str?", "latest_k", ("latest_k", "top_k"),
          "keep the latest checkpoints, or the best ones (needs val_while_train); null: keep all"),
        O("keep_checkpoint_max", "int", 10, None, "number of checkpoints kept", bound=AT_LEAST_1),
        O("ckpt_every_steps", "int", 0, None, "also save a resumable checkpoint in the middle of an epoch every this "
          "many steps of the run (at the first optimizer update from there); 0: off", bound=NOT_NEGATIVE),
        O("ckpt_every_minutes", "float", 0.0, None, "also save a resumable checkpoint in the middle of an epoch once "
          "this many minutes passed since the last checkpoint (rank 0's clock); 0: off", bound=NOT_NEGATIVE),
        O("val_while_train", "bool", False, None, "validate during training"),
        O("val_interval", "int", 1, None, "validate every this many epochs (and at the end) when val_while_train is on",
          bound=AT_LEAST_1),
    ],
    "modelarts": [
        O("enable_modelarts", "bool", False, None, "MindCV: run on ModelArts (not supported: must be false)"),
        O("multi_data_url", "str", "", None, "MindCV (ModelArts): not supported"),
        O("data_url", "str", "", None, "MindCV (ModelArts): not supported"),
        O("ckpt_url", "str", "", None, "MindCV (ModelArts): not supported"),
        O("train_url", "str", "", None, "MindCV (ModelArts): not supported"),
    ],
    "tools": [
        O("src", "str", "", None, "convert: the official .pth.tar/.pth or timm .safetensors file; `hub`: the official "
          "weights of --model from the Hugging Face hub"),
        O("dst", "str", "", None, "convert: the MindSpore checkpoint to write (.ckpt)"),
        O("out", "str", "", None, "export: the file to write (.mindir, .onnx); relabel: the folder for the maps"),
        O("file_format", "str", "MINDIR", ("MINDIR", "ONNX"), "export: the format", ("format",)),
        O("dynamic_batch", "bool", False, None, "export, ONNX: a symbolic batch axis instead of batch_size"),
        O("image_path", "str", "", None, "infer: an image, or a folder of images"),
        O("top_k", "int", 5, None, "infer: classes printed per image; relabel: classes kept per token",
          bound=AT_LEAST_1),
        O("image_size", "int?", None, None, "relabel: the teacher's input size; null: the model's"),
    ],
}
OPTIONS = {opt.name: opt for options in SECTIONS.values() for opt in options}
ALIASES = {alias: opt.name for opt in OPTIONS.values() for alias in opt.aliases}
SECTION_OF = {opt.name: section for section, options in SECTIONS.items() for opt in options}

# MindCV options (and values) this project cannot honour, with the reason: a recipe setting one is refused.
UNSUPPORTED = [
    ("dataset", lambda v: v.lower() not in ("imagenet", ""), "this project reads ImageFolder data sets "
     "(data_dir/<split>/<class>/<image>), not MindCV's built-in mnist/cifar readers; set dataset imagenet"),
    ("dataset_download", lambda v: v, "downloads MindCV's built-in mnist/cifar sets; this project reads "
                                      "ImageFolder folders: write the data as data_dir/<split>/<class>/<image>"),
    ("aug_repeats", lambda v: v > 1, "repeated augmentation is not supported; set aug_repeats 0"),
    ("aug_splits", lambda v: v > 0, "AugMix splits feed MindCV's JSD loss, which is not supported; set aug_splits 0"),
    ("layer_decay", lambda v: v is not None, "layer-wise lr decay is not supported for VOLO; set layer_decay null"),
    ("amp_cast_list", lambda v: v is not None,
     "per-cell float16 lists are not supported: amp_level decides (O2 keeps norms in float32); set it null"),
    ("aux_factor", lambda v: v != 0, "VOLO's aux head is trained by loss token_label (dense_weight); set aux_factor 0"),
    ("enable_modelarts", lambda v: v, "ModelArts is not supported; run where the data is"),
    ("multi_data_url", bool, "ModelArts is not supported"),
    ("data_url", bool, "ModelArts is not supported"),
    ("ckpt_url", bool, "ModelArts is not supported"),
    ("train_url", bool, "ModelArts is not supported"),
]

# Two ways to say one thing: a source (YAML file, command line) that sets one clears the other; with neither
# set, the second's table default stands.
EXCLUSIVE = [("warmup_factor", "warmup_lr")]

# Old spellings whose values read differently: name -> (option, type, translation).
LEGACY = {"filter_bias_and_bn": ("weight_decay_filter", "bool",
                                 lambda value: "norm_and_bias" if value else "disable")}

_RUN = tuple(name for name, section in SECTION_OF.items() if section != "tools")
_MODEL_IO = ("config", "model", "ckpt_path", "pretrained", "num_classes", "arch_overrides", "ema")
_DEVICE = ("mode", "device_target", "cpu_threads")


class Command(NamedTuple):
    description: str
    options: tuple  # accepted on the command line; a YAML file may set any option of the table
    aliases: dict = {}


COMMANDS = {
    "train": Command("Train VOLO (MindCV option names; YAML defaults, command-line overrides)", _RUN),
    "validate": Command("Evaluate a checkpoint; the last stdout line is one JSON object", _RUN),
    "infer": Command("Classify images with a checkpoint: one JSON line per image",
                     _MODEL_IO + _DEVICE + ("image_path", "top_k", "batch_size", "crop_pct", "interpolation",
                                            "mean", "std", "num_parallel_workers")),
    "convert": Command("Official VOLO weights (.pth.tar/.pth, timm .safetensors) -> MindSpore .ckpt, without torch",
                       _MODEL_IO + ("src", "dst")),
    "export": Command("Export a VOLO checkpoint for deployment (MindIR, or ONNX)",
                      _MODEL_IO + ("out", "file_format", "dynamic_batch", "batch_size")),
    "relabel": Command("Make token-label maps with a teacher checkpoint", _MODEL_IO + _DEVICE + (
        "data_dir", "split", "out", "top_k", "batch_size", "image_size", "log_interval", "num_parallel_workers"),
        {"teacher": "model"}),
}

_TRUE, _FALSE, _NULL = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"null", "none"}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number",
             "bool": "a boolean (true/false, yes/no, on/off, 1/0)", "floats": "a list of numbers",
             "ints": "a list of integers", "mapping": "a mapping of names to values, e.g. '{a: 1, b: [2, 3]}'",
             "jitter": "a number or a list of 3 or 4 numbers", "mode": "0, 1, graph or pynative",
             "erase_value": "a number or 'random'"}
_METAVAR = {"str": "STR", "int": "INT", "float": "FLOAT", "bool": "BOOL", "floats": "FLOAT", "ints": "INT",
            "mapping": "YAML", "jitter": "FLOAT", "mode": "MODE", "erase_value": "VALUE"}


class Config:
    """Parsed options: `config.<section>` is an immutable record of that section's options; `config.given`
    names the options set on the command line (a recipe's values are defaults: a checkpoint's own description
    of its model wins over them, not over these)."""

    def __init__(self, values, given=frozenset()):
        self._values = dict(values)
        self.given = frozenset(given)
        for section, options in SECTIONS.items():
            record = collections.namedtuple(section, [opt.name for opt in options])
            setattr(self, section, record(**{opt.name: values[opt.name] for opt in options}))

    def as_dict(self):
        """Every option's value by name, e.g. to save the run's resolved configuration."""
        return dict(self._values)

    def replace(self, **values):
        """A new Config with some values changed (for tests and for commands that fill in what is missing)."""
        return Config({**self._values, **values}, self.given)


def parse_config(argv: list[str] | None = None, command: str = "train") -> Config:
    """Resolve every option: table default (the command's own, where it has one) < YAML file (-c/--config) <
    command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    spec = COMMANDS[command]
    # A first pass reads only -c, so the YAML values are known before the full parser (and its --help) is built.
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default="")
    path = pre.parse_known_args(argv)[0].config
    values = {name: opt.per_command.get(command, opt.default) for name, opt in OPTIONS.items()}
    if path:
        _update(values, _read_source(_load_yaml(path), spec, lambda key: f"{key} in {path}"))

    given, extras = _build_parser(spec, values).parse_known_args(argv)
    if extras:
        flags = [arg.split("=", 1)[0] for arg in extras if arg.startswith("-")]
        if not flags:
            raise UserError(f"unexpected command-line arguments: {' '.join(extras)} (options are written --name value)")
        names = [_flag(name) for name in spec.options if name != "config"]
        hints = ", ".join(flag + _did_you_mean(flag, names, "{}") for flag in flags)
        raise UserError(f"unknown command-line option{'s' * (len(flags) > 1)}: {hints}; "
                        "run with --help to list the valid options")
    command_line = _read_source(vars(given), spec, lambda key: f"{_flag(key)} on the command line")
    _update(values, command_line)
    values["config"] = path  # a `config:` key inside a YAML file (e.g. a saved one) is not the file we read
    _check_supported(values)
    return Config(values, set(command_line) - {"config"})


def save_config(config: Config, path: str) -> None:
    """Write every option of `config` to `path` as YAML with sorted keys, atomically."""
    text = yaml.safe_dump(config.as_dict(), sort_keys=True, default_flow_style=False)
    try:
        write_text(path, text)
    except OSError as err:
        raise UserError(f"cannot write config {path}: {err.strerror or err}") from None


def _flag(name):
    return f"--{name}"


def _update(values, source):
    for first, second in EXCLUSIVE:
        if first in source and second in source and None not in (source[first], source[second]):
            raise UserError(f"{first} and {second} both say where warmup starts; give one of them")
        for name, other in ((first, second), (second, first)):
            if name in source:
                values[other] = None
    # The two start points: a source that names one drops the other's value from earlier sources (a recipe's
    # ckpt_path yields to --pretrained True); one source naming both is refused (`_check_supported`).
    if source.get("pretrained"):
        values["ckpt_path"] = OPTIONS["ckpt_path"].default
    if source.get("ckpt_path"):
        values["pretrained"] = False
    values.update(source)
    for first, second in EXCLUSIVE:
        if values[first] is None and values[second] is None:
            values[second] = OPTIONS[second].default


def _read_source(raw, spec, where):
    """{option: value} from one source (a YAML mapping, or the command line's given options), converted;
    aliases and legacy names resolved, and an option given twice under two names refused."""
    resolved, seen = {}, {}
    for key, value in raw.items():
        name = spec.aliases.get(key) or ALIASES.get(key) or key
        if key in LEGACY:
            name, kind, translate = LEGACY[key]
            value = translate(_convert(Option(key, kind, None, None, ""), value, where(key)))
        else:
            value = _convert(OPTIONS[name], value, where(key))
        if name in seen and seen[name] != key:
            raise UserError(f"{where(seen[name])} and {key} set the same option ({name}); give one of them")
        seen[name] = key
        resolved[name] = value
    return resolved


def _check_supported(values):
    for name, refused, why in UNSUPPORTED:
        if refused(values[name]):
            raise UserError(f"{name} {values[name]!r}: {why}")
    if values["loss"] == "token_label" and (values["mixup"] > 0 or values["cutmix"] > 0):
        raise UserError("loss token_label mixes with MixToken (mix_token) instead of mixup/cutmix; "
                        "set mixup 0 and cutmix 0")
    if values["scheduler"] in ("one_cycle", "cyclic") and values["warmup_epochs"] > 0:
        raise UserError(f"scheduler {values['scheduler']} rises from min_lr itself: set warmup_epochs 0")
    if values["pretrained"] and values["ckpt_path"]:
        raise UserError("pretrained and ckpt_path both say which weights to start from; give one of them")
    if values["auto_augment"]:
        RandAugment(values["auto_augment"])  # a policy it cannot read is a UserError naming the part
    for opt in OPTIONS.values():
        if opt.bound is not None and not opt.bound.holds(values[opt.name]):
            raise UserError(f"{opt.name} must be {opt.bound.words}, got {values[opt.name]}")


class _Parser(argparse.ArgumentParser):
    """argparse would print usage and exit; raise UserError so its mistakes read like every other one."""

    def error(self, message):
        raise UserError(f"{message}; run with --help to list the valid options")


def _build_parser(spec, values):
    # SUPPRESS: only options actually given appear in the result, so they can override the YAML values.
    parser = _Parser(description=spec.description, usage="%(prog)s [-c CONFIG.yaml] [--option value ...]",
                     allow_abbrev=False, argument_default=argparse.SUPPRESS)
    groups, command_aliases = {}, {}
    for alias, name in spec.aliases.items():
        command_aliases.setdefault(name, []).append(alias)
    for name in spec.options:
        opt = OPTIONS[name]
        section = SECTION_OF[name]
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        base = opt.type.rstrip("?")
        names = [name, *opt.aliases, *command_aliases.get(name, [])]
        flags = ["-c"] if name == "config" else []
        for each in names:  # snake_case as MindCV, and the dashed spelling
            flags += [f"--{each}"] + ([f"--{each.replace('_', '-')}"] if "_" in each else [])
        # Lists: `--scale 0.08 1.0` or `--scale 0.08,1.0`; booleans: a bare `--resume` means true.
        extra = ({"nargs": "+"} if base in ("floats", "ints", "jitter")
                 else {"nargs": "?", "const": "true"} if base == "bool" else {})
        metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else _METAVAR[base]
        text = f"{opt.help} (default: {json.dumps(values[name])})"
        group.add_argument(*flags, dest=name, metavar=metavar, help=text.replace("%", "%%"), **extra)
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
    known = set(OPTIONS) | set(ALIASES) | set(LEGACY)
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = ", ".join(f"'{key}'" + _did_you_mean(key, OPTIONS, "'{}'") for key in unknown)
        raise UserError(f"unknown key{'s' * (len(unknown) > 1)} in {path}: {hints}; "
                        "run with --help to list the valid keys")
    return data


def _did_you_mean(name, candidates, form):
    close = difflib.get_close_matches(name, list(candidates), n=3)
    return f" (did you mean {' or '.join(form.format(c) for c in close)}?)" if close else ""


def _convert(opt, value, source):
    """`value` (from YAML or the command line) as `opt.type`; UserError naming `source` if it does not fit."""
    base = opt.type.rstrip("?")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one word given to a list option on the command line: `--color_jitter null`
    try:
        if opt.type.endswith("?") and (value is None or isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        result = _CONVERTERS[base](value)
    except ValueError:
        expected = _EXPECTED[base] + " or null" * opt.type.endswith("?")
        raise UserError(f"{source} must be {expected}, got {value!r}") from None
    if opt.choices is not None:
        # MindCV reads loss and optimizer names in any case ('CE'); every choice here is read that way
        canonical = {str(choice).lower(): choice for choice in opt.choices}
        if str(result).lower() not in canonical:
            raise UserError(f"{source} must be one of {', '.join(map(str, opt.choices))}; got {value!r}")
        result = canonical[str(result).lower()]
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


def _numbers(kind):
    def convert(value):
        result = [_scalar(kind, item) for item in _items(value)]
        if not result:
            raise ValueError(value)
        return result

    return convert


def _jitter(value):
    """One strength (a number), or per-channel strengths [brightness, contrast, saturation(, hue)]."""
    items = _items(value)
    if len(items) == 1:
        return _scalar("float", items[0])
    if len(items) not in (3, 4):
        raise ValueError(value)
    return [_scalar("float", item) for item in items]


def _mode(value):
    words = {"graph": 0, "pynative": 1}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    return _scalar("int", value)


def _erase_value(value):
    if isinstance(value, str) and value.strip().lower() == "random":
        return "random"
    return _scalar("float", value)


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


_CONVERTERS = {"str": lambda v: _scalar("str", v), "int": lambda v: _scalar("int", v),
               "float": lambda v: _scalar("float", v), "bool": lambda v: _scalar("bool", v),
               "floats": _numbers("float"), "ints": _numbers("int"), "mapping": _mapping, "jitter": _jitter,
               "mode": _mode, "erase_value": _erase_value}
