"""infer.py: one JSON line per image, the model's own preprocessing, the checkpoint's class names."""
import json
import logging
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from conftest import EPOCHS, STEPS, run_tool


@pytest.fixture(scope="module")
def trained(reference):
    _, ckpt_dir, _ = reference
    return ckpt_dir / f"volo_d1_224-{EPOCHS}_{STEPS}.ckpt"


@pytest.mark.slow  # needs the session's training run
def test_top_k_of_each_image_is_the_models(trained, shapes, tmp_path):
    from mindcv_volo.engine.config import parse_config
    from mindcv_volo.engine.data import Preprocessing
    from mindcv_volo.engine.model_spec import load_model

    folder = tmp_path / "pictures"
    (folder / "nested").mkdir(parents=True)
    sources = sorted(Path(shapes).glob("val/*/00[01].png"))
    for index, source in enumerate(sources):  # 6 pictures, one in a sub-folder, as a user's would be
        Image.open(source).save(folder / ("nested" if index == 0 else "") / f"pic{index}.png")
    (folder / "notes.txt").write_text("not an image, and not read: only image suffixes are")
    proc = run_tool("infer.py", "--ckpt_path", trained, "--image_path", folder, "--top_k", "2", "--batch_size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["image"] for line in lines] == sorted(str(p) for p in folder.rglob("*.png"))

    # the same pictures through the model by hand: the checkpoint's description gives model and preprocessing
    config = parse_config([], "infer")
    model, spec, description = load_model(config.model, str(trained))
    model.set_train(False)
    assert spec.class_names == ("circle", "square", "stripes")  # the training folders' names
    prep = Preprocessing(**description["preprocessing"])
    for line in lines:
        logits = model(ms.Tensor(prep.load(line["image"])[None])).asnumpy()[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        best = np.argsort(-probabilities)[:2]
        assert [name for name, _ in line["top2"]] == [spec.class_names[i] for i in best]
        np.testing.assert_allclose([p for _, p in line["top2"]], probabilities[best], atol=2e-5)


@pytest.mark.slow  # needs the session's training run
def test_an_unreadable_image_is_one_error_line_and_the_others_are_classified(trained, shapes, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.open(Path(shapes) / "val" / "circle" / "000.png").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a picture")
    Image.open(Path(shapes) / "val" / "square" / "000.png").save(folder / "c.png")
    proc = run_tool("infer.py", "--ckpt_path", trained, "--image_path", folder)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: cannot read image {folder / 'b.png'}: corrupt or not an image"
    images = [json.loads(line)["image"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert images == [str(folder / "a.png"), str(folder / "c.png")]


def test_unnamed_classes_are_indices_never_imagenet(caplog):
    from mindcv_volo.engine.infer import class_names
    from mindcv_volo.engine.model_spec import ModelSpec

    caplog.set_level(logging.INFO, logger="mindcv_volo")
    names = class_names(ModelSpec("volo_d1_224", 1000, {}))
    assert names[:2] == ["class_0", "class_1"] and names[999] == "class_999" and len(names) == 1000
    assert class_names(ModelSpec("volo_d1_224", 4, {}, class_names=("cat", "dog"))) == ["cat", "dog", "class_2",
                                                                                          "class_3"]
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint names none of its 1000 classes: the unnamed ones are printed as class_<index>",
        "the checkpoint names 2 of its 4 classes: the unnamed ones are printed as class_<index>"]
    caplog.clear()
    assert class_names(ModelSpec("volo_d1_224", 2, {}, class_names=("cat", "dog"))) == ["cat", "dog"]
    assert not caplog.records  # all named: nothing to say


def test_stored_names_of_fewer_classes_than_outputs_are_kept():
    """A run with num_classes larger than its folders stores the folders' names: infer.py prints them."""
    from mindcv_volo.engine.config import parse_config
    from mindcv_volo.engine.infer import class_names
    from mindcv_volo.engine.model_spec import resolve

    described = {"model": "volo_d1_224", "num_classes": 1000, "class_names": ["0", "1", "2"]}
    spec = resolve(parse_config([], "infer").model, described)
    assert spec.class_names == ("0", "1", "2") and class_names(spec)[2:4] == ["2", "class_3"]
    # a fine-tune's start point: its names are of another class count
    config = parse_config(["--num_classes", "5"], "train")
    assert resolve(config.model, described, given=config.given).class_names is None
