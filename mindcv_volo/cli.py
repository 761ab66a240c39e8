"""Entry points of train.py, validate.py and infer.py: options from the one table, quiet MindSpore logs,
one-line errors, a clean exit."""
import os
import sys


def loss_builder(name):
    """The loss seam's builder for `loss` (engine.step): token labeling, or one of MindCV's losses."""
    if name == "token_label":
        from .token_labeling.training import build_token_label_loss

        return build_token_label_loss
    from .engine.step import classification_loss

    return classification_loss


def run(command, argv):
    from .engine.config import parse_config

    config = parse_config(argv, command)
    if command == "train":
        from .engine.loop import train

        return train(config, loss_builder(config.loss.loss))
    if command == "infer":
        from .engine.infer import infer

        return infer(config)
    from .engine.evaluate import validate

    return validate(config)


def main(command, argv=None):
    from .engine.runtime import under_msrun
    from .errors import run_cli

    code = 0
    try:
        run_cli(lambda args: run(command, args), argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if under_msrun():
        # Under msrun the workers must leave the cluster through MindSpore's exit handlers.
        sys.exit(code)
    # MindSpore's Cell.__del__ prints "Exception ignored ..." tracebacks at interpreter exit: skip that teardown.
    os._exit(code)
