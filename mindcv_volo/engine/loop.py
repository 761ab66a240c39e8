"""train.py's loop: epochs of compiled steps, logging, validation, checkpoints, resume, the final JSON line."""
import logging
import math
import os
import shlex
import signal
import sys
import time
from typing import NamedTuple, Optional

from mindcv.optim import create_optimizer
from mindcv.scheduler import create_scheduler
from mindspore import nn

from ..errors import Interrupted, UserError
from ..weights.checkpoint import STATE_PREFIX, load_checkpoint_into, read_checkpoint
from .checkpoints import CheckpointKeeper, EpochProgress, list_checkpoints
from .config import save_config
from .data import SplitInfo, create_eval_loader, create_train_loader, train_steps
from .evaluate import EvalNetwork, evaluate, result_line
from .metrics import MetricsLog
from .model_spec import build_model, preprocessing, resolve
from .runtime import add_log_file, amp_level, describe, release_free_heap, setup_runtime, under_msrun
from .step import EMA, TrainState, TrainStep, apply_amp, build_train_steps
from .stopping import StopRequests

logger = logging.getLogger("mindcv_volo")

COSINE = ("cosine_decay", "warmup_cosine_decay")
# optimizers with an epsilon of their own, and the name MindCV's create_optimizer passes it under
EPS_OPTIMIZERS = ("adam", "adamw", "nadam", "adan", "lamb", "rmsprop")


def schedule_epochs(scheduler_options):
    """(warmup, decay, cooldown) epochs of the run. A run shorter than its recipe's warmup, cooldown or cosine
    decay (a smoke run of a 300-epoch recipe) gets them shortened, with one warning, and trains."""
    epochs, warmup, cooldown = (scheduler_options.epoch_size, scheduler_options.warmup_epochs,
                                scheduler_options.cooldown_epochs)
    decay = scheduler_options.decay_epochs
    if warmup + cooldown >= epochs:  # keep one epoch to decay in
        room = epochs - 1
        new_warmup = room * warmup // max(warmup + cooldown, 1)
        warmup, cooldown = new_warmup, room - new_warmup
    if scheduler_options.scheduler in COSINE and (decay is None or warmup + decay + cooldown > epochs):
        decay = epochs - warmup - cooldown
    changed = [f"{name} {old} -> {new}" for name, old, new in (
        ("warmup_epochs", scheduler_options.warmup_epochs, warmup),
        ("cooldown_epochs", scheduler_options.cooldown_epochs, cooldown),
        ("decay_epochs", scheduler_options.decay_epochs, decay)) if old is not None and old != new]
    if changed:
        logger.warning("warning: epoch_size %d is shorter than the recipe's schedule: %s", epochs, ", ".join(changed))
    return warmup, decay, cooldown


def learning_rates(scheduler_options, updates_per_epoch):
    """One learning rate per optimizer update (MindCV's create_scheduler): warmup, the schedule, cooldown."""
    s = scheduler_options
    warmup, decay, _ = schedule_epochs(s)
    if s.scheduler == "step_decay" and not decay:
        raise UserError("scheduler step_decay needs decay_epochs (decay every this many epochs)")
    if s.warmup_factor is not None:
        warmup_factor = s.warmup_factor
    else:
        warmup_factor = min((1e-6 if s.warmup_lr is None else s.warmup_lr) / s.lr, 1.0) if s.lr > 0 else 0.0
    lrs = create_scheduler(updates_per_epoch, scheduler=s.scheduler, lr=s.lr, min_lr=s.min_lr, warmup_epochs=warmup,
                           warmup_factor=warmup_factor, decay_epochs=max(decay or 1, 1), decay_rate=s.decay_rate,
                           milestones=list(s.multi_step_decay_milestones), num_epochs=s.epoch_size,
                           num_cycles=s.num_cycles, cycle_decay=s.cycle_decay, lr_epoch_stair=s.lr_epoch_stair)
    return [float(lr) for lr in lrs]


def build_optimizer(optimizer_options, model, lrs):
    """MindCV's optimizer; weight_decay_filter norm_and_bias also spares the model's no_weight_decay() names."""
    o = optimizer_options
    extra = {}
    if o.eps is not None:
        if o.opt not in EPS_OPTIMIZERS:
            logger.info("eps %g: %s has no epsilon; it is not used", o.eps, o.opt)
        elif o.opt != "rmsprop":  # create_optimizer passes its own eps argument to rmsprop only
            extra["eps"] = o.eps
    return create_optimizer(model, opt=o.opt, lr=lrs, weight_decay=o.weight_decay, momentum=o.momentum,
                            nesterov=o.use_nesterov, weight_decay_filter=o.weight_decay_filter,
                            **({"eps": o.eps} if o.eps is not None and o.opt == "rmsprop" else {}), **extra)


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
    loss network (engine.step's seam), one learning rate per update, the optimizer, whether the loss scale
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
    micro_step, update_step, state, ema = build_train_steps(loss_network, optimizer, model, config.train_step,
                                                            config.model.ema, dynamic)
    return Training(level, network, loss_network, lrs, optimizer, dynamic, micro_step, update_step, state, ema)


def check_options(config):
    values = config.as_dict()
    positive = ("batch_size", "epoch_size", "gradient_accumulation_steps", "ckpt_save_interval",
                "keep_checkpoint_max", "log_interval", "val_interval", "num_parallel_workers", "image_resize")
    for name in positive:
        if values[name] < 1:
            raise UserError(f"{name} must be at least 1, got {values[name]}")
    if values["loss_scale"] <= 0:
        raise UserError(f"loss_scale must be positive, got {values['loss_scale']}")
    if values["ckpt_save_policy"] == "top_k" and not values["val_while_train"]:
        raise UserError("ckpt_save_policy top_k ranks checkpoints by validation top-1: turn on val_while_train")


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


def resume_command():
    """This process's command line with `--resume True` (in place of any resume option it had)."""
    argv, kept, skip = sys.argv, [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--resume_opt", "--resume-opt"):
            skip = index + 1 < len(argv) and not argv[index + 1].startswith("-")
            continue
        if arg.startswith(("--resume=", "--resume_opt=", "--resume-opt=")):
            continue
        kept.append(arg)
    return shlex.join(["python", *kept, "--resume", "True"])


def format_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepLosses:
    """The epoch's step losses, read back from the device only when `settle` asks (at log intervals, before a
    stop, at the epoch's end): the host then never waits for a step to finish before feeding the next (on an
    accelerator the steps queue up). A step with a non-finite loss or gradients was already skipped inside the
    graph; settling logs it, or, with a fixed loss scale that does not drop such updates, ends the run."""

    def __init__(self, progress, fail_on_overflow):
        self.loss_sum, self.count, self.skipped = progress.loss_sum, progress.losses, progress.skipped
        self.fail_on_overflow = fail_on_overflow
        self.pending = []

    def add(self, epoch, step, lr, loss, overflow, scale):
        self.pending.append((epoch, step, lr, loss, overflow, scale))

    def settle(self):
        """Read back the pending steps' losses; returns the last one."""
        loss = float("nan")
        for epoch, step, lr, loss_tensor, overflow, scale in self.pending:
            loss = float(loss_tensor.asnumpy())
            if math.isfinite(loss) and not bool(overflow.asnumpy()):
                self.loss_sum += loss
                self.count += 1
                continue
            what = "loss" if not math.isfinite(loss) else "gradients"
            if self.fail_on_overflow:
                raise UserError(
                    f"training stopped: non-finite {what} ({loss}) at epoch {epoch + 1} step {step + 1} (lr "
                    f"{lr:.3g}, loss scale {float(scale.asnumpy()):g}); the update was not applied and nothing "
                    "was saved for this epoch; lower lr, turn on clip_grad, or use loss_scale_type dynamic")
            self.skipped += 1
            logger.info("epoch %d step %d: non-finite %s at loss scale %g: update skipped", epoch + 1, step + 1,
                        what, float(scale.asnumpy()))
        self.pending.clear()
        return loss

    def mean(self):
        return self.loss_sum / self.count if self.count else float("nan")


class Run:
    """Everything one train.py run builds before its first step, from the parsed `config` and the loss
    builder (`engine.step`'s seam)."""

    def __init__(self, config, build_loss):
        check_options(config)
        self.config = config
        data, aug, steps = config.data, config.augmentation, config.train_step
        self.runtime = setup_runtime(config.system, config.system.distribute)
        log_options_that_do_not_apply(config)
        warn_what_is_not_reproduced(config.model)

        self.train_split = SplitInfo(data.data_dir, data.train_split)
        self.val_split = self._val_split()
        self.global_batch = data.batch_size * self.runtime.world
        per_update = self.global_batch * steps.gradient_accumulation_steps
        images = min(self.train_split.count, data.num_samples or self.train_split.count)
        if images < per_update:
            raise UserError(f"batch_size {data.batch_size} x {self.runtime.world} device(s) x "
                            f"{steps.gradient_accumulation_steps} accumulation step(s) = {per_update} images per "
                            f"update is more than the {images} images an epoch of {self.train_split.folder} has; "
                            "lower batch_size")
        self.steps = train_steps(images, self.global_batch, steps.gradient_accumulation_steps, data.drop_remainder)
        self.updates = self.steps // steps.gradient_accumulation_steps

        classes = self.train_split.classes
        self.spec = resolve(config.model, num_classes=len(classes), class_names=classes)
        ckpt = config.checkpoint
        earlier = [] if ckpt.resume else list_checkpoints(ckpt.ckpt_save_dir, self.spec.name)
        if earlier and not ckpt.overwrite:
            raise UserError(f"{ckpt.ckpt_save_dir} holds {len(earlier)} checkpoint(s) of an earlier run of "
                            f"{self.spec.name} (latest {os.path.basename(earlier[-1][2])}); continue that run "
                            "with --resume True, write this one elsewhere with --ckpt_save_dir DIR, or replace "
                            "them with --overwrite True")
        self.train_split.check_num_classes(self.spec.num_classes)
        self.model = build_model(self.spec, config.model.drop_rate, config.model.drop_path_rate)
        if config.model.recompute:
            try:
                self.model.set_grad_checkpointing(True)
            except RuntimeError as err:
                raise UserError(f"recompute: {err}") from None
        if self.model.img_size != aug.image_resize:
            raise UserError(f"image_resize {aug.image_resize} differs from the model's img_size "
                            f"{self.model.img_size}; set image_resize to {self.model.img_size} (or img_size "
                            "in arch_overrides)")
        if config.model.ckpt_path and not config.checkpoint.resume:
            logger.info("starting from %s", config.model.ckpt_path)
            load_checkpoint_into(self.model, config.model.ckpt_path, adapt=True)  # fine-tuning start point
        self.preprocessing = preprocessing(self.model, self.spec, aug)
        params = [(p.name, p) for p in self.model.get_parameters()]  # named before any wrapping
        (self.amp_level, network, self.loss_network, self.lrs, self.optimizer, self.dynamic_scale, self.micro_step,
         self.update_step, self.state, self.ema) = build_training(config, self.model, self.spec.num_classes,
                                                                  self.runtime, self.updates, build_loss)
        self.eval_network = EvalNetwork(network)
        check_inputs = getattr(self.loss_network, "check_inputs", None)  # e.g. a label map for every image
        if check_inputs is not None:
            check_inputs(self.train_split)
        self.keeper = CheckpointKeeper(ckpt.ckpt_save_dir, self.spec.name, params, self.optimizer, self.state,
                                       self.ema, ckpt.keep_checkpoint_max, ckpt.ckpt_save_policy,
                                       self.spec.describe(self.preprocessing))
        # Only now, with every input checked, does the run write anything.
        if self.runtime.is_main:
            add_log_file(os.path.join(ckpt.ckpt_save_dir, "train.log"))
        self.start_epoch, self.global_step, self.progress = self._resume()
        if self.runtime.is_main and earlier:
            self.keeper.discard_earlier()
        self.metrics = MetricsLog(ckpt.ckpt_save_dir, self.start_epoch) if self.runtime.is_main else None
        if self.runtime.is_main:
            save_config(config.replace(model=self.spec.name, num_classes=self.spec.num_classes),
                        os.path.join(ckpt.ckpt_save_dir, "config.yaml"))
        logger.info("%s, backend %s, AMP %s", describe(self.runtime, config.system.device_target == "auto"),
                    self.model.backend, self.amp_level)

    def _val_split(self):
        data = self.config.data
        folder = os.path.join(data.data_dir, data.val_split)
        if not os.path.isdir(folder):
            if self.config.checkpoint.val_while_train:
                raise UserError(f"val_while_train is on but the split folder is missing: {folder}")
            logger.info("no validation split at %s: the run ends without an evaluation", folder)
            return None
        split = SplitInfo(data.data_dir, data.val_split)
        self.train_split.check_same_classes(split)
        return split

    def _resume(self):
        """(epochs done, global update step, EpochProgress of the epoch in progress) to continue from."""
        ckpt = self.config.checkpoint
        if not ckpt.resume:
            return 0, 0, EpochProgress()
        path = self.config.model.ckpt_path
        saved = list_checkpoints(ckpt.ckpt_save_dir, self.spec.name)
        if path and saved and not _holds_training_state(path):
            # A weights-only ckpt_path is this run's starting point (fine-tuning): continue from its checkpoints.
            logger.info("resume: %s is the starting point of the run (weights only); continuing from %s", path,
                        ckpt.ckpt_save_dir)
            path = ""
        if not path:
            if not saved:
                logger.info("resume: no checkpoint of %s in %s, starting from epoch 1", self.spec.name,
                            ckpt.ckpt_save_dir)
                return 0, 0, EpochProgress()
            path = saved[-1][2]
        state = self.keeper.restore(path)
        if state["steps_per_epoch"] != self.steps:
            raise UserError(f"{path} was saved with {state['steps_per_epoch']} steps per epoch, this run has "
                            f"{self.steps} (other batch_size, device count or data?); resume with the same setup")
        progress = EpochProgress(int(state.get("epoch_step", 0)), float(state.get("epoch_loss_sum", 0.0)),
                                 int(state.get("epoch_losses", 0)), int(state.get("epoch_skipped", 0)))
        epoch = int(state["epoch"])
        logger.info("resumed from %s: %d of %d epochs done%s, global step %d", path, epoch,
                    self.config.scheduler.epoch_size,
                    f", epoch {epoch + 1} at step {progress.steps}/{self.steps}" if progress.steps else "",
                    state["global_step"])
        return epoch, int(state["global_step"]), progress

    # -----------------------------------------------------------------------------------------------------

    def train(self):
        config, epochs = self.config, self.config.scheduler.epoch_size
        ckpt = config.checkpoint
        accumulation = config.train_step.gradient_accumulation_steps
        logger.info("training %s on %d images of %d classes: %d epochs x %d steps, global batch %d%s, lr %g",
                    self.spec.name, self.train_split.count, len(self.train_split.classes), epochs, self.steps,
                    self.global_batch, f" x {accumulation} accumulated" if accumulation > 1 else "",
                    config.scheduler.lr)
        self.run_start = time.time()
        self.steps_done = 0
        metrics = None
        with StopRequests(self.runtime.world) as stop:
            for epoch in range(self.start_epoch, epochs):
                progress = self.progress if epoch == self.start_epoch else EpochProgress()
                progress, img_per_s, seconds = self.train_epoch(epoch, progress, stop)
                if progress.steps < self.steps:
                    self.stop_run(stop, epoch, progress)
                done = epoch + 1
                train_loss = progress.loss_sum / progress.losses if progress.losses else float("nan")
                metrics = None
                if self.val_split is not None and ckpt.val_while_train and (done % ckpt.val_interval == 0
                                                                            or done == epochs):
                    metrics = self.validate()
                    logger.info("epoch %d/%d val: top-1 %.4f top-5 %.4f loss %.4f (all %d images)", done, epochs,
                                metrics["top1"], metrics["top5"], metrics["loss"], metrics["num_samples"])
                saved = None
                if self.runtime.is_main:
                    lr = self.lrs[min(self.global_step, len(self.lrs)) - 1]
                    self.metrics.add(done, train_loss, lr, img_per_s, seconds, metrics)
                    if done % ckpt.ckpt_save_interval == 0 or done == epochs:
                        saved = self.keeper.save(done, self.global_step, self.steps, metrics and metrics["top1"])
                if done < epochs and stop.agreed():
                    self.stop_run(stop, done, None, saved, metrics and metrics["top1"])
        if self.runtime.world > 1:
            # Every rank says what it ends with, so a launcher (and the tests) can see they agree.
            print(f"rank {self.runtime.rank} weights sha256 {self.keeper.fingerprint()}", flush=True)
        if self.val_split is None:
            return None
        if metrics is None:
            metrics = self.validate()
        line = result_line(self.spec.name, metrics)
        if self.runtime.is_main:
            print(line, flush=True)
        return line

    def stop_run(self, stop, epochs_done, progress, saved=None, val_top1=None):
        """Stop as every rank agreed (`stop`) after `epochs_done` epochs and `progress` (None: at the epoch's
        end): rank 0 writes the checkpoint to continue from (unless the epoch's is `saved`, its path), every
        rank waits for it, and the run ends with Interrupted."""
        signum = stop.agreed()
        stop_name = signal.Signals(signum).name
        where = (f"epoch {epochs_done + 1} step {progress.steps}/{self.steps}" if progress is not None
                 else f"epoch {epochs_done}")
        path = saved
        if self.runtime.is_main and path is None:
            path = self.keeper.save(epochs_done, self.global_step, self.steps, val_top1, progress)
        stop.barrier()
        if self.runtime.is_main:
            how = "add --resume True to the msrun command" if under_msrun() else f"run: {resume_command()}"
            message = f"stopped by {stop_name} after {where}: saved {path}; to continue, {how}"
        else:
            message = f"rank {self.runtime.rank}: stopped by {stop_name} after {where}, as every rank; rank 0 saved"
        logger.warning("%s", message)  # the one line (other ranks log warnings only)
        raise Interrupted(message, 128 + signum)

    def train_epoch(self, epoch, progress, stop):
        """Train the steps of `epoch` after `progress` (EpochProgress); stops early, at an update, when every
        rank agrees on a stop request (`stop`). Returns (EpochProgress, img/s, seconds)."""
        config = self.config
        accumulation = config.train_step.gradient_accumulation_steps
        log_interval, epochs = config.system.log_interval, config.scheduler.epoch_size
        # A loss that needs other columns (label maps) brings its own loader; see engine.step.
        make_loader = getattr(self.loss_network, "create_train_loader", create_train_loader)
        batches = make_loader(self.train_split, epoch, self.steps, config.data, config.augmentation,
                              self.spec.num_classes, config.system.seed, self.runtime, progress.steps)
        first = progress.steps
        losses = StepLosses(progress, fail_on_overflow=not self.dynamic_scale and
                            not config.train_step.drop_overflow_update)
        steps_done = first
        epoch_start = interval_start = time.time()
        for step, batch in enumerate(batches, start=first):
            applies = (step + 1) % accumulation == 0
            cell = self.update_step if applies else self.micro_step
            loss, norm, overflow, scale = cell(*self.loss_network.step_inputs(batch, epoch, step))
            lr = self.lrs[min(self.global_step, len(self.lrs) - 1)]
            losses.add(epoch, step, lr, loss, overflow, scale)
            if applies:
                self.global_step += 1
            self.steps_done += 1
            if self.steps_done == 1:
                release_free_heap()  # what compiling the step left freed but held
            steps_done = step + 1
            if (step + 1) % log_interval == 0 or step + 1 == self.steps:
                last_loss = losses.settle()
                now = time.time()
                span = (step % log_interval) + 1
                rate = span * self.global_batch / max(now - interval_start, 1e-9)
                per_step = (now - self.run_start) / self.steps_done
                left = (epochs - epoch - 1) * self.steps + self.steps - step - 1
                logger.info("epoch %d/%d step %d/%d loss %.4f lr %.3e grad-norm %.3f img/s %.1f eta %s",
                            epoch + 1, epochs, step + 1, self.steps, last_loss, lr,
                            float(norm.asnumpy()), rate, format_time(left * per_step))
                interval_start = now
            # The epoch's last step is followed by the epoch's end, which asks again.
            if applies and step + 1 < self.steps and stop.agreed():
                break
        losses.settle()
        seconds = time.time() - epoch_start
        img_per_s = (steps_done - first) * self.global_batch / max(seconds, 1e-9)
        if steps_done == self.steps:
            logger.info("epoch %d/%d done: train loss %.4f (rank %d's batches), %.1f s, %.1f img/s%s", epoch + 1,
                        epochs, losses.mean(), self.runtime.rank, seconds, img_per_s,
                        f", {losses.skipped} step(s) skipped" if losses.skipped else "")
        return EpochProgress(steps_done, losses.loss_sum, losses.count, losses.skipped), img_per_s, seconds

    def validate(self):
        """Metrics of the current weights (the EMA weights when ema is on) on the whole validation split."""
        data = self.config.data
        loader = create_eval_loader(self.val_split, data.batch_size, self.preprocessing, self.runtime.rank,
                                    self.runtime.world, data.num_parallel_workers)
        if self.ema is None:
            return evaluate(self.eval_network, loader, data.batch_size, self.runtime.world)
        swap = [(p, e) for p, e in zip(self.ema.params, self.ema.ema)]
        saved = [p.value().copy() for p, _ in swap]
        for param, ema in swap:
            param.set_data(ema.value().copy())
        try:
            return evaluate(self.eval_network, loader, data.batch_size, self.runtime.world)
        finally:
            for (param, _), value in zip(swap, saved):
                param.set_data(value)


def _holds_training_state(path):
    return any(name.startswith(STATE_PREFIX) for name in read_checkpoint(path))


def train(config, build_loss):
    """train.py: build the run and train it; returns the final JSON line (None without a val split)."""
    return Run(config, build_loss).train()
