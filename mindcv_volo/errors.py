"""User-facing errors: one line, non-zero exit, no traceback.

A `UserError` is a mistake of the user (a wrong path, a bad option, a checkpoint that does not fit).
Command-line entry points run through `run_cli`, which prints it as one line and exits with code 2.
Anything else is a bug and keeps its traceback.
"""
import sys


class UserError(Exception):
    """A mistake of the user; the message says what is wrong, where, and what to do."""


def run_cli(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
