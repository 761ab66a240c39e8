"""Classify pictures: `python infer.py --ckpt_path X.ckpt --image_path PICTURE_OR_FOLDER` (one JSON line each)."""
import os

# Before MindSpore is imported: its C++ log lines would bury the output and an error's one line.
os.environ.setdefault("GLOG_v", "4")

from mindcv_volo.cli import main  # noqa: E402

if __name__ == "__main__":
    main("infer")
