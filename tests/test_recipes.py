"""The recipes in configs/: each parses, names a registered model, says what it reproduces, follows the paper."""
import glob
import os

import pytest

from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.loop import learning_rates
from mindcv_volo.models import MODEL_NAMES, VARIANTS
from train_helpers import ROOT

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
    text = open(path, encoding="utf-8").read()
    header = text.split("\n\n")[0]
    assert header.startswith("# ") and "Global batch" in header and "lr" in header
    args = parse_config(["-c", path])
    assert args.model in MODEL_NAMES and not args.distribute
    if "quickstart" in path:
        return
    arch, size = VARIANTS[args.model]["arch"], VARIANTS[args.model]["img_size"]
    assert args.image_resize == size and args.opt == "adamw" and args.label_smoothing == 0.1
    assert (args.auto_augment, args.re_prob, args.amp_level, args.loss_scale_type) == (
        "randaug-m9-mstd0.5-inc1", 0.25, "O2", "dynamic")
    global_batch = 8 * args.batch_size * args.gradient_accumulation_steps
    assert f"= {global_batch}" in header
    # Token labeling with MixToken, as the paper; mixup/cutmix off (MixToken replaces them).
    assert (args.loss, args.mix_token, args.cls_weight, args.dense_weight, args.mixup, args.cutmix) == (
        "token_label", True, 1.0, 0.5, 0.0, 0.0)
    # Pre-training reads a teacher's label maps; fine-tuning uses the image labels (ground-truth mode).
    assert bool(args.token_label_dir) != ("finetune" in path)
    if "finetune" in path:
        assert (args.lr, args.min_lr, args.epoch_size, args.weight_decay, args.warmup_epochs) == (
            8e-6, 4e-6, 30, 1e-8, 5)
        assert args.ckpt_path.endswith(".ckpt") and "_224" in args.ckpt_path
    else:
        assert size == 224 and global_batch == 1024 and (args.lr, args.drop_path_rate) == PAPER[arch]
        assert (args.weight_decay, args.warmup_epochs, args.epoch_size, args.cooldown_epochs, args.min_lr) == (
            0.05, 20, 310, 10, 1e-5)
        lrs = learning_rates(args, updates_per_epoch=10)
        assert len(lrs) == 3100 and lrs[0] == pytest.approx(1e-6) and max(lrs) == pytest.approx(args.lr, rel=1e-3)
        assert lrs[-100:] == [1e-5] * 100  # the 10 cooldown epochs at min_lr
