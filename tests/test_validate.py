"""validate.py: the JSON line, from a recipe or from --model/--data_dir, plain or EMA weights."""
import ast
import json

import pytest

from conftest import EPOCHS, STEPS, TINY_ARCH, last_json, run_tool

FIELDS = ["model", "top1", "top5", "loss", "num_samples", "img_per_s"]


@pytest.fixture(scope="module")
def trained(reference, shapes):
    """The reference run's final checkpoint (EMA on); (config, checkpoint, data, train.py's JSON)."""
    proc, ckpt_dir, config = reference
    return config, ckpt_dir / f"volo_d1_224-{EPOCHS}_{STEPS}.ckpt", shapes, last_json(proc.stdout)


@pytest.mark.slow  # needs the session's training run
def test_validate_from_the_recipe_matches_train(trained):
    config, ckpt, _, train_result = trained
    proc = run_tool("validate.py", "-c", config, "--ckpt_path", ckpt, "--ema", "True")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert list(result) == FIELDS
    assert result["num_samples"] == 18 and result["model"] == "volo_d1_224"
    # train.py evaluates the EMA weights when ema is on: the same numbers as validate.py --ema True.
    assert (result["top1"], result["top5"], result["num_samples"]) == (
        train_result["top1"], train_result["top5"], train_result["num_samples"])
    assert result["loss"] == pytest.approx(train_result["loss"], abs=1e-5)
    assert "eval batches 6/6" in proc.stdout  # progress
    # before it, the metrics as MindCV's validate.py prints them (3 classes: no Top_5_Accuracy there either)
    mindcv = ast.literal_eval(proc.stdout.strip().splitlines()[-2])
    assert list(mindcv) == ["Top_1_Accuracy", "loss"]
    assert (round(mindcv["Top_1_Accuracy"], 6), round(mindcv["loss"], 6)) == (result["top1"], result["loss"])


@pytest.mark.slow  # needs the session's training run
def test_validate_by_model_name_on_another_split(trained):
    _, ckpt, data, _ = trained
    proc = run_tool("validate.py", "--model", "volo_d1_224", "--ckpt_path", ckpt, "--data_dir", data,
                      "--split", "train", "--num_classes", "3", "--crop_pct", "1.0", "--batch_size", "5",
                      "--arch_overrides", json.dumps(TINY_ARCH))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert list(result) == FIELDS and result["num_samples"] == 72
    assert 0 <= result["top1"] <= result["top5"] == 1.0 and result["loss"] > 0 and result["img_per_s"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith('{"model": "volo_d1_224", "top1": ')


def test_mindcv_metric_names():
    from mindcv_volo.engine.evaluate import mindcv_metrics

    metrics = {"top1": 0.8, "top5": 1.0, "loss": 0.53, "num_samples": 10, "img_per_s": 3.0}
    assert str(mindcv_metrics(metrics, 10)) == "{'Top_1_Accuracy': 0.8, 'Top_5_Accuracy': 1.0, 'loss': 0.53}"
    assert str(mindcv_metrics(metrics, 4)) == "{'Top_1_Accuracy': 0.8, 'loss': 0.53}"
