"""mindcv_volo_serve: the evaluation preprocessing in Pillow and numpy, equal to the MindSpore pipeline it replaced;
the ONNX runner, run where MindSpore cannot be imported, against infer.py on the same pictures."""
import io
import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import run_tool
from mindcv_volo_serve import Preprocessing, classify

pytest.importorskip("onnxruntime")

IMAGENET = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def mindspore_pipeline(preprocessing, encoded):
    """The evaluation transforms as they were written with MindSpore's vision ops (before this package):
    decode to PIL, MindSpore's Resize and CenterCrop on the PIL image, ToNumpy, Normalize, HWC2CHW."""
    from mindspore.dataset import vision
    from mindspore.dataset.vision import Inter

    filters = {"bicubic": Inter.BICUBIC, "bilinear": Inter.BILINEAR, "nearest": Inter.NEAREST}
    inter = filters[preprocessing.interpolation]
    size = preprocessing.size
    if preprocessing.crop_pct is None:
        resize = [vision.Resize((size, size), inter)]
    else:
        resize = [vision.Resize(int(math.floor(size / preprocessing.crop_pct)), inter), vision.CenterCrop(size)]
    image = encoded
    for step in [vision.Decode(to_pil=True), *resize, vision.ToNumpy(),
                 vision.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)), vision.HWC2CHW()]:
        image = step(image)
    return image


def encoded_pictures():
    """Random pictures of several shapes (taller, wider, square, one already at the resize size), as PNG and JPEG
    files in RGB, grey and RGBA."""
    rng = np.random.default_rng(0)
    pictures = {}
    for height, width in [(60, 80), (375, 500), (224, 224), (30, 100), (333, 250), (233, 310)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for file_format, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGBA")]:
            buffer = io.BytesIO()
            Image.fromarray(pixels).convert(mode).save(buffer, file_format)
            pictures[height, width, file_format, mode] = np.frombuffer(buffer.getvalue(), np.uint8)
    return pictures


def test_preprocessing_gives_the_pixels_of_the_mindspore_pipeline():
    # bit for bit: the same Pillow calls, the same float32 arithmetic; crop_pct 1.15 pads (d4/d5 at 448)
    pictures = encoded_pictures()
    for size, crop_pct, interpolation in itertools.product([224, 32], [0.96, 0.875, 1.0, 1.15, None],
                                                           ["bicubic", "bilinear", "nearest"]):
        preprocessing = Preprocessing(size, crop_pct, interpolation, **IMAGENET)
        for key, encoded in pictures.items():
            ours, theirs = preprocessing.from_bytes(encoded), mindspore_pipeline(preprocessing, encoded)
            assert ours.dtype == theirs.dtype == np.float32 and ours.shape == (3, size, size), key
            assert np.array_equal(ours, theirs), (size, crop_pct, interpolation, key)


# The runner as a user starts it, where MindSpore, MindCV and mindcv_volo cannot be imported (any attempt fails).
WITHOUT_MINDSPORE = ("import runpy, sys; sys.modules.update(mindspore=None, mindcv=None, mindcv_volo=None); "
                     "runpy.run_module('mindcv_volo_serve', run_name='__main__')")


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Six pictures of several sizes and formats, and one file that is not a picture."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    for index, (height, width) in enumerate([(80, 60), (50, 120), (64, 64), (200, 150), (67, 67), (40, 90)]):
        suffix = ".jpg" if index % 2 else ".png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"p{index}{suffix}")
    (folder / "broken.png").write_bytes(b"not a picture")
    return folder


def test_the_onnx_runner_needs_no_mindspore_and_agrees_with_infer(exported_onnx, pictures):
    ckpt, onnx_file = exported_onnx
    served = run_tool("-c", WITHOUT_MINDSPORE, "--onnx_path", onnx_file, "--image_path", pictures, "--batch_size", "4")
    inferred = run_tool("infer.py", "--ckpt_path", ckpt, "--image_path", pictures, "--batch_size", "4")
    # both: the unreadable file as one error line, exit code 2, every other picture classified
    broken = f"error: cannot read image {pictures / 'broken.png'}: corrupt or not an image"
    for result in (served, inferred):
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == broken
    assert served.stderr.strip() == broken
    ours, theirs = json_lines(served.stdout), json_lines(inferred.stdout)
    assert [line["image"] for line in ours] == [line["image"] for line in theirs] == sorted(
        str(p) for p in pictures.iterdir() if p.name != "broken.png")
    for mine, reference in zip(ours, theirs):
        assert [name for name, _ in mine["top5"]] == [name for name, _ in reference["top5"]]
        # onnxruntime against MindSpore's CPU kernels, float32: logits measured within 2e-7 and probabilities
        # within 2e-8 of each other; the lines round them to 6 decimals
        np.testing.assert_allclose([p for _, p in mine["top5"]], [p for _, p in reference["top5"]], atol=1e-5)

    # the function gives what the command prints
    readable = [p for p in sorted(pictures.iterdir()) if p.name != "broken.png"]
    assert [[str(path), top] for path, top in classify(onnx_file, readable[0], top_k=5)] == [
        [line["image"], line["top5"]] for line in ours[:1]]


def test_the_onnx_runner_without_onnxruntime_is_one_line(exported_onnx, pictures):
    _, onnx_file = exported_onnx
    blocked = WITHOUT_MINDSPORE.replace("mindcv_volo=None", "mindcv_volo=None, onnxruntime=None")
    result = run_tool("-c", blocked, "--onnx_path", onnx_file, "--image_path", pictures)
    assert (result.returncode, result.stderr.strip()) == (
        2, "error: running an ONNX file needs onnxruntime: pip install onnxruntime")


def test_an_onnx_file_without_metadata_is_one_line(exported_onnx, pictures, tmp_path):
    import onnx

    _, onnx_file = exported_onnx
    bare = onnx.load(str(onnx_file))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    result = run_tool("-c", WITHOUT_MINDSPORE, "--onnx_path", tmp_path / "bare.onnx", "--image_path", pictures)
    assert (result.returncode, result.stderr.strip()) == (
        2, f"error: {tmp_path / 'bare.onnx'} carries no preprocessing and class names (metadata "
           "mindcv_volo.preprocessing, mindcv_volo.class_names); export it again with python -m mindcv_volo.export")
