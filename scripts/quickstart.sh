#!/usr/bin/env bash
# Quick start: install, write scikit-learn's digits as an ImageFolder set, train a small VOLO on the CPU.
# The last line printed is the validation JSON: {"model", "top1", "top5", "loss", "num_samples", "img_per_s"}.
# Extra arguments go to train.py (e.g. --epoch_size 5). The install includes the test suite's needs, so the
# README's second command (python -m pytest -q tests) runs right after.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test]"
python -m mindcv_volo.digits --out ./digits
python train.py -c configs/quickstart_cpu.yaml "$@"
