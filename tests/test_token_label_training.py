"""Token labeling in train.py: MixToken with image labels, and relabel -> train on the digits end to end."""
import json
import os

import numpy as np
import pytest

from conftest import TINY_ARCH, last_json, make_image_folder, max_difference, read_ckpt, run_tool, tiny_config

pytestmark = pytest.mark.slow  # whole training runs: the full suite only


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("shapes"), {"train": 16, "val": 4})


def test_mixtoken_with_image_labels_trains_and_validates(shapes, tmp_path):
    """MixToken reaches the step: with every other input drawn from the seed, only the mixing differs.
    At 64 px (a 4 x 4 token grid) seed 7's first box covers 4 tokens; at 32 px both steps' boxes are empty."""
    finals = {}
    for mix in (True, False):
        config = tiny_config(tmp_path / f"mix{mix}.yaml", shapes, tmp_path / f"mix{mix}", loss="token_label",
                             mix_token=mix, epoch_size=1, batch_size=8, arch_overrides={**TINY_ARCH, "img_size": 64},
                             image_resize=64)
        proc = run_tool("train.py", "-c", config)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        result = last_json(proc.stdout)
        # top-1 over the 12 validation images, printed to 6 decimals, is a whole count of them
        assert result["num_samples"] == 12 and abs(result["top1"] * 12 - round(result["top1"] * 12)) < 1e-4
        assert np.isfinite(result["loss"])
        finals[mix] = read_ckpt(next((tmp_path / f"mix{mix}").glob("*.ckpt")))
    trained = [k for k in finals[True] if not k.startswith("train_state.")]
    assert max_difference({k: finals[True][k] for k in trained}, {k: finals[False][k] for k in trained}) > 1e-4


def test_token_labels_refuse_mixup(shapes, tmp_path):
    config = tiny_config(tmp_path / "recipe.yaml", shapes, tmp_path / "ckpt", loss="token_label", mixup=0.8)
    proc = run_tool("train.py", "-c", config)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("error: loss token_label mixes with MixToken (mix_token) instead of mixup/cutmix; set mixup 0 and "
            "cutmix 0") in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_relabel_then_train_on_the_digits(tmp_path):
    """The quick-start recipe trains a teacher, the teacher relabels the digits, a student learns from the maps."""
    digits = tmp_path / "digits"
    assert run_tool("-m", "mindcv_volo.digits", "--out", digits).returncode == 0
    teacher_dir = tmp_path / "teacher"
    proc = run_tool("train.py", "-c", "configs/quickstart_cpu.yaml", "--data_dir", digits,
                      "--ckpt_save_dir", teacher_dir, "--epoch_size", "2", "--warmup_epochs", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    teacher_top1 = last_json(proc.stdout)["top1"]
    teacher_ckpt = sorted(teacher_dir.glob("*.ckpt"))[-1]

    maps = tmp_path / "maps"
    arch = {"layers": [1, 1, 1, 1], "embed_dims": [32, 64, 64, 64], "num_heads": [2, 4, 4, 4], "mlp_ratio": 2.0,
            "stem_hidden_dim": 16, "img_size": 32}
    relabel = run_tool("-m", "mindcv_volo.relabel", "--teacher", "volo_d1_224", "--ckpt", teacher_ckpt,
                       "--data_dir", digits, "--out", maps, "--top-k", "3", "--batch-size", "64",
                       "--arch-overrides", json.dumps(arch))
    assert relabel.returncode == 0, relabel.stderr[-2000:]
    assert len(list(maps.rglob("*.npz"))) == sum(len(files) for _, _, files in os.walk(digits / "train"))

    proc = run_tool("train.py", "-c", "configs/quickstart_cpu.yaml", "--data_dir", digits,
                      "--ckpt_save_dir", tmp_path / "student", "--epoch_size", "2", "--warmup_epochs", "1",
                      "--loss", "token_label", "--mix_token", "True", "--token_label_dir", maps)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    student = last_json(proc.stdout)
    assert student["num_samples"] == 359
    # Two epochs from the teacher's maps: far above chance (0.1), in the teacher's range.
    assert student["top1"] > 0.5 and student["top1"] > teacher_top1 - 0.3, (student, teacher_top1)
