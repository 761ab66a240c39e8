"""Evaluate a checkpoint: `python validate.py -c CONFIG --ckpt_path X` or `--model NAME --ckpt_path X --data_dir D`."""
import os

# Before MindSpore is imported: its C++ log lines would bury the output and an error's one line (a
# data-pipeline failure logs an [ERROR] line before Python sees it). Exceptions still carry the text.
os.environ.setdefault("GLOG_v", "4")

from mindcv_volo.cli import main  # noqa: E402

if __name__ == "__main__":
    main("validate")
