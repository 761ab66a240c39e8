"""Entry points of train.py and validate.py: quiet MindSpore logs, one-line errors, a clean exit."""
import os
import sys


def main(kind, argv=None):
    from .engine.config import parse_config
    from .errors import run_cli

    def run(argv):
        if kind == "train":
            args = parse_config(argv, "Train VOLO (MindCV option names; YAML defaults, command-line overrides)")
            from .engine.loop import train

            return train(args)
        args = parse_config(argv, "Evaluate a VOLO checkpoint; the last stdout line is one JSON object")
        from .engine.evaluate import validate

        return validate(args)

    code = 0
    try:
        run_cli(run, argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("MS_ROLE"):
        # Under msrun the workers must leave the cluster through MindSpore's exit handlers.
        sys.exit(code)
    # MindSpore's Cell.__del__ prints "Exception ignored ..." tracebacks at interpreter exit: skip that teardown.
    os._exit(code)
