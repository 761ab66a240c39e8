"""ONNX export (backend "onnx" + `weights.export`) against the official outputs, run in onnxruntime; what the
file carries; the permissions of exported files; the missing `onnx` package."""
import json
import os
import stat

import mindspore as ms
import numpy as np
import pytest

from conftest import EXPORT_UMASK, FIXTURES, REFERENCE_CONFIGS, run_tool
from mindcv_volo.errors import UserError
from mindcv_volo.models import VOLO
from mindcv_volo.weights import convert_into
from mindcv_volo.weights.checkpoint import save_checkpoint
from mindcv_volo.weights.export import export_model, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FIXTURE_NAMES = ["tiny_d1like_64", pytest.param("tiny_d5like_96", marks=pytest.mark.slow)]  # d5: the full suite


def converted(name, backend):
    model = VOLO(**REFERENCE_CONFIGS[name], backend=backend)
    convert_into(model, str(FIXTURES / f"{name}.safetensors"))
    model.set_train(False)
    return model


def run_onnx(path, images):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]


def four_images(name):
    """The fixture's two inputs twice, and their official logits."""
    reference = np.load(FIXTURES / f"{name}.io.npz")
    return np.concatenate([reference["input"]] * 2), np.concatenate([reference["logits"]] * 2)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_onnx_formulation_gives_the_cells_logits(name, mode):
    images, _ = four_images(name)
    onnx_model, plain = converted(name, "onnx"), converted(name, "cpu_unfused")
    got = onnx_model(ms.Tensor(images)).asnumpy()
    assert np.abs(got - plain(ms.Tensor(images)).asnumpy()).max() <= 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_static_export_runs_in_onnxruntime_with_the_official_logits(name, tmp_path):
    images, logits = four_images(name)
    model = converted(name, "onnx")
    for batch in (1, 4):
        export_onnx(model, str(tmp_path / f"b{batch}.onnx"), batch_size=batch)
        assert np.abs(run_onnx(tmp_path / f"b{batch}.onnx", images[:batch]) - logits[:batch]).max() <= 1e-4
    exported = onnx.load(str(tmp_path / "b1.onnx"))
    assert exported.opset_import[0].version == 11
    # MindSpore's Erf, Im2Col and Col2Im have no ONNX mapping: what took their place
    assert {"Erf", "Gather", "Conv"} <= {node.op_type for node in exported.graph.node}


def test_converted_checkpoint_exports_with_a_dynamic_batch_through_the_cli(exported_onnx):
    ckpt, out = exported_onnx
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.ckpt", "tiny.onnx"]
    images, logits = four_images("tiny_d1like_64")
    for batch in (1, 3, 4):
        assert np.abs(run_onnx(out, images[:batch]) - logits[:batch]).max() <= 1e-4
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_the_onnx_file_carries_its_preprocessing_and_class_names(exported_onnx):
    _, out = exported_onnx
    metadata = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert sorted(metadata) == ["mindcv_volo.class_names", "mindcv_volo.model", "mindcv_volo.preprocessing"]
    assert metadata["mindcv_volo.model"] == "volo_d1_224"
    # the converter's description: the fixture's 64 px, volo_d1_224's crop_pct and interpolation, ImageNet's mean/std
    assert json.loads(metadata["mindcv_volo.preprocessing"]) == {
        "size": 64, "crop_pct": 0.96, "interpolation": "bicubic", "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375]}
    assert len(json.loads(metadata["mindcv_volo.class_names"])) == REFERENCE_CONFIGS["tiny_d1like_64"]["num_classes"]


def test_written_files_get_ordinary_permissions(exported_onnx, tmp_path):
    # MindSpore writes checkpoints and exports read-only (0400); ours follow the umask as any file opened for
    # writing does: 0640 under EXPORT_UMASK 027
    model = converted("tiny_d1like_64", "portable")
    previous = os.umask(EXPORT_UMASK)
    try:
        export_model(model, str(tmp_path / "tiny.mindir"), "MINDIR")
        save_checkpoint({"weight": np.zeros(2, np.float32)}, str(tmp_path / "small.ckpt"))
    finally:
        os.umask(previous)
    written = [*exported_onnx, tmp_path / "tiny.mindir", tmp_path / "small.ckpt"]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        "tiny.ckpt": "0o640", "tiny.onnx": "0o640", "tiny.mindir": "0o640", "small.ckpt": "0o640"}


def test_an_onnx_export_without_the_onnx_package_is_one_line(exported_onnx, tmp_path):
    ckpt, _ = exported_onnx
    export = ("import runpy, sys; sys.modules['onnx'] = None; "  # as if the package were not installed
              "runpy.run_module('mindcv_volo.export', run_name='__main__')")
    result = run_tool("-c", export, "--ckpt_path", ckpt, "--out", tmp_path / "x.onnx", "--file_format", "ONNX")
    assert result.returncode == 2
    assert result.stderr.strip() == ('error: an ONNX export needs the onnx package, which is not installed: '
                                     'pip install "mindcv-volo[onnx]"')
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # two exports of one model
def test_the_same_shape_exports_twice(tmp_path):
    # MindSpore 2.10 would reuse the graph its exporter rewrote in place, and fail
    model = converted("tiny_d1like_64", "onnx")
    images, logits = four_images("tiny_d1like_64")
    for name in ("a.onnx", "b.onnx"):
        export_onnx(model, str(tmp_path / name), batch_size=2)
        assert np.abs(run_onnx(tmp_path / name, images[:2]) - logits[:2]).max() <= 1e-4


@pytest.mark.parametrize("backend", ["portable", "cpu_unfused"])
def test_a_model_built_for_another_backend_is_refused(tmp_path, backend):
    with pytest.raises(UserError, match=f'needs the model built with backend="onnx", not "{backend}"'):
        export_onnx(converted("tiny_d1like_64", backend), str(tmp_path / "x.onnx"))
    assert not list(tmp_path.iterdir())
