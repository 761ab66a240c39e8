"""The compiled train step: the loss seam, mixed precision, loss scale, clipping, accumulation, EMA;
`build_training` assembles them for a run, with the optimizer and schedule of `engine.optim`.

The seam for the loss: a loss builder `build(model, loss_options, num_classes, seed, runtime)` returns a
Cell whose `construct(*inputs)` returns the scalar loss, and whose host-side `step_inputs(batch, epoch,
step)` turns one loader batch into those inputs. The train step differentiates whatever that Cell computes
and passes `*inputs` through, so a loss that needs more inputs (token labeling: dense targets and a
MixToken mask drawn on the host per step) only brings its own Cell and its own `step_inputs`; nothing else
changes. Contract for every loss (what the train step relies on):
  * `construct(*inputs)` returns the loss of this device's batch as a float32 scalar;
  * `step_inputs(batch, epoch, step)` (host side, once per micro-step) returns the tuple of Tensors passed
    to `construct`, built from the loader's batch (numpy arrays in the loader's column order) and anything
    drawn for this step, from a generator keyed by (seed, epoch, step, rank) (`engine.randomness`) so a
    resumed run draws the same values; among them the model's drop-path masks (`DropPathMasks`), which
    `construct` hands to the model: nothing random is drawn inside the graph;
  * shapes and dtypes of the inputs stay the same at every step (one compiled graph);
  * optionally, a method `create_train_loader(split, epoch, steps, data, aug, num_classes, seed, runtime,
    first_step)` replaces `data.create_train_loader` (same arguments, same (seed, epoch) order and
    per-sample augmentation via `data.epoch_order`, `data.TrainSamples` and `data.sample_batches`) when
    the loss needs other columns than (image, label), e.g. label maps;
  * optionally, a method `check_inputs(split)` checks what the loss reads beside the images (e.g. a label
    map for every training image) before anything is compiled or written; a UserError stops the run.
`classification_loss` serves MindCV's losses (ce, bce, asl_*); token labeling's is
`token_labeling.training.build_token_label_loss`.
"""
import logging
from typing import NamedTuple, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.communication import get_group_size
from mindcv.loss import create_loss

from .data import pixel_mean_std
from .optim import build_optimizer, learning_rates
from .randomness import step_generator
from .runtime import amp_level

logger = logging.getLogger("mindcv_volo")


class DropPathMasks:
    """The drop-path masks of one step, drawn on the host: float32 (rows, B), 1 keeps a sample's branch.

    Row r is Bernoulli(keep_probs[r]) per sample (the model's `drop_path_keep_probs()`), from (seed, epoch,
    step, rank): a resumed run drops exactly what an uninterrupted run drops. A model without drop path still
    gets one row (unused), so every step's inputs have one form.
    """

    def __init__(self, keep_probs, seed, rank):
        self.keep_probs = np.asarray(keep_probs, np.float64).reshape(-1, 1)
        self.seed, self.rank = seed, rank

    def __call__(self, epoch, step, batch_size):
        if not self.keep_probs.size:
            return Tensor(np.ones((1, batch_size), np.float32))
        rng = step_generator("drop_path", self.seed, epoch, step, self.rank)
        return Tensor((rng.random((len(self.keep_probs), batch_size)) < self.keep_probs).astype(np.float32))


class ClassificationLoss(nn.Cell):
    """MindCV's loss (`create_loss`: ce, bce, asl_*; label smoothing; soft targets from mixup/cutmix) on
    `model(images, drop_masks)`.

    Inputs (images float (B, C, H, W), labels int (B,) or float (B, K), drop_masks float (rows, B)); the
    logits are cast to float32 first, so the loss is computed in float32 at every AMP level.
    """

    def __init__(self, model, drop_masks, name="ce", label_smoothing=0.0, reduction="mean"):
        super().__init__(auto_prefix=False)  # the model's parameters keep their own names
        self.model = model
        self.drop_masks = drop_masks
        self.loss_fn = create_loss(name, label_smoothing=label_smoothing, reduction=reduction)

    def construct(self, images, labels, drop_masks):
        return self.loss_fn(self.model(images, drop_masks).astype(ms.float32), labels)

    def step_inputs(self, batch, epoch, step):
        """The loader batch (image, label) and the step's drop-path masks, as the inputs of `construct`."""
        images, labels = batch[0], batch[1]
        return Tensor(images), Tensor(labels), self.drop_masks(epoch, step, len(images))


def classification_loss(model, loss_options, num_classes, seed, runtime):
    """The loss builder of MindCV's losses (the seam's signature)."""
    return ClassificationLoss(model, DropPathMasks(model.drop_path_keep_probs(), seed, runtime.rank),
                              loss_options.loss, loss_options.label_smoothing, loss_options.reduction)


class PixelNormalize(nn.Cell):
    """The host's finish of a training sample (`augment.TrainAugmentation.__call__`), in the graph, for the
    uint8 batches the loader ships where `data.normalizes_on_device`: (pixels - mean) / std in float32, NHWC to
    NCHW, and where a 4th channel marks the erased box, the erase value. The same float32 subtraction and division
    as the host's, so the images are the host's bit for bit. Float batches (normalised on the host) pass as they
    are. `mean`, `std`: per channel, 0-255 scale.
    """

    def __init__(self, mean, std, erase_value):
        super().__init__()
        self.mean = Tensor(np.asarray(mean, np.float32))
        self.std = Tensor(np.asarray(std, np.float32))
        self.erase_value = float(erase_value) if erase_value != "random" else 0.0

    def construct(self, images):
        if images.dtype != ms.uint8:
            return images
        normalized = (images[..., :3].astype(ms.float32) - self.mean) / self.std
        if images.shape[-1] == 4:
            normalized = ops.masked_fill(normalized, images[..., 3:] > 0, self.erase_value)
        return normalized.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision


class _Float32(nn.Cell):
    """Runs a cell in `compute` precision and hands its output on as `dtype`.

    O2/O3: a LayerNorm (BatchNorm) computes in float32 inside a float16 network, its output goes on as
    float16, as MindSpore's O2 does. O1: a Dense computes in float16 inside a float32 network.
    """

    def __init__(self, cell, dtype, compute=ms.float32):
        super().__init__(auto_prefix=False)  # the wrapped cell's parameters keep their names
        self.cell = cell.to_float(compute)
        self.dtype = dtype

    def construct(self, x):
        return self.cell(x).astype(self.dtype)


def _wrap(cell, kinds, dtype, compute=ms.float32):
    """Wrap every sub-cell of one of `kinds` in _Float32(sub, dtype, compute), in place."""
    for name, sub in list(cell.name_cells().items()):
        if isinstance(sub, kinds):
            cell._cells[name] = _Float32(sub, dtype, compute)  # pylint: disable=protected-access
        else:
            _wrap(sub, kinds, dtype, compute)
    if isinstance(cell, nn.SequentialCell):
        cell.cell_list = list(cell.cells())


def apply_amp(model, level, dtype=ms.float16):
    """Mixed precision in place; the model stays the same object (forward_train keeps working).

    O0: float32. O1: the Dense layers (the bulk of VOLO's compute) in float16, the rest float32
    (MindSpore's own O1 rewrites the network's source and fails on VOLO in 2.10). O2: everything in
    float16 but BatchNorm and LayerNorm. O3: everything in float16 but LayerNorm. Softmax is float32 at
    every level (the model casts around it), and the loss networks cast the logits to float32.
    """
    if level == "O0":
        return model
    if level == "O1":
        _wrap(model, (nn.Dense,), ms.float32, compute=dtype)
        return model
    model.to_float(dtype)
    _wrap(model, (nn.LayerNorm, nn.BatchNorm2d) if level == "O2" else (nn.LayerNorm,), dtype)
    return model


# ---------------------------------------------------------------------------------------------------------
# The step


class TrainState(nn.Cell):
    """Step state kept in the graph and saved in checkpoints: the loss scale and its good-step counter."""

    def __init__(self, loss_scale):
        super().__init__()
        self.loss_scale = Parameter(Tensor(loss_scale, ms.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="good_steps", requires_grad=False)


class EMA(nn.Cell):
    """Exponential moving average of every model parameter (BatchNorm statistics included)."""

    def __init__(self, params, decay):
        super().__init__()
        self.params = ParameterTuple(params)
        self.ema = self.params.clone(prefix="ema")
        self.decay = decay
        self.hyper_map = ops.HyperMap()

    def construct(self):
        return self.hyper_map(ops.partial(_ema_update, self.decay), self.ema, self.params)


def _ema_update(decay, ema, param):
    return ops.assign(ema, ema * decay + param.astype(ema.dtype) * (1.0 - decay))


def _square_sum(grad):
    return ops.reduce_sum(ops.square(grad.astype(ms.float32)))


def _scale_grad(factor, grad):
    return grad * factor.astype(grad.dtype)


def _add_into(buffer, grad):
    return ops.assign_add(buffer, grad.astype(buffer.dtype))


def _average_into(all_reduce, inverse_world, buffer):
    return ops.assign(buffer, all_reduce(buffer) * inverse_world)


def _zero(buffer):
    return ops.assign(buffer, ops.zeros_like(buffer))


class TrainStep(nn.Cell):
    """One micro-step of training, compiled as one graph.

    `construct(*inputs)` -> (loss, grad_norm, overflow, loss_scale): forward and backward of
    `loss_network(*inputs)` at the current loss scale. With `accumulation` > 1 the gradients are added to
    buffers; the instance built with `apply_update=True` (called on the last micro-step of each group)
    then averages them over devices and micro-steps, unscales, measures the global norm, clips it to
    `clip_value` (0: off) and applies the optimizer, averages the BatchNorm statistics over devices, and
    updates the EMA, unless a gradient is not finite: then the update is skipped and, under a dynamic scale,
    the scale halves (it doubles after `scale_window` good updates). The loss returned is unscaled.
    The first input, the image batch, goes through `pixel_normalize` (a `PixelNormalize`) first, if given.
    """

    def __init__(self, loss_network, optimizer, state, apply_update=True, accumulation=1, clip_value=0.0,
                 ema=None, dynamic_scale=False, scale_window=1000, buffers=None, pixel_normalize=None):
        super().__init__(auto_prefix=False)
        self.network = loss_network
        self.pixel_normalize = pixel_normalize if pixel_normalize is not None else nn.Identity()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.state = state
        self.apply_update = apply_update
        self.accumulation = accumulation
        self.buffers = buffers
        self.clip_value = clip_value
        self.ema = ema
        self.dynamic_scale = dynamic_scale
        self.scale_window = scale_window
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()
        parallel = ms.get_auto_parallel_context("parallel_mode")
        self.reducer = nn.Identity()
        self.buffers_to_sync = None
        if parallel == ms.ParallelMode.DATA_PARALLEL:
            world = get_group_size()
            self.reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=world)
            # BatchNorm statistics come from each device's own batch: average them at every update, so
            # the devices stay identical (torch's DDP broadcasts them from rank 0 instead).
            self.buffers_to_sync = ParameterTuple([p for p in loss_network.get_parameters() if not p.requires_grad])
            self.all_reduce = ops.AllReduce()
            self.inverse_world = 1.0 / world

    def construct(self, *inputs):
        inputs = (self.pixel_normalize(inputs[0]),) + inputs[1:]
        scale = self.state.loss_scale + 0.0  # the scale of this step, before any update below
        loss = self.network(*inputs)
        sens = ops.ones_like(loss) * scale.astype(loss.dtype)
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        zero = ops.zeros((), ms.float32)
        if self.accumulation > 1:
            grads = ops.depend(self.buffers, self.hyper_map(_add_into, self.buffers, grads))
            if not self.apply_update:
                return loss, zero, ops.zeros((), ms.bool_), scale
        grads = self.reducer(grads)
        grads = self.hyper_map(ops.partial(_scale_grad, 1.0 / (scale * self.accumulation)), grads)
        norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        overflow = ops.logical_not(ops.isfinite(norm))
        if self.clip_value > 0:
            factor = ops.minimum(self.clip_value / (norm + 1e-6), 1.0)
            grads = self.hyper_map(ops.partial(_scale_grad, factor), grads)
        if not overflow:
            self.optimizer(grads)
        if self.buffers_to_sync is not None:
            self.hyper_map(ops.partial(_average_into, self.all_reduce, self.inverse_world), self.buffers_to_sync)
        # After the averaging: the EMA of the BatchNorm statistics is then the same on every device, so a
        # validation sharded over the devices evaluates one set of EMA weights.
        if self.ema is not None:
            if not overflow:
                self.ema()
        if self.dynamic_scale:
            self._update_scale(overflow)
        if self.accumulation > 1:
            self.hyper_map(_zero, self.buffers)
        return loss, norm, overflow, scale

    def _update_scale(self, overflow):
        good = self.state.good_steps + 1
        grow = good >= self.scale_window
        scale = self.state.loss_scale
        new_scale = ops.select(overflow, ops.maximum(scale * 0.5, 1.0), ops.select(grow, scale * 2.0, scale))
        new_good = ops.select(ops.logical_or(overflow, grow), ops.zeros_like(good), good)
        ops.assign(self.state.loss_scale, new_scale)
        ops.assign(self.state.good_steps, new_good)


def build_train_steps(loss_network, optimizer, model, step_options, ema=False, dynamic_scale=False,
                      pixel_normalize=None):
    """(micro-step cell, update-step cell, TrainState, EMA or None) for the `train_step` section; the two
    cells are one when not accumulating."""
    state = TrainState(step_options.loss_scale)
    ema = EMA(list(model.get_parameters()), step_options.ema_decay) if ema else None
    accumulation = step_options.gradient_accumulation_steps
    common = dict(accumulation=accumulation, clip_value=step_options.clip_value if step_options.clip_grad else 0.0,
                  ema=ema, dynamic_scale=dynamic_scale, pixel_normalize=pixel_normalize)
    if accumulation > 1:
        common["buffers"] = optimizer.parameters.clone(prefix="accum", init="zeros")
    update = TrainStep(loss_network, optimizer, state, apply_update=True, **common)
    micro = TrainStep(loss_network, optimizer, state, apply_update=False, **common) if accumulation > 1 else update
    for cell in {id(update): update, id(micro): micro}.values():
        cell.set_train(True)
    return micro, update, state, ema


def dynamic_loss_scale(step_options, level):
    """Whether the loss scale adapts: `dynamic`, or `auto` where float16 needs it: at the level the run uses, O2
    or O3 (on CPU's own formulation `amp_level` has made that O0; the accelerator formulation forced on CPU keeps
    its level and so its loss scale, as on GPU and Ascend)."""
    if step_options.loss_scale_type == "auto":
        dynamic = level in ("O2", "O3")
        logger.info("loss_scale_type auto: %s", "dynamic" if dynamic else "fixed")
        return dynamic
    return step_options.loss_scale_type == "dynamic"


class Training(NamedTuple):
    """What a run trains with (`build_training`): the AMP level it runs, the model under AMP (`network`), the
    loss network (the seam above), one learning rate per update, the optimizer, whether the loss scale
    adapts, the micro-step and update-step cells (one cell without accumulation), the TrainState, the EMA."""
    amp_level: str
    network: nn.Cell
    loss_network: nn.Cell
    lrs: list
    optimizer: nn.Optimizer
    dynamic_scale: bool
    micro_step: TrainStep
    update_step: TrainStep
    state: TrainState
    ema: Optional[EMA]


def build_training(config, model, num_classes, runtime, updates, build_loss):
    """train.py's compiled steps for `model` (built, weights loaded; its parameters stay float32): AMP at the
    level this device runs, the loss of `build_loss`, MindCV's scheduler and optimizer over `updates`
    optimizer updates, loss scale, clipping, accumulation and EMA from the `train_step` section."""
    level = amp_level(config.train_step.amp_level, model.backend)
    network = apply_amp(model, level)
    loss_network = build_loss(network, config.loss, num_classes, config.system.seed, runtime)
    lrs = learning_rates(config.scheduler, updates)
    optimizer = build_optimizer(config.optimizer, model, lrs)
    dynamic = dynamic_loss_scale(config.train_step, level)
    pixel_normalize = PixelNormalize(*pixel_mean_std(config.augmentation), config.augmentation.re_value)
    micro_step, update_step, state, ema = build_train_steps(loss_network, optimizer, model, config.train_step,
                                                            config.model.ema, dynamic, pixel_normalize)
    return Training(level, network, loss_network, lrs, optimizer, dynamic, micro_step, update_step, state, ema)
