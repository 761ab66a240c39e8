"""User-facing errors: one line, non-zero exit, no traceback.

A `UserError` is a mistake of the user (a wrong path, a bad option, a checkpoint that does not fit).
Command-line entry points run through `run_cli`, which prints it as one line and exits with code 2; an
`Interrupted` run (stopped by a signal, its state saved) is one line too, with its own exit code.
Anything else is a bug and keeps its traceback.
"""
import sys


class UserError(ValueError):
    """A mistake of the user; the message says what is wrong, where, and what to do.

    A ValueError, as Python code calling the library (e.g. `create_model`) expects for a bad argument."""


class Interrupted(Exception):
    """A run stopped on request (a signal) after saving what it needs to continue, and after logging one line
    that says where it saved and how to continue; `code` is the exit code (128 + the signal's number, as a
    shell reports it)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def run_cli(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit code 2, an Interrupted run
    (its line logged already) its exit code."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        sys.exit(stop.code)
