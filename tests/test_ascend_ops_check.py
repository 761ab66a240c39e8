"""benchmarks/ascend_ops_check.py in CI: the accelerator formulation's graphs (float32 inference, train.py's step
under the Ascend recipe) hold only primitives MindSpore lists for Ascend and no host round-trip; and the check
reports each kind of finding when a graph has one."""
import importlib.util

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from conftest import ROOT
from mindcv_volo.models import cpu_kernels, kernel_library

pytestmark = pytest.mark.slow  # compiles train.py's whole step for the accelerator: the full suite only


def load_check():
    spec = importlib.util.spec_from_file_location("ascend_ops_check", ROOT / "benchmarks" / "ascend_ops_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = load_check()
INFERENCE, TRAIN_STEP = CHECK.ACCELERATOR_GRAPHS


def test_accelerator_graphs_hold_only_ascend_primitives_and_no_host_round_trip():
    reports = CHECK.check_accelerator_graphs()
    for label, report in reports.items():
        assert report.findings == [], label
    # The graphs are the accelerator formulation's (convolutions, unfold and fold as MindSpore's ops, not the
    # CPU's matmuls and gathers), and the train step is the recipe's: AMP casts, the overflow test of the
    # dynamic loss scale, the teacher's top-k targets.
    assert {"Conv2D", "Im2Col", "Col2Im", "LayerNorm", "Softmax"} <= set(reports[INFERENCE].primitives)
    assert {"Conv2D", "Conv2DBackpropInput", "Cast", "IsFinite", "OneHot"} <= set(reports[TRAIN_STEP].primitives)


class FusedCpuGelu(nn.Cell):
    """The fused CPU GELU kernel (a Custom AOT op built for this CPU) where the accelerator graph has none."""

    def __init__(self):
        super().__init__()
        self.gelu = cpu_kernels.GeluFunction()

    def construct(self, x):
        return self.gelu(x)


class CpuOnlyPrimitive(nn.Cell):
    """ops.Fmax: MindSpore lists it for CPU only."""

    def construct(self, x):
        return ops.Fmax()(x, 2 * x)


class HostRoundTrip(nn.Cell):
    """numpy on a tensor's values inside the graph: MindSpore runs it on the host (PyExecute)."""

    def construct(self, x):
        return x * float(np.sum(x.asnumpy()))


@pytest.mark.parametrize("cell, finding", [
    (FusedCpuGelu, "Custom: a custom op"),
    (CpuOnlyPrimitive, "Fmax: not listed for Ascend (Supported Platforms: CPU)"),
    (HostRoundTrip, "host round-trip: PyExecute"),
])
def test_the_check_reports_what_would_not_run_on_ascend(monkeypatch, cell, finding):
    if cell is FusedCpuGelu and not kernel_library.available():
        pytest.skip("the fused CPU kernels did not build on this machine")

    def run():
        cell()(ms.Tensor(np.ones((2, 3), np.float32)))

    monkeypatch.setattr(CHECK, "ACCELERATOR_GRAPHS", {"a graph with a finding": run})
    found = CHECK.check_accelerator_graphs()["a graph with a finding"].findings
    assert [line for line in found if line.startswith(finding)], found


def test_a_primitive_without_a_documented_platform_list_is_a_finding():
    assert CHECK.findings(["MatMul", "NoSuchPrimitive", "MatMulGrad"], []) == [
        "NoSuchPrimitive: no platform list in MindSpore's documentation; check it by hand and add its documented "
        "functional form to FUNCTIONAL"]
