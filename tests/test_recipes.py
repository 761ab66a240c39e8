"""The recipes in configs/: each parses, names a registered model, says what it reproduces, follows the paper."""
import glob
import math
import os
import shutil
from types import SimpleNamespace

import pytest

from conftest import FIXTURES, ROOT, last_json, run_tool
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.optim import learning_rates
from mindcv_volo.models import MODEL_NAMES, VARIANTS
from mindcv_volo.weights.checkpoint import read_description

pytestmark = pytest.mark.slow  # whole training runs: the full suite only

RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PAPER = {"d1": (1.6e-3, 0.1), "d2": (1e-3, 0.2), "d3": (1e-3, 0.5), "d4": (1e-3, 0.5), "d5": (8e-4, 0.75)}


def test_every_recipe_is_there():
    names = {os.path.basename(p) for p in RECIPES}
    expected = {f"volo_{arch}_ascend.yaml" for arch in PAPER} | {
        "volo_d1_384_ascend_finetune.yaml", "volo_d2_384_ascend_finetune.yaml", "volo_d3_448_ascend_finetune.yaml",
        "volo_d4_448_ascend_finetune.yaml", "volo_d5_448_ascend_finetune.yaml", "volo_d5_512_ascend_finetune.yaml",
        "volo_d1_gpu.yaml", "volo_d1_384_gpu_finetune.yaml", "quickstart_cpu.yaml"}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe(path):
    config = parse_config(["-c", path])
    args = SimpleNamespace(**config.as_dict())
    assert args.model in MODEL_NAMES and not args.distribute
    if "quickstart" in path:  # run again, it retrains into its own folder
        assert args.overwrite and args.ckpt_save_dir == "./ckpt/quickstart"
        return
    if path.endswith("volo_d1_finetune.yaml"):  # one's own data: the class folders decide, heads start afresh
        assert args.num_classes is None and args.ckpt_path.endswith(".ckpt") and args.loss == "token_label"
        assert (args.lr, args.batch_size, args.image_resize) == (1e-4, 64, 224)
        return
    arch, size = VARIANTS[args.model]["arch"], VARIANTS[args.model]["img_size"]
    assert args.image_resize == size and args.opt == "adamw" and args.label_smoothing == 0.1
    assert (args.auto_augment, args.re_prob, args.amp_level, args.loss_scale_type) == (
        "randaug-m9-mstd0.5-inc1", 0.25, "O2", "dynamic")
    global_batch = 8 * args.batch_size * args.gradient_accumulation_steps
    # Token labeling with MixToken, as the paper; mixup/cutmix off (MixToken replaces them).
    assert (args.loss, args.mix_token, args.cls_weight, args.dense_weight, args.mixup, args.cutmix) == (
        "token_label", True, 1.0, 0.5, 0.0, 0.0)
    # Pre-training reads a teacher's label maps; fine-tuning uses the image labels (ground-truth mode).
    assert bool(args.token_label_dir) != ("finetune" in path)
    if "finetune" in path:
        assert (args.lr, args.min_lr, args.epoch_size, args.cooldown_epochs, args.weight_decay, args.warmup_epochs) == (
            8e-6, 4e-6, 40, 10, 1e-8, 5)
        assert args.ckpt_path.endswith(".ckpt") and "_224" in args.ckpt_path
    else:
        assert size == 224 and global_batch == 1024 and (args.lr, args.drop_path_rate) == PAPER[arch]
        assert (args.weight_decay, args.warmup_epochs, args.epoch_size, args.cooldown_epochs, args.min_lr) == (
            0.05, 20, 310, 10, 1e-5)
        lrs = learning_rates(config.scheduler, updates_per_epoch=10)
        # the official schedule (tests/test_trajectories.py checks every epoch): the warmup counts in the cosine's
        # 300 epochs, so the peak is the cosine at epoch 20, never lr itself
        peak = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * 20 / 300))
        assert len(lrs) == 3100 and lrs[0] == pytest.approx(1e-6) and max(lrs) == pytest.approx(peak, rel=1e-12)
        assert lrs[-100:] == [1e-5] * 100  # the 10 cooldown epochs at min_lr


SMOKE = ["--data_dir", "DIGITS", "--device_target", "CPU", "--image_resize", "32", "--arch_overrides", "{img_size: 32}",
         "--epoch_size", "1", "--num_samples", "256"]  # data, device, size and length: nothing else changes


def smoke_run(recipe, digits, save_dir, *extra):
    argv = [str(digits) if word == "DIGITS" else word for word in SMOKE]
    return run_tool("train.py", "-c", recipe, *argv, "--ckpt_save_dir", save_dir, *extra)


def test_mindcv_recipe_trains_unchanged(digits, tmp_path):
    """MindCV's own VOLO-D1 recipe (tests/fixtures, verbatim: num_classes 1000) trains a full-size D1 for one short
    epoch on 3 class folders: a warning says how many outputs are never trained, the checkpoint names the 3
    folders, and infer.py prints those names (the untrained outputs as class indices, never ImageNet's)."""
    data = tmp_path / "three_digits"
    for split in ("train", "val"):
        for digit in "012":
            shutil.copytree(digits / split / digit, data / split / digit)
    proc = smoke_run(FIXTURES / "mindcv_volo_d1_ascend.yaml", data, tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # what does not apply here is said once, each in one line
    for said in ("distribute is on, but this process was not started by msrun",
                 "dataset_sink_mode: the loop feeds each step from the host",
                 "color_jitter is not applied with auto_augment",
                 "amp_level O3 is for accelerators: on CPU the run computes in float32 (O0)",
                 "warning: epoch_size 1 is shorter than the recipe's schedule: warmup_epochs 20 -> 0, "
                 "decay_epochs 280 -> 1",
                 f"warning: num_classes is 1000 but {data / 'train'} has 3 class folders: 997 of the model's outputs "
                 "are never trained (set num_classes 3, or null to follow the folders)",
                 f"validating the EMA weights on {data / 'val'}"):
        assert out.count(said) == 1, said
    train_images = sum(1 for _ in (data / "train").rglob("*.png"))
    assert f"training volo_d1 on {train_images} images of 3 classes: 1 epochs x 2 steps, global batch 128" in out
    assert last_json(out)["num_samples"] == sum(1 for _ in (data / "val").rglob("*.png"))
    checkpoint = tmp_path / "ckpt" / "volo_d1-1_2.ckpt"
    assert [p.name for p in (tmp_path / "ckpt").glob("*.ckpt")] == [checkpoint.name]
    assert read_description(str(checkpoint))["class_names"] == ["0", "1", "2"]

    proc = run_tool("infer.py", "--ckpt_path", checkpoint, "--image_path", next((data / "val" / "1").iterdir()),
                    "--top_k", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the checkpoint names 3 of its 1000 classes: the unnamed ones are printed as class_<index>" in proc.stdout
    printed = [name for name, _ in last_json(proc.stdout)["top1000"]]
    assert sorted(printed) == sorted(["0", "1", "2"] + [f"class_{index}" for index in range(3, 1000)])


def test_own_recipe_smoke_run(digits, tmp_path):
    """The official D1 recipe (token labeling + MixToken, RandAugment, drop path) without its label maps."""
    proc = smoke_run(os.path.join(ROOT, "configs", "volo_d1_ascend.yaml"), digits, tmp_path / "ckpt",
                     "--token_label_dir", "", "--batch_size", "64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("warning: epoch_size 1 is shorter than the recipe's schedule: warmup_epochs 20 -> 0, cooldown_epochs "
            "10 -> 0") in proc.stdout
    assert last_json(proc.stdout)["num_samples"] == 359
