"""Training: run-time setup (`runtime`), the compiled step and the loss seam (`step`), checkpoints
(`checkpoints`) and the loop (`loop`: `train(args)`). Import the modules themselves; this package file
imports nothing, so `mindcv_volo.evaluate` can use `runtime` and `step` without a cycle."""
