"""Evaluation: top-1/top-5/loss of a model on an ImageFolder split, shared by validate.py and train.py.

    python validate.py -c CONFIG.yaml --ckpt_path X
    python validate.py --model volo_d1_224 --ckpt_path X --data_dir D [--split val] [--ema True]

Preprocessing is the model's own (resize to size / crop_pct, bicubic, center crop, mean/std). The logits
come from one compiled graph (a short last batch is padded and the padding ignored); the metrics are
computed on the host in float64. Under msrun each rank evaluates every world-th image and the sums are
all-reduced, so every rank returns the numbers of the whole split. The last line on stdout is one JSON
object: {"model", "top1", "top5", "loss", "num_samples", "img_per_s"} (top1/top5 as fractions).
"""
import json
import logging
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..errors import UserError
from .data import SplitInfo, create_eval_loader, eval_transforms, iterate
from .runtime import amp_level, build_model, eval_preprocessing, load_weights, setup_logging, setup_runtime
from .step import apply_amp

logger = logging.getLogger("mindcv_volo")


class EvalNetwork(nn.Cell):
    """The model in inference mode, float32 logits."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, images):
        return self.model(images).astype(ms.float32)


def batch_metrics(logits, labels, topk=5):
    """(top-1 hits, top-k hits, summed cross entropy) of one batch, in float64 on the host."""
    logits = logits.astype(np.float64)
    labels = labels.astype(np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].sum()
    k = min(topk, logits.shape[1])
    best = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (best[:, 0] == labels).sum(), (best == labels[:, None]).any(axis=1).sum(), loss


class _AllReduceSum(nn.Cell):
    """Sum over devices, compiled (the eager comm_func.all_reduce has no CPU kernel in MindSpore 2.10)."""

    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    @ms.jit
    def construct(self, x):
        return self.all_reduce(x)


def _all_reduce_sum(values, world):
    if world == 1:
        return values
    return _AllReduceSum()(Tensor(np.asarray(values, np.float32))).asnumpy().astype(np.float64)


def evaluate(network, loader, batch_size, world=1, log_every=0):
    """{"top1", "top5", "loss", "num_samples", "img_per_s"} of `network` (an EvalNetwork) over `loader`."""
    network.set_train(False)
    sums = np.zeros(4)  # top-1 hits, top-5 hits, loss sum, samples
    start = time.time()
    total = loader.get_dataset_size()
    for index, (images, labels) in enumerate(iterate(loader)):
        count = len(labels)
        if count < batch_size:  # one graph for every batch: pad the last one, ignore the padding
            images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        logits = network(Tensor(images)).asnumpy()[:count]
        sums += (*batch_metrics(logits, labels), count)
        if log_every and (index + 1) % log_every == 0 or index + 1 == total:
            logger.info("eval %d/%d batches, top-1 so far %.4f", index + 1, total, sums[0] / max(sums[3], 1))
    elapsed = time.time() - start
    sums = _all_reduce_sum(sums, world)
    samples = int(round(sums[3]))
    if samples == 0:
        raise UserError("no image was evaluated")
    return {"top1": sums[0] / samples, "top5": sums[1] / samples, "loss": sums[2] / samples,
            "num_samples": samples, "img_per_s": samples / max(elapsed, 1e-9)}


def result_line(model_name, metrics):
    """The JSON line train.py and validate.py end with."""
    fields = {"model": model_name, "top1": round(float(metrics["top1"]), 6), "top5": round(float(metrics["top5"]), 6),
              "loss": round(float(metrics["loss"]), 6), "num_samples": int(metrics["num_samples"]),
              "img_per_s": round(float(metrics["img_per_s"]), 2)}
    return json.dumps(fields)


def eval_loader_for(args, model, split, rank=0, world=1):
    size, crop_pct, interpolation = eval_preprocessing(args, model)
    transforms = eval_transforms(size, crop_pct, interpolation, args.mean, args.std)
    return create_eval_loader(split, args.batch_size, transforms, rank, world, args.num_parallel_workers)


def validate(args):
    """validate.py: evaluate `ckpt_path` on `data_dir/split`; returns the JSON line (printed by rank 0)."""
    rank, world = setup_runtime(args)
    setup_logging(rank)
    if not args.ckpt_path:
        raise UserError("ckpt_path is not set; pass --ckpt_path FILE.ckpt (a checkpoint of this model)")
    split = SplitInfo(args.data_dir, args.split or args.val_split)
    split.check_num_classes(args.num_classes)
    model = build_model(args)
    load_weights(model, args.ckpt_path, ema=args.ema)
    network = EvalNetwork(apply_amp(model, amp_level(args)))
    size, crop_pct, _ = eval_preprocessing(args, model)
    logger.info("evaluating %s on %s: %d images, %d px (crop_pct %s), device %s%s", args.model, split.folder,
                split.count, size, crop_pct, args.device, f", {world} workers" if world > 1 else "")
    metrics = evaluate(network, eval_loader_for(args, model, split, rank, world), args.batch_size, world,
                       log_every=20)
    line = result_line(args.model, metrics)
    if rank == 0:
        print(line, flush=True)
    return line
