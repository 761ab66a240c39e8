"""ONNX export (backend "onnx" + `weights.export`) against the official outputs, run in onnxruntime."""
import mindspore as ms
import numpy as np
import pytest

from conftest import FIXTURES, REFERENCE_CONFIGS, reference_options, run_tool
from mindcv_volo.errors import UserError
from mindcv_volo.models import VOLO
from mindcv_volo.weights import convert_into
from mindcv_volo.weights.export import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FIXTURE_NAMES = ["tiny_d1like_64", "tiny_d5like_96"]


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


def test_converted_checkpoint_exports_with_a_dynamic_batch_through_the_cli(tmp_path):
    ckpt, out = tmp_path / "tiny.ckpt", tmp_path / "tiny.onnx"
    convert = run_tool("-m", "mindcv_volo.convert", "--src", FIXTURES / "tiny_d1like_64.safetensors", "--dst", ckpt,
                       "--model", "volo_d1_224", *reference_options("tiny_d1like_64"))
    assert convert.returncode == 0, convert.stderr
    result = run_tool("-m", "mindcv_volo.export", "--ckpt_path", ckpt, "--out", out, "--file_format", "ONNX",
                      "--dynamic_batch")  # the checkpoint describes its model
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt", "tiny.onnx"]
    images, logits = four_images("tiny_d1like_64")
    for batch in (1, 3, 4):
        assert np.abs(run_onnx(out, images[:batch]) - logits[:batch]).max() <= 1e-4
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


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
