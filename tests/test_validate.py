"""validate.py: the JSON line, from a recipe or from --model/--data_dir, plain or EMA weights."""
import pytest

from train_helpers import TINY_ARCH, last_json, make_image_folder, run_script, tiny_config

FIELDS = ["model", "top1", "top5", "loss", "num_samples", "img_per_s"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for two epochs with EMA; (config, checkpoint, data, train.py's JSON)."""
    root = tmp_path_factory.mktemp("validate")
    data = make_image_folder(root / "data", {"train": 8, "val": 5})
    config = tiny_config(root / "recipe.yaml", data, root / "ckpt", batch_size=4, ema=True, ema_decay=0.5,
                         epoch_size=2, lr=3e-3)
    proc = run_script("train.py", "-c", config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config, root / "ckpt" / "volo_d1_224-2_6.ckpt", data, last_json(proc.stdout)


def test_validate_from_the_recipe_matches_train(trained):
    config, ckpt, _, train_result = trained
    proc = run_script("validate.py", "-c", config, "--ckpt_path", ckpt, "--ema", "True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert list(result) == FIELDS
    assert result["num_samples"] == 15 and result["model"] == "volo_d1_224"
    # train.py evaluates the EMA weights when ema is on: the same numbers as validate.py --ema True.
    assert (result["top1"], result["top5"], result["num_samples"]) == (
        train_result["top1"], train_result["top5"], train_result["num_samples"])
    assert result["loss"] == pytest.approx(train_result["loss"], abs=1e-5)
    assert "eval 4/4 batches" in proc.stdout  # progress


def test_validate_by_model_name_on_another_split(trained):
    _, ckpt, data, _ = trained
    import json

    proc = run_script("validate.py", "--model", "volo_d1_224", "--ckpt_path", ckpt, "--data_dir", data,
                      "--split", "train", "--num_classes", "3", "--crop_pct", "1.0", "--batch_size", "5",
                      "--arch_overrides", json.dumps(TINY_ARCH))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert list(result) == FIELDS and result["num_samples"] == 24
    assert 0 <= result["top1"] <= result["top5"] == 1.0 and result["loss"] > 0 and result["img_per_s"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith('{"model": "volo_d1_224", "top1": ')
