"""The optimizer and its learning-rate schedule: MindCV's create_scheduler and create_optimizer with the
`scheduler` and `optimizer` sections, a schedule fitted to a run shorter than its recipe's."""
import logging

from mindcv.optim import create_optimizer
from mindcv.scheduler import create_scheduler

from ..errors import UserError

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
    """One learning rate per optimizer update (MindCV's create_scheduler): warmup, the schedule, cooldown.
    Warmup starts at lr * warmup_factor, or else at warmup_lr (engine.config makes one of them set)."""
    s = scheduler_options
    warmup, decay, _ = schedule_epochs(s)
    if s.scheduler == "step_decay" and not decay:
        raise UserError("scheduler step_decay needs decay_epochs (decay every this many epochs)")
    if s.warmup_factor is not None:
        warmup_factor = s.warmup_factor
    else:
        warmup_factor = min(s.warmup_lr / s.lr, 1.0) if s.lr > 0 else 0.0
    lrs = create_scheduler(updates_per_epoch, scheduler=s.scheduler, lr=s.lr, min_lr=s.min_lr, warmup_epochs=warmup,
                           warmup_factor=warmup_factor, decay_epochs=max(decay or 1, 1), decay_rate=s.decay_rate,
                           milestones=list(s.multi_step_decay_milestones), num_epochs=s.epoch_size,
                           num_cycles=s.num_cycles, cycle_decay=s.cycle_decay, lr_epoch_stair=s.lr_epoch_stair)
    if not s.warmup_prefix and s.scheduler in COSINE and warmup:
        # timm's warmup_prefix=False (the official schedule): the cosine runs from epoch 0 over warmup + decay
        # epochs and the warmup takes the place of its first epochs, so its peak lr is never reached
        cosine = create_scheduler(updates_per_epoch, scheduler=s.scheduler, lr=s.lr, min_lr=s.min_lr, warmup_epochs=0,
                                  decay_epochs=warmup + max(decay or 1, 1), num_epochs=s.epoch_size,
                                  num_cycles=s.num_cycles, cycle_decay=s.cycle_decay, lr_epoch_stair=s.lr_epoch_stair)
        lrs = lrs[:warmup * updates_per_epoch] + cosine[warmup * updates_per_epoch:]
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
