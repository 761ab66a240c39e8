"""Outlook attention's CPU kernels (OutlookForward/Backward, AvgPool2x2Forward/Backward in cpu_kernels.cc) against
float64 NumPy written from the definition, values and gradients; OutlookAttention with them against the same cell
without, and where the cell takes them. Their bits across builds: KERNEL_CASES in test_cpu_kernels.py."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import WeightedSum, check_against_numpy
from mindcv_volo.models import cpu_kernels
from mindcv_volo.models.backend import Backend
from mindcv_volo.models.volo import ChannelsLastOutlookCore, FusedOutlookCore, OutlookAttention, OutlookCore

RNG = np.random.default_rng(0)


def numpy_outlook(v, logits, scale, heads, kernel, padding, stride):
    """For every window and head: A = softmax(scale * logits) (row i: query tap i, column j: key tap j), the
    window's taps of v (zero in the padding) mixed by A, each mixed tap added onto its pixel (dropped in the
    padding)."""
    batch, height, width, channels = v.shape
    out_h, out_w = logits.shape[1:3]
    taps = kernel * kernel
    attn = scale * logits.reshape(batch, out_h, out_w, heads, taps, taps)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    v = v.reshape(batch, height, width, heads, channels // heads)
    out = np.zeros_like(v)
    for oy, ox in np.ndindex(out_h, out_w):
        pixels = [(oy * stride - padding + t // kernel, ox * stride - padding + t % kernel) for t in range(taps)]
        inside = [0 <= y < height and 0 <= x < width for y, x in pixels]
        window = np.stack([v[:, y, x] if ok else np.zeros_like(v[:, 0, 0]) for (y, x), ok in zip(pixels, inside)], 2)
        mixed = attn[:, oy, ox] @ window  # (B, heads, taps, d)
        for (y, x), ok, row in zip(pixels, inside, np.moveaxis(mixed, 2, 0)):
            if ok:
                out[:, y, x] += row
    return out.reshape(batch, height, width, channels)


# (batch, height, width, heads, head_dim, (kernel, padding, stride)): VOLO's windows on a square and an oblong
# map (padding taps on every border), and two other geometries the kernel takes (stride 1; 2 x 2 without overlap)
OUTLOOK_CASES = [(2, 6, 6, 2, 3, (3, 1, 2)), (1, 4, 8, 3, 2, (3, 1, 2)), (1, 4, 4, 2, 2, (3, 1, 1)),
                 (2, 4, 6, 2, 3, (2, 0, 2))]


@pytest.mark.parametrize("batch, height, width, heads, head_dim, window", OUTLOOK_CASES)
def test_outlook_kernels_values_and_gradients(mode, batch, height, width, heads, head_dim, window):
    kernel, padding, stride = window
    v = RNG.standard_normal((batch, height, width, heads * head_dim))
    logits = RNG.standard_normal((batch, height // stride, width // stride, heads * kernel ** 4)) * 2
    scale = head_dim ** -0.5
    cell = cpu_kernels.OutlookAttentionFunction(heads, scale, kernel, padding, stride)
    check_against_numpy(cell, lambda v, logits: numpy_outlook(v, logits, scale, heads, kernel, padding, stride), [v, logits],
          grad_tol=1e-4)


def numpy_avg_pool(x):
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def test_avg_pool_kernels_values_and_gradients(mode):
    check_against_numpy(cpu_kernels.AvgPool2x2Function(), numpy_avg_pool, [RNG.standard_normal((2, 6, 4, 5))], grad_tol=1e-4)


def test_avg_pool_kernels_split_over_threads(mode):
    x = RNG.standard_normal((4, 28, 28, 48)).astype(np.float32)
    cell = cpu_kernels.AvgPool2x2Function()
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), numpy_avg_pool(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
    dy = RNG.standard_normal((4, 14, 14, 48)).astype(np.float32)
    grad = ms.grad(WeightedSum(cell, dy))(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(grad, np.repeat(np.repeat(dy / 4, 2, axis=1), 2, axis=2))


def with_kernels_and_without(dim, heads, **kwargs):
    """OutlookAttention built with the kernels and without them (MindSpore's ops), with the same weights."""
    fused = OutlookAttention(dim, heads, **kwargs, backend=Backend.CPU)
    plain = OutlookAttention(dim, heads, **kwargs, backend=Backend.CPU_UNFUSED)
    assert type(fused.core) is FusedOutlookCore and type(plain.core) is ChannelsLastOutlookCore
    for target, source in zip(plain.get_parameters(), fused.get_parameters()):
        assert target.name == source.name
        source.set_data(Tensor(RNG.standard_normal(source.shape).astype(np.float32) * 0.3))
        target.set_data(source.data.copy())
    return fused, plain


@pytest.mark.parametrize("training", [False, True])
def test_outlook_attention_with_the_kernels_equals_it_without(mode, training):
    """Values, and the gradients of the input and of every parameter (v, attn and proj, weights and biases)."""
    fused, plain = with_kernels_and_without(12, 3, qkv_bias=True)
    x = Tensor(RNG.standard_normal((2, 8, 6, 12)).astype(np.float32))
    assert fused.core.takes_kernels(x)
    weights = RNG.standard_normal((2, 8, 6, 12)).astype(np.float32)
    results = []
    for cell in (fused, plain):
        cell.set_train(training)
        value = cell(x).asnumpy()
        grads = ms.grad(WeightedSum(cell, weights), 0, cell.trainable_params())(x)
        results.append((value, grads[0].asnumpy(), [g.asnumpy() for g in grads[1]]))
    (value, dx, dparams), (value_ref, dx_ref, dparams_ref) = results
    np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    assert len(dparams) == 6
    for got, expected in zip(dparams, dparams_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_kernels_are_taken_where_they_apply():
    core = OutlookAttention(12, 3, backend=Backend.CPU).core
    x = Tensor(np.zeros((2, 8, 6, 12), np.float32))
    assert core.takes_kernels(x)
    assert not core.takes_kernels(Tensor(np.zeros((2, 8, 6, 12), np.float16)))
    assert not core.takes_kernels(Tensor(np.zeros((2, 7, 6, 12), np.float32)))  # not stride-aligned
    assert not OutlookAttention(12, 3, backend=Backend.CPU).to_float(ms.float16).core.takes_kernels(x)  # AMP's flags
    # the other backends build no kernels: the gathers, or (the accelerator formulation) ops.unfold / ops.fold
    assert type(OutlookAttention(12, 3, backend=Backend.CPU_UNFUSED).core) is ChannelsLastOutlookCore
    assert type(OutlookAttention(12, 3, backend=Backend.ONNX).core) is ChannelsLastOutlookCore
    assert type(OutlookAttention(12, 3, backend=Backend.PORTABLE).core) is OutlookCore


@pytest.mark.parametrize("attn_drop, training, core_calls", [(0.0, True, 1), (0.5, False, 1), (0.5, True, 0)])
def test_kernels_run_in_the_cell_unless_the_attention_map_is_dropped_out(monkeypatch, attn_drop, training,
                                                                        core_calls):
    """In PyNative mode the cells' Python runs: count the kernel cells' calls."""
    calls = []
    for cls in (cpu_kernels.OutlookAttentionFunction, cpu_kernels.AvgPool2x2Function):
        def counted(self, *args, original=cls.construct, name=cls.__name__):
            calls.append(name)
            return original(self, *args)

        monkeypatch.setattr(cls, "construct", counted)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        cell = OutlookAttention(12, 3, attn_drop=attn_drop, backend=Backend.CPU)
        cell.set_train(training)
        cell(Tensor(RNG.standard_normal((2, 8, 6, 12)).astype(np.float32)))
    finally:
        ms.set_context(mode=previous)
    assert calls.count("AvgPool2x2Function") == 1
    assert calls.count("OutlookAttentionFunction") == core_calls
