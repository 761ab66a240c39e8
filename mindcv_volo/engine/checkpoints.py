"""Training checkpoints: model weights under their own names, the rest under prefixes, pruned, resumable.

A file `<model>-<epoch>_<step>.ckpt` in ckpt_save_dir (MindSpore's naming: the epoch it belongs to, the
steps of it done; an epoch's last checkpoint says its steps per epoch) holds
  * the model's parameters and BatchNorm statistics under their plain names (validate.py and
    create_model(checkpoint_path=...) read it as any weights file),
  * `ema.<name>`: the EMA weights (when ema is on),
  * `optimizer.<name>`: the optimizer's state (moments, step counter),
  * `train_state.<name>`: epochs completed, the steps done of the epoch in progress (0 at an epoch's end;
    a run stopped by a signal or a data error, and the periodic checkpoints (`PeriodicCheckpoints`), save
    mid-epoch), the training loss of those steps (sum, count, skipped),
    global update step, loss scale and its good-step counter, steps per epoch, and the validation top-1
    when known.
Each file is written to a temporary name and renamed (`weights.save_checkpoint`), so a kill during a save
leaves the previous files intact and never a partial latest one. A run removes only files it wrote (pruning);
a fresh run refuses a folder holding another run's checkpoints of its model unless told to overwrite them.
The folder is listed once before a run (`earlier_checkpoints`): --resume continues from the latest of them
(or from ckpt_path), reading that file once (`CheckpointKeeper.resume`).
"""
import hashlib
import logging
import os
import re
import time
from typing import NamedTuple

import mindspore as ms
import numpy as np

from ..errors import UserError
from ..weights.checkpoint import (EMA_PREFIX, OPTIMIZER_PREFIX, STATE_PREFIX, model_entries, read_checkpoint,
                                  save_checkpoint)
from ..weights.state import check_state

logger = logging.getLogger("mindcv_volo")

_NAME = re.compile(r"^(?P<model>.+)-(?P<epoch>\d+)_(?P<steps>\d+)\.ckpt$")


def checkpoint_name(model_name, epoch, step):
    """`epoch`: the epoch (from 1) the checkpoint belongs to; `step`: its steps done (all: the epoch's end)."""
    return f"{model_name}-{epoch}_{step}.ckpt"


def list_checkpoints(folder, model_name):
    """[(epoch, step, path)] of this model's checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        match = _NAME.match(entry)
        if match and match.group("model") == model_name:
            found.append((int(match.group("epoch")), int(match.group("steps")), os.path.join(folder, entry)))
    return sorted(found)


def earlier_checkpoints(checkpoint_options, model_name):
    """[(epoch, step, path)] of this model's checkpoints in ckpt_save_dir before the run: --resume continues
    from them; a fresh run refuses them unless told to overwrite them (then `CheckpointKeeper.discard`)."""
    ckpt = checkpoint_options
    if ckpt.ckpt_save_policy == "top_k" and not ckpt.val_while_train:
        raise UserError("ckpt_save_policy top_k ranks checkpoints by validation top-1: turn on val_while_train")
    found = list_checkpoints(ckpt.ckpt_save_dir, model_name)
    if found and not ckpt.resume and not ckpt.overwrite:
        raise UserError(f"{ckpt.ckpt_save_dir} holds {len(found)} checkpoint(s) of an earlier run of "
                        f"{model_name} (latest {os.path.basename(found[-1][2])}); continue that run "
                        "with --resume True, write this one elsewhere with --ckpt_save_dir DIR, or replace "
                        "them with --overwrite True")
    return found


def optimizer_state(optimizer, model_params):
    """{name: Parameter} of the optimizer's own state (not the model's weights it updates)."""
    own = {id(p) for p in model_params}
    state = {}
    for param in optimizer.get_parameters():
        if id(param) not in own:
            state[param.name] = param
    return state


class CheckpointKeeper:
    """Writes, prunes and restores training checkpoints for one run."""

    def __init__(self, folder, model_name, model_params, optimizer, state_cell, ema, keep_max, policy="latest_k",
                 description=None):
        """`model_params`: (name, Parameter) pairs of the model; `ema.ema` in the same order; `description`:
        what every checkpoint says of its model (model_spec.ModelSpec.describe)."""
        self.folder = folder
        self.model_name = model_name
        self.model_params = dict(model_params)  # (name, Parameter) pairs named before any wrapping
        self.optimizer_params = optimizer_state(optimizer, self.model_params.values())
        self.state_cell = state_cell
        self.ema_params = dict(zip(self.model_params, ema.ema)) if ema is not None else {}
        self.keep_max = keep_max
        self.policy = policy
        self.scores = {}  # path -> validation top-1, for the top_k policy
        self.last_saved = None
        self.description = description

    def entries(self, epoch, global_step, steps_per_epoch, val_top1=None, progress=None):
        """`progress`: an EpochProgress of the epoch in progress (None: `epoch` epochs are complete)."""
        progress = progress or EpochProgress()
        entries = {name: p.value() for name, p in self.model_params.items()}
        entries.update({EMA_PREFIX + name: p.value() for name, p in self.ema_params.items()})
        entries.update({OPTIMIZER_PREFIX + name: p.value() for name, p in self.optimizer_params.items()})
        train_state = {"epoch": np.int64(epoch), "global_step": np.int64(global_step),
                       "steps_per_epoch": np.int64(steps_per_epoch), "epoch_step": np.int64(progress.steps),
                       "epoch_loss_sum": np.float64(progress.loss_sum), "epoch_losses": np.int64(progress.losses),
                       "epoch_skipped": np.int64(progress.skipped),
                       "loss_scale": self.state_cell.loss_scale.value(),
                       "good_steps": self.state_cell.good_steps.value()}
        if val_top1 is not None:
            train_state["val_top1"] = np.float32(val_top1)
        entries.update({STATE_PREFIX + name: value for name, value in train_state.items()})
        return entries

    def fingerprint(self):
        """sha256 (16 hex digits) of the model's parameters and statistics, in name order."""
        digest = hashlib.sha256()
        for name in sorted(self.model_params):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.model_params[name].asnumpy()).tobytes())
        return digest.hexdigest()[:16]

    def path(self, epoch, steps_per_epoch, progress=None):
        """The checkpoint after `epoch` complete epochs (and `progress` of the next one, if given)."""
        name = (checkpoint_name(self.model_name, epoch + 1, progress.steps) if progress is not None
                else checkpoint_name(self.model_name, epoch, steps_per_epoch))
        return os.path.join(self.folder, name)

    def save(self, epoch, global_step, steps_per_epoch, val_top1=None, progress=None):
        """Write a checkpoint after `epoch` complete epochs (and `progress` of the next one, if given)."""
        path = self.path(epoch, steps_per_epoch, progress)
        save_checkpoint(self.entries(epoch, global_step, steps_per_epoch, val_top1, progress), path,
                        self.description)
        self.scores[path] = val_top1
        self.last_saved = path
        logger.info("saved %s", path)
        self.prune()
        return path

    def discard(self, found):
        """Remove `found`, the checkpoints of an earlier run of this model (a fresh run told to overwrite them),
        or a later --resume (and the pruning) would take the earlier run's files for this run's."""
        for _, _, path in found:
            os.remove(path)
            logger.info("removed %s of an earlier run (overwrite is on)", path)

    def prune(self):
        saved = [path for _, _, path in list_checkpoints(self.folder, self.model_name)]
        if self.policy is None or len(saved) <= self.keep_max:  # policy null: every checkpoint stays
            return
        latest = saved[-1]
        if self.policy == "top_k":
            # The latest always stays (resume needs it); the others by validation top-1, best first.
            others = sorted(saved[:-1], key=lambda p: -(self.scores.get(p) or _saved_top1(p)))
            keep = set(others[:self.keep_max - 1]) | {latest}
        else:
            keep = set(saved[-self.keep_max:])
        for path in saved:
            if path not in keep:
                os.remove(path)
                logger.info("removed %s (keep_checkpoint_max %d)", path, self.keep_max)

    def resume(self, found, path, steps_per_epoch, epochs):
        """Restore the training checkpoint to continue from: `path` (ckpt_path) when it holds training state,
        else the latest of `found` (`earlier_checkpoints`), each read once. Returns the Start it continues from
        (epoch 1 when there is none); `epochs`: the run's, for the log."""
        state = read_checkpoint(path) if path else None
        if state is not None and found and not _section(state, STATE_PREFIX):
            # A weights-only ckpt_path is this run's starting point (fine-tuning): continue from its checkpoints.
            logger.info("resume: %s is the starting point of the run (weights only); continuing from %s", path,
                        self.folder)
            state = None
        if state is None:
            if not found:
                logger.info("resume: no checkpoint of %s in %s, starting from epoch 1", self.model_name, self.folder)
                return Start()
            path = found[-1][2]
            state = read_checkpoint(path)
        train_state = self.restore(state, path)
        if train_state["steps_per_epoch"] != steps_per_epoch:
            raise UserError(f"{path} was saved with {train_state['steps_per_epoch']} steps per epoch, this run has "
                            f"{steps_per_epoch} (other batch_size, device count or data?); resume with the same setup")
        progress = EpochProgress(int(train_state.get("epoch_step", 0)), float(train_state.get("epoch_loss_sum", 0.0)),
                                 int(train_state.get("epoch_losses", 0)), int(train_state.get("epoch_skipped", 0)))
        epoch = int(train_state["epoch"])
        logger.info("resumed from %s: %d of %d epochs done%s, global step %d", path, epoch, epochs,
                    f", epoch {epoch + 1} at step {progress.steps}/{steps_per_epoch}" if progress.steps else "",
                    train_state["global_step"])
        return Start(epoch, int(train_state["global_step"]), progress)

    def restore(self, state, path):
        """Load a training checkpoint's entries (`state`, read from `path`) into model, optimizer, EMA and step
        state; returns its train_state."""
        train_state = _section(state, STATE_PREFIX)
        if "epoch" not in train_state:
            raise UserError(f"{path} holds no training state (train_state.*): it is a weights-only checkpoint; "
                            "start from its weights with --ckpt_path and without --resume")
        _assign(self.model_params, model_entries(state), path, strict=True)
        sections = [(EMA_PREFIX, self.ema_params, "ema"), (OPTIMIZER_PREFIX, self.optimizer_params, "optimizer")]
        for prefix, params, what in sections:
            values = _section(state, prefix)
            if params and set(values) != set(params):
                raise UserError(f"{path} does not hold the {what} state of this run (another optimizer, ema "
                                f"setting or model?); resume with the same recipe, or start afresh without --resume")
            _assign(params, values, path)
        ms_state = self.state_cell
        ms_state.loss_scale.set_data(ms.Tensor(train_state["loss_scale"], ms.float32))
        ms_state.good_steps.set_data(ms.Tensor(train_state["good_steps"], ms.int32))
        return {k: v.item() for k, v in train_state.items()}


class PeriodicCheckpoints:
    """When to write a checkpoint in the middle of an epoch (the loop asks after each optimizer update).

    `every_steps`: once a multiple of it is passed, counting the steps of the whole run (epoch x steps per
    epoch + step): a function of the position alone, so every rank, and a resumed run, saves at the same
    updates. `every_minutes`: since the last checkpoint by rank 0's clock; the ranks' clocks differ, so rank 0's
    verdict is all-reduced with the stop requests (`StopRequests.agreed_with_clock`) and every rank saves after
    the same update. 0 turns either off.
    """

    def __init__(self, every_steps, every_minutes, steps_per_epoch, accumulation):
        self.every_steps, self.seconds = every_steps, every_minutes * 60
        self.steps_per_epoch, self.accumulation = steps_per_epoch, accumulation
        self.last_saved = time.monotonic()

    def steps_due(self, epoch, step):
        """After the update that ends micro-step `step` (from 0) of `epoch` (from 0)."""
        if not self.every_steps:
            return False
        done = epoch * self.steps_per_epoch + step + 1
        return done // self.every_steps > (done - self.accumulation) // self.every_steps

    def clock_due(self):
        return bool(self.seconds) and time.monotonic() - self.last_saved >= self.seconds

    def saved(self):
        self.last_saved = time.monotonic()


class EpochProgress(NamedTuple):
    """How far the epoch in progress got: micro-steps done, and its training loss so far (the sum and count
    of the finite losses, the steps skipped), so a resumed epoch reports what an uninterrupted one does."""
    steps: int = 0
    loss_sum: float = 0.0
    losses: int = 0
    skipped: int = 0


class Start(NamedTuple):
    """Where a run starts: epochs done, global update step, and how far the epoch in progress got."""
    epoch: int = 0
    global_step: int = 0
    progress: EpochProgress = EpochProgress()


def _section(state, prefix):
    """The entries of `state` under `prefix`, by their names without it."""
    return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}


def _saved_top1(path):
    try:
        return float(read_checkpoint(path).get(STATE_PREFIX + "val_top1", -1.0))
    except UserError:
        return -1.0


def _assign(params, values, path, strict=False):
    """Copy `values` into `params` ({name: Parameter}); `strict`: `values` holds these names and no other."""
    if strict:
        check_state({name: tuple(param.shape) for name, param in params.items()}, values, path)
    for name, param in params.items():
        value = values[name]
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{path}: {name} has shape {tuple(value.shape)}, the run needs {tuple(param.shape)}")
        param.set_data(ms.Tensor(value, param.dtype))
