"""train.py's loop: epochs of compiled steps, logging, validation, checkpoints, the final JSON line."""
import itertools
import logging
import math
import os
import shlex
import signal
import sys
import time

from ..errors import Interrupted, UserError
from .checkpoints import CheckpointKeeper, EpochProgress, PeriodicCheckpoints, Start, earlier_checkpoints
from .config import save_config
from .data import create_eval_loader, create_train_loader
from .evaluate import EvalNetwork, evaluate, result_line
from .metrics import MetricsLog
from .model_spec import follow_checkpoint, preprocessing, resolve
from .prepare import build_train_model, epoch_steps, log_options_that_do_not_apply, open_splits, \
    warn_what_is_not_reproduced
from .runtime import add_log_file, compile_before_first_run, describe, setup_runtime, under_msrun
from .step import build_training
from .stopping import StopRequests

logger = logging.getLogger("mindcv_volo")


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


def how_to_continue():
    return "add --resume True to the msrun command" if under_msrun() else f"run: {resume_command()}"


class DataFailure(Exception):
    """A training batch could not be read: `error` is the UserError its source raised."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def whole_updates(batches, accumulation):
    """`batches`, each optimizer update's `accumulation` batches read before the first of them is yielded: a
    batch that cannot be read (DataFailure) stops the run right after an update, never after a micro-step that
    already moved BatchNorm's statistics (a checkpoint there could not be resumed exactly)."""
    iterator = iter(batches)
    while True:
        try:
            group = list(itertools.islice(iterator, accumulation))
        except UserError as error:
            raise DataFailure(error) from None
        if not group:
            return
        yield from group


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

    def progress(self, steps):
        """The EpochProgress after `steps` steps of the epoch (the settled losses are theirs)."""
        return EpochProgress(steps, self.loss_sum, self.count, self.skipped)


class Run:
    """Everything one train.py run builds before its first step, from the parsed `config` and the loss
    builder (`engine.step`'s seam)."""

    def __init__(self, config, build_loss):
        self.runtime = setup_runtime(config.system, config.system.distribute)
        self.config = config = follow_checkpoint(config)
        ckpt = config.checkpoint
        log_options_that_do_not_apply(config)
        warn_what_is_not_reproduced(config.model)
        self.train_split, self.val_split = open_splits(config.data, ckpt.val_while_train)
        self.global_batch, self.steps, self.updates = epoch_steps(
            config.data, config.train_step.gradient_accumulation_steps, self.train_split, self.runtime.world)
        classes = self.train_split.classes
        self.spec = resolve(config.model, num_classes=len(classes), class_names=classes)
        found = earlier_checkpoints(ckpt, self.spec.name)
        self.train_split.check_num_classes(self.spec.num_classes)
        self.model = build_train_model(config.model, self.spec, config.augmentation.image_resize, ckpt.resume)
        self.preprocessing = preprocessing(self.model, self.spec, config.augmentation)
        params = [(p.name, p) for p in self.model.get_parameters()]  # named before any wrapping
        self.training = build_training(config, self.model, self.spec.num_classes, self.runtime, self.updates,
                                       build_loss)
        self.eval_network = EvalNetwork(self.training.network)
        check_inputs = getattr(self.training.loss_network, "check_inputs", None)  # e.g. a label map for every image
        if check_inputs is not None:
            check_inputs(self.train_split)
        self.keeper = CheckpointKeeper(ckpt.ckpt_save_dir, self.spec.name, params, self.training.optimizer,
                                       self.training.state, self.training.ema, ckpt.keep_checkpoint_max,
                                       ckpt.ckpt_save_policy, self.spec.describe(self.preprocessing))
        # Only now, with every input checked, does the run write anything.
        if self.runtime.is_main:
            add_log_file(os.path.join(ckpt.ckpt_save_dir, "train.log"))
        self.start = (self.keeper.resume(found, config.model.ckpt_path, self.steps, config.scheduler.epoch_size)
                      if ckpt.resume else Start())
        self.global_step = self.start.global_step
        if self.runtime.is_main and not ckpt.resume:
            self.keeper.discard(found)
        self.metrics = MetricsLog(ckpt.ckpt_save_dir, self.start.epoch) if self.runtime.is_main else None
        self.periodic = PeriodicCheckpoints(ckpt.ckpt_every_steps, ckpt.ckpt_every_minutes, self.steps,
                                            config.train_step.gradient_accumulation_steps)
        if self.runtime.is_main:
            save_config(config.replace(model=self.spec.name, num_classes=self.spec.num_classes),
                        os.path.join(ckpt.ckpt_save_dir, "config.yaml"))
        logger.info("%s, backend %s, AMP %s", describe(self.runtime, config.system.device_target == "auto"),
                    self.model.backend, self.training.amp_level)

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
            for epoch in range(self.start.epoch, epochs):
                progress = self.start.progress if epoch == self.start.epoch else EpochProgress()
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
                    lr = self.training.lrs[min(self.global_step, len(self.training.lrs)) - 1]
                    self.metrics.add(done, train_loss, lr, img_per_s, seconds, metrics)
                    if done % ckpt.ckpt_save_interval == 0 or done == epochs:
                        saved = self.keeper.save(done, self.global_step, self.steps, metrics and metrics["top1"])
                        self.periodic.saved()
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
        where = self.where(epochs_done, progress)
        path = saved
        if self.runtime.is_main and path is None:
            path = self.keeper.save(epochs_done, self.global_step, self.steps, val_top1, progress)
        stop.barrier()
        if self.runtime.is_main:
            message = f"stopped by {stop_name} after {where}: saved {path}; to continue, {how_to_continue()}"
        else:
            message = f"rank {self.runtime.rank}: stopped by {stop_name} after {where}, as every rank; rank 0 saved"
        logger.warning("%s", message)  # the one line (other ranks log warnings only)
        raise Interrupted(message, 128 + signum)

    def stop_on_data_error(self, epochs_done, progress, error):
        """A training batch could not be read (`error`, a UserError) after `epochs_done` epochs and `progress`:
        this rank writes the checkpoint of its last update (every rank holds the same state there, and the
        others cannot get past that update without this one), and the run ends with the error, where it saved
        and how to continue."""
        path = self.keeper.path(epochs_done, self.steps, progress)
        if self.keeper.last_saved != path:  # a periodic checkpoint may hold this very update
            self.keeper.save(epochs_done, self.global_step, self.steps, None, progress)
        raise UserError(f"{error}; saved {path} after {self.where(epochs_done, progress)}; to continue, "
                        f"{how_to_continue()}")

    def where(self, epochs_done, progress):
        """How far the run got: `epochs_done` epochs and `progress` (None: at the epoch's end)."""
        return (f"epoch {epochs_done + 1} step {progress.steps}/{self.steps}" if progress is not None
                else f"epoch {epochs_done}")

    def save_mid_epoch(self, epoch, losses, steps):
        """A periodic checkpoint after `steps` steps of `epoch` (rank 0 writes it)."""
        if self.runtime.is_main:
            losses.settle()
            self.keeper.save(epoch, self.global_step, self.steps, None, losses.progress(steps))
        self.periodic.saved()

    def train_epoch(self, epoch, progress, stop):
        """Train the steps of `epoch` after `progress` (EpochProgress); stops early, at an update, when every
        rank agrees on a stop request (`stop`). Returns (EpochProgress, img/s, seconds)."""
        config, training = self.config, self.training
        accumulation = config.train_step.gradient_accumulation_steps
        log_interval, epochs = config.system.log_interval, config.scheduler.epoch_size
        # A loss that needs other columns (label maps) brings its own loader; see engine.step.
        make_loader = getattr(training.loss_network, "create_train_loader", create_train_loader)
        batches = make_loader(self.train_split, epoch, self.steps, config.data, config.augmentation,
                              self.spec.num_classes, config.system.seed, self.runtime, progress.steps)
        first = progress.steps
        losses = StepLosses(progress, fail_on_overflow=not training.dynamic_scale and
                            not config.train_step.drop_overflow_update)
        steps_done = first
        epoch_start = interval_start = time.time()
        try:
            for step, batch in enumerate(whole_updates(batches, accumulation), start=first):
                applies = (step + 1) % accumulation == 0
                cell = training.update_step if applies else training.micro_step
                inputs = training.loss_network.step_inputs(batch, epoch, step)
                compile_before_first_run(cell, *inputs)
                loss, norm, overflow, scale = cell(*inputs)
                lr = training.lrs[min(self.global_step, len(training.lrs) - 1)]
                losses.add(epoch, step, lr, loss, overflow, scale)
                if applies:
                    self.global_step += 1
                self.steps_done += 1
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
                # The epoch's last step is followed by the epoch's end, which asks again (and saves).
                if applies and step + 1 < self.steps:
                    signum, clock_due = stop.agreed_with_clock(self.runtime.is_main and self.periodic.clock_due())
                    if signum:
                        break
                    if clock_due or self.periodic.steps_due(epoch, step):
                        self.save_mid_epoch(epoch, losses, step + 1)
        except DataFailure as failure:
            losses.settle()
            self.stop_on_data_error(epoch, losses.progress(steps_done), failure.error)
        losses.settle()
        seconds = time.time() - epoch_start
        img_per_s = (steps_done - first) * self.global_batch / max(seconds, 1e-9)
        if steps_done == self.steps:
            logger.info("epoch %d/%d done: train loss %.4f (rank %d's batches), %.1f s, %.1f img/s%s", epoch + 1,
                        epochs, losses.mean(), self.runtime.rank, seconds, img_per_s,
                        f", {losses.skipped} step(s) skipped" if losses.skipped else "")
        return losses.progress(steps_done), img_per_s, seconds

    def validate(self):
        """Metrics of the current weights (the EMA weights when ema is on) on the whole validation split."""
        data = self.config.data
        loader = create_eval_loader(self.val_split, data.batch_size, self.preprocessing, self.runtime.rank,
                                    self.runtime.world, data.num_parallel_workers)
        ema = self.training.ema
        logger.info("validating the %s weights on %s", "trained" if ema is None else "EMA", self.val_split.folder)
        if ema is None:
            return evaluate(self.eval_network, loader, data.batch_size, self.runtime.world)
        swap = [(p, e) for p, e in zip(ema.params, ema.ema)]
        saved = [p.value().copy() for p, _ in swap]
        for param, ema in swap:
            param.set_data(ema.value().copy())
        try:
            return evaluate(self.eval_network, loader, data.batch_size, self.runtime.world)
        finally:
            for (param, _), value in zip(swap, saved):
                param.set_data(value)


def train(config, build_loss):
    """train.py: build the run and train it; returns the final JSON line (None without a val split)."""
    return Run(config, build_loss).train()
