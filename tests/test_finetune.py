"""Fine-tuning on one's own data: a full-size D1 in the official file format, converted, then fine-tuned on
the digits at 32 px with configs/volo_d1_finetune.yaml, and asked about a digit with infer.py; fine-tuning
from any checkpoint that describes itself (a converted one, train.py's), whatever the recipe's model says."""
import json

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from conftest import EPOCHS, ROOT, STEPS, TINY_ARCH, last_json, overrides, read_ckpt, run_tool

pytestmark = pytest.mark.slow  # whole training runs: the full suite only


def official_file(path):
    """volo_d1_224 with its initial weights, saved under the official names as timm publishes them."""
    from mindcv_volo.models import create
    from mindcv_volo.weights.state import official_name

    model = create("volo_d1_224")
    save_file({official_name(p.name): p.asnumpy() for p in model.get_parameters()}, str(path))
    return path


def test_official_d1_to_the_digits(digits, tmp_path):
    converted = tmp_path / "volo_d1_224.ckpt"
    proc = run_tool("-m", "mindcv_volo.convert", "--src", official_file(tmp_path / "d1.safetensors"), "--dst",
                    converted, "--model", "volo_d1_224")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = model_of(converted)["class_names"]  # official weights: ImageNet-1k's classes
    assert len(names) == 1000 and (names[0], names[281], names[999]) == ("tench", "tabby", "toilet tissue")

    save_dir = tmp_path / "finetune"
    proc = run_tool("train.py", "-c", ROOT / "configs" / "volo_d1_finetune.yaml", "--data_dir", digits,
                    "--ckpt_path", converted, "--ckpt_save_dir", save_dir, "--image_resize", "32",
                    "--arch_overrides", "{img_size: 32}", "--epoch_size", "1", "--num_samples", "128",
                    "--batch_size", "32", "--device_target", "CPU")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resizing pos_embed from 14x14 to 2x2" in proc.stdout
    assert "class count differs from the model's" in proc.stdout  # 1000 -> 10: new heads
    assert last_json(proc.stdout)["num_samples"] == 359

    start, tuned = read_ckpt(converted), read_ckpt(next(save_dir.glob("volo_d1_224-1_4.ckpt")))
    assert tuned["head.weight"].shape == (10, 384) and tuned["aux_head.bias"].shape == (10,)
    # every other weight comes from the checkpoint: 4 AdamW steps at lr <= 1e-4 move it by little (the
    # BatchNorm statistics follow the digits)
    body = [name for name in start if not name.startswith(("head.", "aux_head.", "pos_embed")) and "moving_" not in name]
    assert max(float(np.abs(tuned[name] - start[name]).max()) for name in body) < 1e-3
    assert tuned["pos_embed"].shape == (1, 2, 2, 384)

    # the fine-tuned checkpoint names its classes (the digit folders) for infer.py
    picture = next((digits / "val" / "7").iterdir())
    proc = run_tool("infer.py", "--ckpt_path", next(save_dir.glob("*.ckpt")), "--image_path", picture)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["image"] == str(picture) and len(answer["top5"]) == 5
    assert {name for name, _ in answer["top5"]} <= {str(d) for d in range(10)}
    probabilities = [p for _, p in answer["top5"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0.5 <= sum(probabilities) <= 1 + 1e-5


def model_of(path):
    """The description a checkpoint holds of its model."""
    from mindcv_volo.weights.checkpoint import read_description

    return read_description(str(path))


FINETUNE = ROOT / "configs" / "volo_d1_finetune.yaml"  # volo_d1_224 at 224 px: neither checkpoint's model


def test_official_style_weights_to_three_classes(converted, shapes, tmp_path):
    """A converted official-format checkpoint (a D1-like VOLO at 64 px, 10 classes) -> 3 class folders: the
    recipe's model and size yield to the checkpoint's; the heads are rebuilt for the folders."""
    save_dir = tmp_path / "finetune"
    proc = run_tool("train.py", "-c", FINETUNE, "--data_dir", shapes, "--ckpt_path", converted["d1like_safetensors"],
                    "--ckpt_save_dir", save_dir, "--epoch_size", "1", "--num_samples", "16", "--batch_size", "8",
                    "--device_target", "CPU")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arch = {key: value for key, value in overrides("tiny_d1like_64", 64).items() if key != "num_classes"}
    assert "class count differs from the model's" in proc.stdout and "resizing pos_embed" not in proc.stdout
    described = model_of(next(save_dir.glob("volo_d1_224-1_2.ckpt")))
    assert (described["model"], described["num_classes"], described["class_names"]) == (
        "volo_d1_224", 3, ["circle", "square", "stripes"])
    assert described["arch_overrides"] == arch and described["preprocessing"]["size"] == 64
    tuned, start = read_ckpt(next(save_dir.glob("*.ckpt"))), read_ckpt(converted["d1like_safetensors"])
    assert tuned["head.weight"].shape == (3, 64) and tuned["pos_embed"].shape == start["pos_embed"].shape
    saved = yaml.safe_load((save_dir / "config.yaml").read_text())
    assert (saved["arch_overrides"], saved["image_resize"], saved["num_classes"]) == (arch, 64, 3)


def test_own_checkpoint_to_data_of_another_class_count(reference, digits, tmp_path):
    """train.py's checkpoint (the tiny VOLO at 32 px, 3 shapes) -> the 10 digits with a recipe of another
    model and size: the checkpoint's model at its size, a 10-class head named by the digit folders."""
    _, ckpt_dir, _ = reference
    start = ckpt_dir / f"volo_d1_224-{EPOCHS}_{STEPS}.ckpt"
    save_dir = tmp_path / "finetune"
    proc = run_tool("train.py", "-c", FINETUNE, "--data_dir", digits, "--ckpt_path", start, "--ckpt_save_dir",
                    save_dir, "--epoch_size", "1", "--num_samples", "64", "--batch_size", "32", "--device_target",
                    "CPU")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"model from {start}: volo_d1_224, arch_overrides {json.dumps(TINY_ARCH, sort_keys=True)}, "
            "image_resize 32") in proc.stdout
    assert last_json(proc.stdout)["num_samples"] == 359
    tuned = next(save_dir.glob("volo_d1_224-1_2.ckpt"))
    described = model_of(tuned)
    assert described["arch_overrides"] == TINY_ARCH and described["num_classes"] == 10
    assert described["class_names"] == [str(digit) for digit in range(10)]
    weights, before = read_ckpt(tuned), read_ckpt(start)
    assert weights["head.weight"].shape == (10, 32) and weights["aux_head.weight"].shape == (10, 32)
    assert weights["pos_embed"].shape == before["pos_embed"].shape == (1, 2, 2, 32)


def test_options_that_contradict_the_checkpoint_are_one_line(converted, shapes, tmp_path):
    path = converted["d1like_safetensors"]
    proc = run_tool("train.py", "-c", FINETUNE, "--data_dir", shapes, "--ckpt_path", path, "--ckpt_save_dir",
                    tmp_path / "ckpt", "--arch_overrides", "{layers: [1, 1, 1, 1]}", "--device_target", "CPU")
    assert proc.returncode == 2 and not (tmp_path / "ckpt").exists()
    holds = ('volo_d1_224 with arch_overrides {"embed_dims": [32, 64, 64, 64], "img_size": 64, "layers": [2, 1, 2, 1], '
             '"num_heads": [2, 4, 4, 4]}')
    fitting = ("--model volo_d1_224 --arch_overrides '{\"embed_dims\": [32, 64, 64, 64], \"img_size\": 64, \"layers\": "
               "[2, 1, 2, 1], \"num_heads\": [2, 4, 4, 4]}'")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {path} holds {holds} (10 classes), not what the command line's --arch_overrides asks for: drop "
        f"--arch_overrides to use the checkpoint's model, or pass {fitting}")
    # evaluating, the class count must fit too
    proc = run_tool("validate.py", "--ckpt_path", path, "--data_dir", shapes, "--num_classes", "3", "--model",
                    "volo_d1", "--device_target", "CPU")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {path} holds {holds} (10 classes), not what the command line's --num_classes asks for: drop "
        f"--num_classes to use the checkpoint's model, or pass {fitting} --num_classes 10")
