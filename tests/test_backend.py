"""The backend a VOLO is built for: chosen once (argument, else $MINDCV_VOLO_BACKEND, else the device), kept on the
model, and the cells it builds."""
import mindspore as ms
import pytest
from mindcv.models import create_model

from conftest import tiny_volo
from mindcv_volo.errors import UserError
from mindcv_volo.models.backend import Backend, resolve_backend
from mindcv_volo.models.volo import ChannelsLastOutlookCore, FusedOutlookCore, OutlookCore
from mindcv_volo.models.windows import Conv2d, MatmulConv2d

pytestmark = pytest.mark.skipif(ms.get_context("device_target") != "CPU", reason="the defaults checked are CPU's")


def test_the_device_chooses_by_default_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv("MINDCV_VOLO_BACKEND", raising=False)
    assert resolve_backend() is Backend.CPU  # the fused kernels build here (tests/test_cpu_kernels.py)
    monkeypatch.setenv("MINDCV_VOLO_BACKEND", "portable")
    assert resolve_backend() is Backend.PORTABLE
    assert resolve_backend("onnx") is Backend.ONNX  # an argument wins over the variable
    assert resolve_backend(Backend.CPU_UNFUSED) is Backend.CPU_UNFUSED


def test_an_unknown_backend_is_refused_in_one_line(monkeypatch):
    names = "choose one of: portable, cpu, cpu_unfused, onnx"
    with pytest.raises(UserError, match=f"^unknown backend 'gpu'; {names}$"):
        tiny_volo(backend="gpu")
    monkeypatch.setenv("MINDCV_VOLO_BACKEND", "fast")
    with pytest.raises(UserError, match=rf"^unknown backend 'fast' in \$MINDCV_VOLO_BACKEND; {names}$"):
        tiny_volo()


@pytest.mark.parametrize("name, convolution, core", [
    ("portable", Conv2d, OutlookCore), ("cpu", MatmulConv2d, FusedOutlookCore),
    ("cpu_unfused", MatmulConv2d, ChannelsLastOutlookCore), ("onnx", Conv2d, ChannelsLastOutlookCore)])
def test_create_model_builds_the_cells_of_the_backend(name, convolution, core):
    model = create_model("volo_d1_224", backend=name, num_classes=3, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                         num_heads=(1, 2, 2, 2), stem_hidden_dim=8, img_size=32)
    assert model.backend is Backend(name) and str(model.backend) == name
    cells = [cell for _, cell in model.cells_and_names()]
    assert {type(cell) for cell in cells if isinstance(cell, Conv2d)} == {convolution}
    assert type(model.network[0][0].attn.core) is core


def test_an_export_leaves_the_kernels_out():
    assert [backend.without_kernels() for backend in Backend] == [
        Backend.PORTABLE, Backend.CPU_UNFUSED, Backend.CPU_UNFUSED, Backend.ONNX]
