"""Outlook attention's CPU kernels (OutlookForward/Backward, AvgPool2x2Forward/Backward in cpu_kernels.cc) against
float64 NumPy written from the definition, values and gradients. Their bits across builds: KERNEL_CASES in
test_cpu_kernels.py."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from test_cpu_kernels import WeightedSum, check
from mindcv_volo.models import cpu_kernels

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
    check(cell, lambda v, logits: numpy_outlook(v, logits, scale, heads, kernel, padding, stride), [v, logits],
          grad_tol=1e-4)


def numpy_avg_pool(x):
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


def test_avg_pool_kernels_values_and_gradients(mode):
    check(cpu_kernels.AvgPool2x2Function(), numpy_avg_pool, [RNG.standard_normal((2, 6, 4, 5))], grad_tol=1e-4)


def test_avg_pool_kernels_split_over_threads(mode):
    x = RNG.standard_normal((4, 28, 28, 48)).astype(np.float32)
    cell = cpu_kernels.AvgPool2x2Function()
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), numpy_avg_pool(x.astype(np.float64)), rtol=1e-6, atol=1e-6)
    dy = RNG.standard_normal((4, 14, 14, 48)).astype(np.float32)
    grad = ms.grad(WeightedSum(cell, dy))(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(grad, np.repeat(np.repeat(dy / 4, 2, axis=1), 2, axis=2))
