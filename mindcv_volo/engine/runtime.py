"""Run-time setup shared by train.py and validate.py: device, execution mode, msrun, logging, the model."""
import logging
import os
import sys

import mindspore as ms

from ..errors import UserError
from ..models import create, data_config
from ..weights.checkpoint import load_checkpoint_into

logger = logging.getLogger("mindcv_volo")

DEVICES = ("Ascend", "GPU", "CPU")
# Arguments of the VOLO constructor a recipe may replace through `arch_overrides`.
ARCH_KEYS = ("layers", "embed_dims", "num_heads", "mlp_ratio", "stem_hidden_dim", "img_size", "qkv_bias",
             "attn_drop_rate")
_LISTS = ("layers", "embed_dims", "num_heads")


def launched_by_msrun():
    """msrun (and mpirun-style launchers) give every worker these variables; RANK_SIZE > 1 means data parallel."""
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1) > 1


def resolve_device(target):
    if target != "auto":
        if not ms.hal.is_available(target):
            present = [d for d in DEVICES if ms.hal.is_available(d)]
            raise UserError(f"device_target {target} is not available on this machine (available: "
                            f"{', '.join(present)}); use --device_target auto")
        return target
    return next(d for d in DEVICES if ms.hal.is_available(d))


def setup_runtime(args):
    """Execution mode, device and (under msrun) data parallelism; returns (rank, world size)."""
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == 0 else ms.PYNATIVE_MODE)
    device = resolve_device(args.device_target)
    ms.set_device(device)
    args.device = device
    rank, world = 0, 1
    if args.distribute or launched_by_msrun():
        if not launched_by_msrun():
            raise UserError("distribute is on but this process was not started by msrun; run "
                            "`msrun --worker_num N ... python train.py ...` or drop --distribute")
        from mindspore.communication import get_group_size, get_rank, init

        init()
        rank, world = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=world)
    ms.set_seed(args.seed)  # same seed on every rank: identical initial weights
    args.rank_id, args.device_num = rank, world
    return rank, world


def setup_logging(rank):
    """Rank 0 logs INFO to stdout; other ranks only warnings and errors."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(stream)
    return logger


def add_log_file(path):
    """Also log to `path` (appending: a resumed run continues the file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


def arch_overrides(args):
    """`arch_overrides` checked: known keys, lists of four integers where the constructor takes them."""
    overrides = dict(args.arch_overrides or {})
    unknown = sorted(set(overrides) - set(ARCH_KEYS))
    if unknown:
        raise UserError(f"arch_overrides: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                        f"valid keys: {', '.join(ARCH_KEYS)}")
    for key in _LISTS:
        value = overrides.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 4
                                      and all(isinstance(v, int) and v > 0 for v in value)):
            raise UserError(f"arch_overrides: {key} must be a list of four positive integers, got {value!r}")
    return overrides


def build_model(args, **extra):
    """The registered model `args.model` with the run's class count, drop rates and arch_overrides."""
    overrides = arch_overrides(args)
    try:
        return create(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                      drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate,
                      pretrained=args.pretrained, **overrides, **extra)
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot build {args.model} with arch_overrides {overrides}: {err}") from None


def amp_level(args):
    """The AMP level the run uses: the recipe's on accelerators, O0 on CPU.

    On CPU float16 is no faster than float32, and the model's CPU paths (channels-last convolutions
    called as methods) do not pass through the cells' float16 casts, so a recipe written for Ascend or
    GPU runs there in float32, and says so.
    """
    if args.amp_level != "O0" and args.device == "CPU":
        logger.info("amp_level %s is for accelerators: on CPU the run computes in float32 (O0)", args.amp_level)
        return "O0"
    return args.amp_level


def eval_preprocessing(args, model):
    """(image size, crop_pct, interpolation) of evaluation: the model's own, crop_pct overridable."""
    config = data_config(args.model)
    crop_pct = args.crop_pct if args.crop_pct is not None else config["crop_pct"]
    return model.img_size, crop_pct, config["interpolation"]


def load_weights(model, path, ema=False, adapt=False):
    logger.info("loading %s%s", path, " (EMA weights)" if ema else "")
    return load_checkpoint_into(model, path, ema=ema, adapt=adapt)
