"""Evaluation: top-1/top-5/loss of a model on an ImageFolder split, shared by validate.py and train.py.

    python validate.py --ckpt_path X --data_dir D [--split val] [--ema True]
    python validate.py -c CONFIG.yaml --ckpt_path X

Preprocessing is the model's own (the checkpoint's description, or the variant's: resize to
size / crop_pct, bicubic, center crop, mean/std). The logits come from one compiled graph (a short last
batch is padded and the padding ignored); the metrics are computed on the host in float64 per image.
Under msrun each rank evaluates every world-th image and the per-image results are gathered, so every
rank returns exactly the numbers of a single process on the whole split (the loss is an exactly rounded
sum, whatever the order). validate.py's last two lines on stdout are the metrics as MindCV's validate.py
prints them, `{'Top_1_Accuracy': ..., 'Top_5_Accuracy': ..., 'loss': ...}` (its scripts parse that line),
then one JSON object: {"model", "top1", "top5", "loss", "num_samples", "img_per_s"} (top1/top5 as fractions).
"""
import json
import logging
import math
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..errors import UserError
from ..models.volo import NUM_STAGES
from .data import SplitInfo, create_eval_loader, iterate
from .model_spec import load_model, preprocessing
from .runtime import CompiledCollective, amp_level, compile_before_first_run, describe, progress, setup_runtime
from .step import apply_amp

logger = logging.getLogger("mindcv_volo")

# Activation bytes per image of inference, per token-channel of the blocks; calibrated on volo_d1_224
# (~95 MB per image measured on CPU, 1.65 M token-channels).
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 58
CPU_MEMORY_SHARE = 0.5  # of the memory available, for evaluation batches on CPU


class EvalNetwork(nn.Cell):
    """The model in inference mode, float32 logits."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, images):
        return self.model(images).astype(ms.float32)


def image_metrics(logits, labels, topk=5):
    """Per image: (top-1 hit, top-k hit, cross entropy), in float64 on the host."""
    logits = logits.astype(np.float64)
    labels = labels.astype(np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    k = min(topk, logits.shape[1])
    best = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return best[:, 0] == labels, (best == labels[:, None]).any(axis=1), -log_probs[np.arange(len(labels)), labels]


def _gather_results(hits1, hits5, losses, world):
    """Every device's per-image results, as (hits1, hits5, losses) of the whole split.

    The losses travel as the two int32 halves of their float64 bits, so nothing is rounded on the way;
    ranks holding fewer images pad with rows marked absent.
    """
    if world == 1:
        return hits1, hits5, losses
    all_gather = CompiledCollective(ops.AllGather())
    count = np.array([[len(losses)]], np.int32)
    most = int(all_gather(Tensor(count)).asnumpy().max())
    rows = np.zeros((most, 5), np.int32)
    rows[:len(losses), 0] = 1  # present
    rows[:len(losses), 1] = hits1
    rows[:len(losses), 2] = hits5
    rows[:len(losses), 3:] = np.ascontiguousarray(losses, np.float64).view(np.int32).reshape(-1, 2)
    gathered = all_gather(Tensor(rows)).asnumpy()
    gathered = gathered[gathered[:, 0] == 1]
    return gathered[:, 1], gathered[:, 2], np.ascontiguousarray(gathered[:, 3:]).view(np.float64).reshape(-1)


def evaluate(network, loader, batch_size, world=1):
    """{"top1", "top5", "loss", "num_samples", "img_per_s"} of `network` (an EvalNetwork) over `loader`,
    the whole split's under msrun."""
    network.set_train(False)
    hits1, hits5, losses = [], [], []
    start = time.time()
    for images, labels in progress(iterate(loader), loader.get_dataset_size(), "eval batches"):
        count = len(labels)
        if count < batch_size:  # one graph for every batch: pad the last one, ignore the padding
            images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        images = Tensor(images)
        compile_before_first_run(network, images)
        for results, part in zip((hits1, hits5, losses), image_metrics(network(images).asnumpy()[:count], labels)):
            results.append(part)
    elapsed = time.time() - start
    if not losses:
        raise UserError("no image was evaluated")
    hits1, hits5, losses = _gather_results(*(np.concatenate(r) for r in (hits1, hits5, losses)), world)
    samples = len(losses)
    return {"top1": int(hits1.sum()) / samples, "top5": int(hits5.sum()) / samples,
            "loss": math.fsum(losses) / samples, "num_samples": samples,
            "img_per_s": samples / max(elapsed, 1e-9)}


def result_line(model_name, metrics):
    """The JSON line train.py and validate.py end with."""
    fields = {"model": model_name, "top1": round(float(metrics["top1"]), 6), "top5": round(float(metrics["top5"]), 6),
              "loss": round(float(metrics["loss"]), 6), "num_samples": int(metrics["num_samples"]),
              "img_per_s": round(float(metrics["img_per_s"]), 2)}
    return json.dumps(fields)


def mindcv_metrics(metrics, num_classes):
    """The metrics under MindCV's names, as its validate.py has them: Top_5_Accuracy only for 5 classes or more."""
    named = {"Top_1_Accuracy": float(metrics["top1"])}
    if num_classes >= 5:
        named["Top_5_Accuracy"] = float(metrics["top5"])
    named["loss"] = float(metrics["loss"])
    return named


def cpu_batch_size(model, requested):
    """The largest batch up to `requested` whose activations take at most half the available memory (an
    estimate from the model's token-channels; a 128-image batch of volo_d1_224 peaked at 15 GB on CPU)."""
    tokens = (model.img_size // 8) ** 2  # stage 0 at stride 8, the transformer stages at stride 16
    stages = [model.stage(index) for index in range(NUM_STAGES)]
    per_image = ACTIVATION_BYTES_PER_TOKEN_CHANNEL * sum(
        len(stage) * (tokens if index == 0 else tokens // 4) * stage[0].norm1.gamma.shape[0]
        for index, stage in enumerate(stages))
    try:
        available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo", encoding="ascii")
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return requested
    return max(1, min(requested, int(available * CPU_MEMORY_SHARE // per_image)))


def validate(config):
    """validate.py: evaluate `ckpt_path` on `data_dir/split`; returns the JSON line (printed by rank 0)."""
    runtime = setup_runtime(config.system)
    data = config.data
    split = SplitInfo(data.data_dir, data.split or data.val_split)
    model, spec, description = load_model(config.model, config.model.ckpt_path, ema=config.model.ema,
                                          given=config.given)
    if spec.num_classes < len(split.classes):
        raise UserError(f"{split.folder} has {len(split.classes)} classes but the model has {spec.num_classes}; "
                        "a checkpoint of this data's classes is needed")
    if spec.num_classes != len(split.classes):
        logger.warning("warning: the model has %d classes, %s has %d: class folder i is scored as class i",
                       spec.num_classes, split.folder, len(split.classes))
    batch_size = data.batch_size
    if runtime.device == "CPU":
        batch_size = cpu_batch_size(model, data.batch_size)
        if batch_size < data.batch_size:
            logger.info("batch %d instead of %d: what fits half the available memory on this CPU", batch_size,
                        data.batch_size)
    level = amp_level(config.train_step.val_amp_level or config.train_step.amp_level, model.backend)
    network = EvalNetwork(apply_amp(model, level))
    prep = preprocessing(model, spec, config.augmentation, description)
    logger.info("evaluating %s on %s: %d images, %d px (crop_pct %s); %s, backend %s", spec.name, split.folder,
                split.count, prep.size, prep.crop_pct, describe(runtime, config.system.device_target == "auto"),
                model.backend)
    if config.data.eval_shuffle:
        logger.info("eval_shuffle: every image is read once, and the order changes no metric")
    loader = create_eval_loader(split, batch_size, prep, runtime.rank, runtime.world, data.num_parallel_workers)
    metrics = evaluate(network, loader, batch_size, runtime.world)
    line = result_line(spec.name, metrics)
    if runtime.is_main:
        print(mindcv_metrics(metrics, spec.num_classes), flush=True)
        print(line, flush=True)
    return line
