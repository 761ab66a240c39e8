"""train.py's loop: epochs of compiled steps, logging, validation, checkpoints, resume, the final JSON line."""
import logging
import math
import os
import time

import numpy as np
from mindcv.optim import create_optimizer
from mindcv.scheduler import create_scheduler

from ..errors import UserError
from .config import save_config
from .data import SplitInfo, create_train_loader, iterate, train_steps
from .evaluate import EvalNetwork, eval_loader_for, evaluate, result_line
from .checkpoints import CheckpointKeeper, list_checkpoints
from .runtime import add_log_file, amp_level, build_model, load_weights, setup_logging, setup_runtime
from .step import apply_amp, build_loss_network, build_train_steps

logger = logging.getLogger("mindcv_volo")


def learning_rates(args, updates_per_epoch):
    """One learning rate per optimizer update (MindCV's scheduler): linear warmup, cosine, cooldown at min_lr."""
    if args.scheduler == "step_decay" and not args.decay_epochs:
        raise UserError("scheduler step_decay needs decay_epochs (decay every this many epochs)")
    decay_epochs = args.decay_epochs or args.epoch_size - args.warmup_epochs - args.cooldown_epochs
    if decay_epochs <= 0 and args.scheduler != "constant":
        raise UserError(f"warmup_epochs {args.warmup_epochs} + cooldown_epochs {args.cooldown_epochs} leave no "
                        f"epoch to decay in epoch_size {args.epoch_size}; lower them or raise epoch_size")
    warmup_factor = min(args.warmup_lr / args.lr, 1.0) if args.lr > 0 else 0.0
    lrs = create_scheduler(updates_per_epoch, scheduler=args.scheduler, lr=args.lr, min_lr=args.min_lr,
                           warmup_epochs=args.warmup_epochs, warmup_factor=warmup_factor,
                           decay_epochs=max(decay_epochs, 1), decay_rate=args.decay_rate, num_epochs=args.epoch_size)
    return [float(lr) for lr in lrs]


def build_optimizer(args, model, lrs):
    """MindCV's optimizer; no weight decay on the model's no_weight_decay() names, norms and biases."""
    return create_optimizer(model, opt=args.opt, lr=lrs, weight_decay=args.weight_decay, momentum=args.momentum,
                            nesterov=args.use_nesterov,
                            weight_decay_filter="norm_and_bias" if args.filter_bias_and_bn else "disable")


def check_options(args):
    positive = ("batch_size", "epoch_size", "gradient_accumulation_steps", "ckpt_save_interval",
                "keep_checkpoint_max", "log_interval", "val_interval", "num_parallel_workers", "image_resize")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(args, name)}")
    if args.loss_scale <= 0:
        raise UserError(f"loss_scale must be positive, got {args.loss_scale}")
    if args.ckpt_save_policy == "top_k" and not args.val_while_train:
        raise UserError("ckpt_save_policy top_k ranks checkpoints by validation top-1: turn on val_while_train")


def format_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Run:
    """Everything one train.py run builds before its first step."""

    def __init__(self, args):
        check_options(args)
        self.args = args
        self.rank, self.world = setup_runtime(args)
        self.is_main = self.rank == 0
        setup_logging(self.rank)

        self.train_split = SplitInfo(args.data_dir, args.train_split)
        self.train_split.check_num_classes(args.num_classes)
        self.val_split = self._val_split()
        self.global_batch = args.batch_size * self.world
        per_update = self.global_batch * args.gradient_accumulation_steps
        if self.train_split.count < per_update:
            raise UserError(f"batch_size {args.batch_size} x {self.world} device(s) x "
                            f"{args.gradient_accumulation_steps} accumulation step(s) = {per_update} images per "
                            f"update is more than the {self.train_split.count} images in {self.train_split.folder}; "
                            "lower batch_size")
        self.steps = train_steps(self.train_split.count, self.global_batch, args.gradient_accumulation_steps,
                                 args.drop_remainder)
        self.updates = self.steps // args.gradient_accumulation_steps

        self.model = build_model(args)
        if self.model.img_size != args.image_resize:
            raise UserError(f"image_resize {args.image_resize} differs from the model's img_size "
                            f"{self.model.img_size}; set image_resize to {self.model.img_size} (or img_size "
                            "in arch_overrides)")
        if args.ckpt_path and not args.resume:
            load_weights(self.model, args.ckpt_path, adapt=True)  # fine-tuning start point
        params = [(p.name, p) for p in self.model.get_parameters()]  # named before any wrapping
        self.amp_level = amp_level(args)
        network = apply_amp(self.model, self.amp_level)
        self.eval_network = EvalNetwork(network)
        self.loss_network = build_loss_network(network, args)
        self.lrs = learning_rates(args, self.updates)
        self.optimizer = build_optimizer(args, self.model, self.lrs)
        self.micro_step, self.update_step, self.state, self.ema = build_train_steps(
            self.loss_network, self.optimizer, self.model, args)
        self.keeper = CheckpointKeeper(args.ckpt_save_dir, args.model, params, self.optimizer, self.state,
                                       self.ema, args.keep_checkpoint_max, args.ckpt_save_policy)
        # Only now, with every input checked, does the run write anything.
        if self.is_main:
            add_log_file(os.path.join(args.ckpt_save_dir, "train.log"))
        self.start_epoch, self.global_step = self._resume()
        if self.is_main and not args.resume:
            self.keeper.discard_earlier()
        if self.is_main:
            save_config(args, os.path.join(args.ckpt_save_dir, "config.yaml"))
        logger.info("device %s%s, %s mode, %d worker%s, AMP %s", args.device, " (auto)" * (args.device_target == "auto"),
                    "graph" if args.mode == 0 else "pynative", self.world, "s" * (self.world > 1), self.amp_level)

    def _val_split(self):
        args = self.args
        folder = os.path.join(args.data_dir, args.val_split)
        if not os.path.isdir(folder):
            if args.val_while_train:
                raise UserError(f"val_while_train is on but the split folder is missing: {folder}")
            logger.info("no validation split at %s: the run ends without an evaluation", folder)
            return None
        split = SplitInfo(args.data_dir, args.val_split)
        self.train_split.check_same_classes(split)
        return split

    def _resume(self):
        args = self.args
        if not args.resume:
            return 0, 0
        if args.ckpt_path:
            path = args.ckpt_path
        else:
            saved = list_checkpoints(args.ckpt_save_dir, args.model)
            if not saved:
                logger.info("resume: no checkpoint of %s in %s, starting from epoch 1", args.model, args.ckpt_save_dir)
                return 0, 0
            path = saved[-1][1]
        state = self.keeper.restore(path)
        if state["steps_per_epoch"] != self.steps:
            raise UserError(f"{path} was saved with {state['steps_per_epoch']} steps per epoch, this run has "
                            f"{self.steps} (other batch_size, device count or data?); resume with the same setup")
        logger.info("resumed from %s: %d of %d epochs done, global step %d", path, state["epoch"],
                    args.epoch_size, state["global_step"])
        return int(state["epoch"]), int(state["global_step"])

    # -----------------------------------------------------------------------------------------------------

    def train(self):
        args = self.args
        logger.info("training %s on %d images of %d classes: %d epochs x %d steps, global batch %d%s, lr %g",
                    args.model, self.train_split.count, len(self.train_split.classes), args.epoch_size, self.steps,
                    self.global_batch, f" x {args.gradient_accumulation_steps} accumulated"
                    if args.gradient_accumulation_steps > 1 else "", args.lr)
        self.run_start = time.time()
        self.steps_done = 0
        metrics = None
        for epoch in range(self.start_epoch, args.epoch_size):
            self.train_epoch(epoch)
            done = epoch + 1
            metrics = None
            if self.val_split is not None and args.val_while_train and (done % args.val_interval == 0
                                                                         or done == args.epoch_size):
                metrics = self.validate()
                logger.info("epoch %d/%d val: top-1 %.4f top-5 %.4f loss %.4f", done, args.epoch_size,
                            metrics["top1"], metrics["top5"], metrics["loss"])
            if self.is_main and (done % args.ckpt_save_interval == 0 or done == args.epoch_size):
                self.keeper.save(done, self.global_step, self.steps, metrics and metrics["top1"])
        if self.world > 1:
            # Every rank says what it ends with, so a launcher (and the tests) can see they agree.
            print(f"rank {self.rank} weights sha256 {self.keeper.fingerprint()}", flush=True)
        if self.val_split is None:
            return None
        if metrics is None:
            metrics = self.validate()
        line = result_line(args.model, metrics)
        if self.is_main:
            print(line, flush=True)
        return line

    def train_epoch(self, epoch):
        args = self.args
        accumulation = args.gradient_accumulation_steps
        # A loss that needs other columns (label maps) brings its own loader; see build_loss_network.
        make_loader = getattr(self.loss_network, "create_train_loader", create_train_loader)
        loader = make_loader(args, self.train_split, epoch, self.steps, self.rank, self.world)
        losses, skipped = [], 0
        epoch_start = interval_start = time.time()
        for step, batch in enumerate(iterate(loader)):
            applies = (step + 1) % accumulation == 0
            cell = self.update_step if applies else self.micro_step
            loss, norm, overflow, scale = cell(*self.loss_network.step_inputs(batch, epoch, step))
            loss, overflow = float(loss.asnumpy()), bool(overflow.asnumpy())
            lr = self.lrs[min(self.global_step, len(self.lrs) - 1)]
            if not math.isfinite(loss) or overflow:
                if args.loss_scale_type != "dynamic" and not args.drop_overflow_update:
                    raise UserError(
                        f"training stopped: non-finite {'loss' if not math.isfinite(loss) else 'gradients'} "
                        f"({loss}) at epoch {epoch + 1} step {step + 1} (lr {lr:.3g}, loss scale "
                        f"{float(scale.asnumpy()):g}); the update was not applied and nothing was saved for this "
                        "epoch; lower lr, turn on clip_grad, or use loss_scale_type dynamic")
                skipped += 1
                logger.info("epoch %d step %d: non-finite %s at loss scale %g: update skipped", epoch + 1,
                            step + 1, "loss" if not math.isfinite(loss) else "gradients", float(scale.asnumpy()))
            else:
                losses.append(loss)
            if applies:
                self.global_step += 1
            self.steps_done += 1
            if (step + 1) % args.log_interval == 0 or step + 1 == self.steps:
                now = time.time()
                span = (step % args.log_interval) + 1
                rate = span * self.global_batch / max(now - interval_start, 1e-9)
                per_step = (now - self.run_start) / self.steps_done
                left = (args.epoch_size - epoch - 1) * self.steps + self.steps - step - 1
                logger.info("epoch %d/%d step %d/%d loss %.4f lr %.3e grad-norm %.3f img/s %.1f eta %s",
                            epoch + 1, args.epoch_size, step + 1, self.steps, loss, lr,
                            float(norm.asnumpy()), rate, format_time(left * per_step))
                interval_start = now
        seconds = time.time() - epoch_start
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        logger.info("epoch %d/%d done: train loss %.4f, %.1f s, %.1f img/s%s", epoch + 1, args.epoch_size,
                    mean_loss, seconds, self.steps * self.global_batch / max(seconds, 1e-9),
                    f", {skipped} step(s) skipped" if skipped else "")

    def validate(self):
        """Metrics of the current weights (the EMA weights when ema is on) on the validation split."""
        loader = eval_loader_for(self.args, self.model, self.val_split, self.rank, self.world)
        if self.ema is None:
            return evaluate(self.eval_network, loader, self.args.batch_size, self.world)
        swap = [(p, e) for p, e in zip(self.ema.params, self.ema.ema)]
        saved = [p.value().copy() for p, _ in swap]
        for param, ema in swap:
            param.set_data(ema.value().copy())
        try:
            return evaluate(self.eval_network, loader, self.args.batch_size, self.world)
        finally:
            for (param, _), value in zip(swap, saved):
                param.set_data(value)


def train(args):
    """train.py: build the run and train it; returns the final JSON line (None without a val split)."""
    return Run(args).train()
