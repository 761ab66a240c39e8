"""Relabel: a tiny VOLO teacher writes one map per image, per rank shard, resumably; errors are one line."""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from PIL import Image

from conftest import TINY_ARCH, tiny_volo
from mindcv_volo.errors import run_cli
from mindcv_volo.relabel import main
from mindcv_volo.engine.data import list_images
from mindcv_volo.token_labeling.label_maps import label_map_path
from mindcv_volo.token_labeling.relabel import TeacherTopK
from mindcv_volo.weights import load_checkpoint_into, save_checkpoint

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture
def restore_mode():
    previous = ms.get_context("mode")
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def teacher_set(tmp_path):
    """6 images (2 classes, various sizes, a dotted name) and a 5-class tiny VOLO teacher checkpoint."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (24 + 8 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / "train" / name / f"im{i}.v2.png")
    ms.set_seed(1)
    save_checkpoint({p.name: p.asnumpy() for p in tiny_volo(5).get_parameters()}, str(tmp_path / "teacher.ckpt"))
    return tmp_path


def relabel_args(root, out="maps"):
    return ["--teacher", "volo_d1_224", "--ckpt", str(root / "teacher.ckpt"), "--data_dir", str(root / "data"),
            "--out", str(root / out), "--top-k", "3", "--batch-size", "2", "--mode", "pynative",
            "--arch-overrides", json.dumps(TINY_ARCH)]


def test_relabel_shards_resumes_and_matches_the_teacher(teacher_set, monkeypatch, capsys, restore_mode):
    root = teacher_set
    items = [rel for rel, _ in list_images(str(root / "data" / "train"))]
    maps = [label_map_path(str(root / "maps"), rel) for rel in items]

    monkeypatch.setenv("RANK_ID", "1")  # rank 1 of 2 takes images 1, 3, 5
    monkeypatch.setenv("RANK_SIZE", "2")
    main(relabel_args(root))
    assert [os.path.exists(p) for p in maps] == [False, True] * 3
    first = {p: os.stat(p).st_mtime_ns for p in maps[1::2]}

    monkeypatch.delenv("RANK_ID")  # one process: takes all, skips what rank 1 wrote
    monkeypatch.delenv("RANK_SIZE")
    main(relabel_args(root))
    assert all(os.path.exists(p) for p in maps)
    assert {p: os.stat(p).st_mtime_ns for p in maps[1::2]} == first
    out = capsys.readouterr().out
    assert "3 maps written" in out and "3 skipped" in out
    main(relabel_args(root))
    assert "all 6 maps exist" in capsys.readouterr().out

    assert sorted(os.listdir(root / "maps")) == ["cat", "dog", "labelmaps.json"]
    meta = json.loads((root / "maps" / "labelmaps.json").read_text())
    assert (meta["num_classes"], meta["top_k"], meta["grid"], meta["image_size"]) == (5, 3, [2, 2], 32)
    for path in maps:
        with np.load(path) as data:
            assert data["indices"].shape == data["scores"].shape == (2, 2, 3)
            assert data["indices"].dtype == np.int16 and data["scores"].dtype == np.float16
            assert data["num_classes"] == 5 and (np.diff(data["scores"].astype(np.float32), axis=-1) <= 0).all()

    # The teacher by hand on image 4 (dog/im1.v2.png, 32 x 40): whole image to 32 x 32, bicubic, normalised.
    teacher = load_checkpoint_into(tiny_volo(5), str(root / "teacher.ckpt"))
    teacher.set_train(False)
    with Image.open(root / "data" / "train" / items[4]) as img:
        pixels = np.asarray(img.convert("RGB").resize((32, 32), Image.BICUBIC)) / 255.0
    x = ms.Tensor(((pixels - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32))
    logits = teacher.aux_head(teacher.forward_features(x)[:, 1:]).asnumpy()[0].reshape(2, 2, 5)
    with np.load(maps[4]) as data:
        np.testing.assert_array_equal(data["indices"][..., 0], logits.argmax(-1))
        np.testing.assert_array_equal(data["indices"], np.argsort(-logits, -1)[..., :3])
        np.testing.assert_allclose(data["scores"], -np.sort(-logits, -1)[..., :3], rtol=2e-3, atol=1e-3)


class ConvNet(nn.Cell):
    """A MindCV-style CNN: forward_features (B, C, H, W) and a Dense `classifier`."""

    def __init__(self, features):
        super().__init__()
        self.features = ms.Tensor(features)
        self.classifier = nn.Dense(features.shape[-1 if features.ndim == 3 else 1], 6)

    def forward_features(self, x):
        return self.features + x.sum() * 0


@pytest.mark.parametrize("layout", ["grid", "tokens", "class token + tokens"])
def test_teacher_top_k_of_other_models(layout, restore_mode):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(4)
    grid = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)  # (B, H, W, C)
    features = {"grid": grid.transpose(0, 3, 1, 2), "tokens": grid.reshape(2, 4, 4),
                "class token + tokens": np.concatenate([rng.normal(size=(2, 1, 4)), grid.reshape(2, 4, 4)],
                                                       axis=1).astype(np.float32)}[layout]
    net = ConvNet(features)
    values, indices = TeacherTopK(net, 2)(np.zeros((2, 3, 8, 8), np.float32))
    logits = grid @ net.classifier.weight.asnumpy().T + net.classifier.bias.asnumpy()
    assert values.shape == indices.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(indices, np.argsort(-logits, -1)[..., :2])
    np.testing.assert_allclose(values, -np.sort(-logits, -1)[..., :2], rtol=1e-5, atol=1e-6)


def test_user_errors_are_one_line(teacher_set, capsys, restore_mode):
    root = teacher_set
    cases = [(["--split", "val"], "image folder not found: "),
             (["--teacher", "no_such_net"], "unknown teacher 'no_such_net'"),
             (["--ckpt", str(root / "missing.ckpt")], "checkpoint not found: "),
             (["--arch-overrides", "{layers"], "--arch_overrides on the command line must be a mapping of names")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as info:
            run_cli(main, relabel_args(root) + extra)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (root / "maps").exists()
