"""Fine-tuning on one's own data: a full-size D1 in the official file format, converted, then fine-tuned on
the digits at 32 px with configs/volo_d1_finetune.yaml, and asked about a digit with infer.py."""
import json

import numpy as np
from safetensors.numpy import save_file

from conftest import ROOT, last_json, read_ckpt, run_tool


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
