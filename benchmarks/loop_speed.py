"""train.py's loop against the compiled step it runs: does feeding, logging and bookkeeping cost throughput?

Two sides, each in a fresh process, on a synthetic ImageFolder (random-noise JPEGs at the model's size, two
classes) under one recipe (default: configs/volo_d1_ascend.yaml with its RandAugment, random erasing, drop
path, MixToken; token labels from the ground truth, float32, batch 8):
  * step: `engine.loop.Run` builds what train.py builds; its update step is called on one batch of the loader,
    warmed up until the time settles (`_common.warm_up`), then `--iters` timed calls;
  * loop: `python train.py` for one epoch of `--steps` steps; img/s from its log lines (every
    `--log_interval` steps), the median of the intervals after the first `--skip_steps` steps.

  python benchmarks/loop_speed.py                         # volo_d1_224, batch 8, 224 px, 60 steps
  python benchmarks/loop_speed.py --steps 40 --recipe configs/quickstart_cpu.yaml
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _common  # noqa: E402

CLASSES = 2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_option(parser, "recipe", default=os.path.join(ROOT, "configs", "volo_d1_ascend.yaml"))
    _common.add_option(parser, "batch_size", type=int, default=8)
    _common.add_option(parser, "steps", type=int, default=60, help="steps of the loop's epoch")
    _common.add_option(parser, "skip_steps", type=int, default=20, help="loop steps left out as warm-up")
    _common.add_option(parser, "log_interval", type=int, default=5)
    _common.add_option(parser, "warmup", type=_common.warmup_count, default="auto")
    _common.add_option(parser, "iters", type=int, default=10)
    _common.add_option(parser, "num_parallel_workers", type=int, default=2)
    return parser.parse_args()


def make_folder(root, images, size):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(images):
        folder = os.path.join(root, "train", f"class{index % CLASSES}")
        os.makedirs(folder, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def recipe_options(args, data_dir, ckpt_dir):
    """The recipe's command line for this measurement: the synthetic data, float32, one epoch, no validation."""
    return ["-c", args.recipe, "--data_dir", data_dir, "--ckpt_save_dir", ckpt_dir, "--num_classes", str(CLASSES),
            "--batch_size", str(args.batch_size), "--epoch_size", "1", "--warmup_epochs", "0",
            "--cooldown_epochs", "0", "--device_target", "CPU", "--amp_level", "O0", "--token_label_dir", "",
            "--val_split", "none", "--val_while_train", "False", "--log_interval", str(args.log_interval),
            "--num_parallel_workers", str(args.num_parallel_workers)]


# The step side, run by a fresh python: train.py's own Run, its update step on one loader batch.
STEP_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import _common
from mindcv_volo.cli import loss_builder
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.loop import Run
from mindcv_volo.engine.data import create_train_loader

warmup, iters, argv = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
config = parse_config(argv, "train")
run = Run(config, loss_builder(config.loss.loss))
make_loader = getattr(run.training.loss_network, "create_train_loader", create_train_loader)
batch = next(iter(make_loader(run.train_split, 0, run.steps, config.data, config.augmentation,
                              run.spec.num_classes, config.system.seed, run.runtime, 0)))
inputs = run.training.loss_network.step_inputs(batch, 0, 0)
step = lambda: run.training.update_step(*inputs)[0].asnumpy()
record = _common.measure(step, dict(side="step", batch_size=config.data.batch_size, warmup=warmup, iters=iters))
print(_common.RESULT_PREFIX + json.dumps(record), flush=True)
"""


def measure_step(args, options):
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, HERE, json.dumps(args.warmup), str(args.iters),
                           *options], cwd=ROOT, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_common.RESULT_PREFIX):
            return json.loads(line[len(_common.RESULT_PREFIX):])
    raise SystemExit(f"the step side failed: {(proc.stderr or proc.stdout)[-2000:]}")


def measure_loop(args, options):
    proc = subprocess.run([sys.executable, "train.py", *options], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed: {(proc.stderr or proc.stdout)[-2000:]}")
    rates = [(int(step), float(rate)) for step, rate in
             re.findall(r"step (\d+)/\d+ loss .* img/s ([0-9.]+)", proc.stdout + proc.stderr)]
    kept = [rate for step, rate in rates if step > args.skip_steps]
    if not kept:
        raise SystemExit(f"train.py logged no interval after step {args.skip_steps}: raise --steps")
    return dict(side="loop", batch_size=args.batch_size, steps=args.steps, skip_steps=args.skip_steps,
                intervals=len(kept), img_per_s=round(statistics.median(kept), 3),
                img_per_s_min=min(kept), img_per_s_max=max(kept))


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as work:
        make_folder(os.path.join(work, "data"), args.steps * args.batch_size, 224)
        data = os.path.join(work, "data")
        step = measure_step(args, recipe_options(args, data, os.path.join(work, "step")))
        print(json.dumps(step), flush=True)
        loop = measure_loop(args, recipe_options(args, data, os.path.join(work, "loop")))
        print(json.dumps(loop), flush=True)
    print(f"\nloop {loop['img_per_s']:.2f} img/s, step {step['img_per_s']:.2f} img/s: "
          f"the loop runs at {loop['img_per_s'] / step['img_per_s']:.1%} of its step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
