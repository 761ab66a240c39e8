"""User-facing errors (one line, exit code 2): defined in `mindcv_volo_serve.errors`, which needs no MindSpore."""
from mindcv_volo_serve.errors import Interrupted, UserError, run_cli

__all__ = ["Interrupted", "UserError", "run_cli"]
