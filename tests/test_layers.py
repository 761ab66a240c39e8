"""The CPU formulations of the building blocks against the straightforward MindSpore ops they replace."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from conftest import WeightedSum, tiny_volo
from mindcv_volo.models.backend import Backend
from mindcv_volo.models.layers import gelu, split_class_token
from mindcv_volo.models.windows import (ChannelsLastFold, ChannelsLastUnfold, MatmulConv2d, fold_channels_last,
                                        unfold_channels_last)
from mindcv_volo.models.volo import ChannelsLastOutlookCore, OutlookAttention, OutlookCore

CPU = Backend.CPU  # the cells of the CPU formulation, with the fused kernels (the tests run on CPU)

RNG = np.random.default_rng(0)
WINDOWS = [(3, 1, 2), (3, 1, 1), (2, 0, 2), (3, 0, 2)]  # (kernel, padding, stride)


def tensor(*shape, dtype=np.float32):
    return Tensor(RNG.standard_normal(shape).astype(dtype))


class Fn(nn.Cell):
    """Wrap a function in a cell, so it compiles as a graph in GRAPH_MODE."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


class Unfold(nn.Cell):
    """unfold_channels_last, differentiated by autodiff (gathers)."""

    def __init__(self, kernel, padding, stride):
        super().__init__()
        self.window = (kernel, padding, stride)

    def construct(self, x):
        return unfold_channels_last(x, *self.window)


class Fold(nn.Cell):
    """fold_channels_last onto a given size, differentiated by autodiff (gathers)."""

    def __init__(self, height, width, kernel, padding, stride):
        super().__init__()
        self.size = (height, width)
        self.window = (kernel, padding, stride)

    def construct(self, cols):
        return fold_channels_last(cols, *self.size, *self.window)


class SumOfSquares(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return (self.cell(x) ** 2).sum()


def grads(cell, *inputs):
    """Gradients of sum(cell(*inputs) * weights) with respect to every input, for fixed random weights."""
    weights = np.random.default_rng(1).standard_normal(cell(*inputs).shape)
    result = ms.grad(WeightedSum(cell, weights), tuple(range(len(inputs))))(*inputs)
    return [g.asnumpy() for g in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("backend", [CPU, Backend.PORTABLE])
def test_gelu_is_exact_erf_gelu(mode, backend):
    x = np.concatenate([np.linspace(-10, 10, 4001), RNG.standard_normal(4000) * 3]).astype(np.float32)
    out = Fn(gelu(backend))(Tensor(x)).asnumpy()
    expected = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=5e-7)
    np.testing.assert_allclose(out, ops.gelu(Tensor(x), approximate="none").asnumpy(), rtol=1e-6, atol=5e-7)


@pytest.mark.parametrize("backend", [CPU, Backend.PORTABLE])
def test_gelu_keeps_float16(mode, backend):
    out = Fn(gelu(backend))(Tensor(np.linspace(-4, 4, 33).astype(np.float16)))
    assert out.dtype == ms.float16
    expected = ops.gelu(Tensor(np.linspace(-4, 4, 33).astype(np.float32)), approximate="none").asnumpy()
    np.testing.assert_allclose(out.asnumpy().astype(np.float32), expected, atol=2e-3)


@pytest.mark.parametrize("kernel,padding,stride", WINDOWS)
def test_unfold_channels_last_equals_ops_unfold(mode, kernel, padding, stride):
    x = tensor(2, 6, 8, 5)
    out = Unfold(kernel, padding, stride)(x).asnumpy()
    cols = ops.unfold(x.transpose(0, 3, 1, 2), kernel, padding=padding, stride=stride).asnumpy()
    expected = cols.reshape(2, 5, kernel * kernel, -1).transpose(0, 3, 2, 1)
    assert out.shape[:3] == (2, (6 + 2 * padding - kernel) // stride + 1, (8 + 2 * padding - kernel) // stride + 1)
    np.testing.assert_array_equal(out.reshape(expected.shape), expected)


@pytest.mark.parametrize("kernel,padding,stride", WINDOWS)
def test_fold_channels_last_equals_ops_fold(mode, kernel, padding, stride):
    height, width = 6, 8
    out_h, out_w = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
    cols = tensor(2, out_h, out_w, kernel * kernel, 5)
    out = Fold(height, width, kernel, padding, stride)(cols).asnumpy()
    # ops.fold's input: (B, C * k*k, L), channel-major
    torch_layout = cols.reshape(2, out_h * out_w, kernel * kernel, 5).transpose(0, 3, 2, 1)
    expected = ops.fold(torch_layout.reshape(2, 5 * kernel * kernel, out_h * out_w),
                        Tensor((height, width), ms.int32), kernel, padding=padding, stride=stride).asnumpy()
    np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


# (kernel, padding, stride, height, width): VOLO's outlook windows, the stem's 3x3 and 7x7/2, a map that is
# not stride-aligned (the kernels do not take it: gathers)
CELL_WINDOWS = [(3, 1, 2, 8, 6), (3, 1, 1, 5, 7), (7, 3, 2, 12, 10), (3, 0, 2, 7, 7)]


@pytest.mark.parametrize("kernel,padding,stride,height,width", CELL_WINDOWS)
def test_unfold_and_fold_cells_equal_the_gathers_and_their_autodiff(mode, kernel, padding, stride, height, width):
    """The cells (with the fused im2col / col2im kernels where they apply) against the gather functions."""
    x = tensor(2, height, width, 3)
    unfold = ChannelsLastUnfold(kernel, padding, stride, CPU)
    expected = Unfold(kernel, padding, stride)(x).asnumpy()
    np.testing.assert_array_equal(Fn(unfold)(x).asnumpy(), expected)
    np.testing.assert_allclose(grads(unfold, x)[0], grads(Unfold(kernel, padding, stride), x)[0], atol=1e-5)
    if (height - 1) // stride * stride + stride != height:
        return  # the fold cell maps onto stride-aligned sizes only
    cols = tensor(*expected.shape)
    fold = ChannelsLastFold(kernel, padding, stride, CPU)
    plain_fold = Fold(height, width, kernel, padding, stride)
    np.testing.assert_allclose(Fn(fold)(cols).asnumpy(), plain_fold(cols).asnumpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads(fold, cols)[0], grads(plain_fold, cols)[0], atol=1e-5)


def test_unfold_cells_of_different_windows_on_the_same_map(mode):
    x = tensor(1, 8, 8, 4)
    for window in [(3, 1, 1), (4, 0, 4), (3, 1, 2), (2, 0, 2)]:
        np.testing.assert_array_equal(Fn(ChannelsLastUnfold(*window, CPU))(x).asnumpy(), Unfold(*window)(x).asnumpy())


def test_unfold_cells_take_the_kernels_on_stride_aligned_float32_maps():
    unfold = ChannelsLastUnfold(3, 1, 2, CPU)
    assert unfold.takes_kernels(tensor(1, 8, 6, 2)) and not unfold.takes_kernels(tensor(1, 7, 6, 2))
    assert not unfold.takes_kernels(tensor(1, 8, 6, 2, dtype=np.float16))
    assert not ChannelsLastUnfold(3, 0, 2, CPU).takes_kernels(tensor(1, 8, 8, 2))  # 8 -> 3 windows -> 6


def test_split_class_token(mode):
    x = tensor(3, 5, 4)
    cls_token, tokens = Fn(split_class_token)(x)
    np.testing.assert_array_equal(cls_token.asnumpy(), x.asnumpy()[:, :1])
    np.testing.assert_array_equal(tokens.asnumpy(), x.asnumpy()[:, 1:])


class ChannelsLastConv(nn.Cell):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def construct(self, x):
        return self.conv.channels_last(x)


@pytest.mark.parametrize("has_bias", [True, False])
def test_conv_channels_last_patchify(mode, has_bias):
    conv = MatmulConv2d(6, 10, 2, stride=2, has_bias=has_bias, backend=CPU)
    x = tensor(2, 8, 4, 6)
    out = ChannelsLastConv(conv)(x).asnumpy()
    expected = ops.conv2d(x.transpose(0, 3, 1, 2), conv.weight, conv.bias, stride=2).asnumpy()
    np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, has_bias", [(7, 2, 3, False), (3, 1, 1, False), (5, 1, 2, True),
                                                           (4, 4, 0, True)])
def test_conv_channels_last_with_the_kernels_equals_conv2d_values_and_gradients(mode, kernel, stride, padding,
                                                                                 has_bias):
    """The stem's convolutions as the im2col kernel + matmul whose gradient recomputes the patches
    (UnfoldMatmul): values, input and weight gradients against ops.conv2d on NCHW."""
    conv = MatmulConv2d(5, 8, kernel, stride=stride, padding=padding, has_bias=has_bias, backend=CPU)
    x = tensor(2, 8, 8, 5)
    assert conv.unfold_matmul.takes_kernels(x)  # the tests run on CPU with the kernels

    class Reference(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def construct(self, x):
            out = ops.conv2d(x.transpose(0, 3, 1, 2), self.conv.weight, self.conv.bias, stride=stride,
                             pad_mode="pad", padding=padding)
            return out.transpose(0, 2, 3, 1)

    cell, reference = ChannelsLastConv(conv), Reference()
    np.testing.assert_allclose(cell(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads(cell, x)[0], grads(reference, x)[0], rtol=1e-4, atol=1e-5)
    weight_grads = [ms.grad(SumOfSquares(c), None, conv.trainable_params())(x) for c in (cell, reference)]
    assert len(weight_grads[0]) == (2 if has_bias else 1)
    for a, b in zip(*weight_grads):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-4)


def test_outlook_attention_cpu_path_equals_unfold_fold_path(mode):
    """The CPU formulation (here the fused kernels: tests/test_outlook_kernel.py compares them with the gathers)
    and the ops.unfold/ops.fold one (accelerators): values and gradients."""
    cpu = OutlookAttention(12, 3, backend=CPU)
    reference = OutlookAttention(12, 3, backend=Backend.PORTABLE)
    assert isinstance(cpu.core, ChannelsLastOutlookCore) and type(reference.core) is OutlookCore
    for target, source in zip(reference.get_parameters(), cpu.get_parameters()):
        assert target.name == source.name
        target.set_data(source.data.copy())
    x = tensor(2, 8, 6, 12)
    np.testing.assert_allclose(Fn(cpu)(x).asnumpy(), Fn(reference)(x).asnumpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads(cpu, x)[0], grads(reference, x)[0], rtol=1e-5, atol=1e-5)
    weights = cpu.trainable_params()
    weight_grads = [ms.grad(SumOfSquares(c), None, c.trainable_params())(x) for c in (cpu, reference)]
    assert len(weight_grads[0]) == len(weights)
    for a, b in zip(*weight_grads):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles a model under AMP per level
@pytest.mark.parametrize("amp_level", ["O2", "O3"])
def test_cpu_paths_run_under_float16_amp(mode, amp_level):
    """AMP wraps cells (BatchNorm in a casting cell) and runs the convolutions in float16: the CPU paths
    (MatmulConv2d.channels_last, the BatchNorm shortcut, the matmul primitives) must follow."""
    x = tensor(2, 3, 64, 64)
    outputs = []
    for level in ("O0", amp_level):
        ms.set_seed(0)
        net = tiny_volo(10, img_size=64)
        net.set_train(False)
        if level != "O0":
            net = ms.amp.auto_mixed_precision(net, level)
        outputs.append(net(x).asnumpy().astype(np.float32))
    assert np.isfinite(outputs[1]).all()
    np.testing.assert_allclose(outputs[1], outputs[0], atol=5e-3)
