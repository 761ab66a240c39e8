"""Building blocks shared by the VOLO cells, with PyTorch's numerics.

MindSpore's defaults differ from PyTorch where it changes the numbers (LayerNorm eps 1e-7, tanh GELU),
so every block here is built through these helpers and the official weights give the official output.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, TruncatedNormal, Uniform, initializer

LAYER_NORM_EPS = 1e-5


def layer_norm(dim):
    return nn.LayerNorm((dim,), epsilon=LAYER_NORM_EPS)


def batch_norm(channels):
    # MindSpore's momentum is the weight of the running value: 0.9 here is torch's momentum=0.1.
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9)


def dense(in_features, out_features, has_bias=True):
    """Linear layer initialised as the official VOLO: truncated normal(0.02) weights, zero bias."""
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(0.02), bias_init="zeros",
                    has_bias=has_bias)


def uses_matmul_convolution():
    """MindSpore's CPU Conv2D kernel runs at ~0.6 GFLOP/s; unfold + matmul is ~50x faster there.

    On GPU and Ascend `ops.conv2d` is the fast path (cuDNN, the Cube units), so only CPU switches.
    The choice is made when a cell is built, from the device set at that time.
    """
    return ms.get_context("device_target") == "CPU"


class Conv2d(nn.Cell):
    """Conv2d with torch's parameter layout and init: `weight` (out, in, k, k), optional `bias`.

    One cell, two computations behind the seam `uses_matmul_convolution()`: `ops.conv2d` on
    accelerators; on CPU a patchify reshape (kernel == stride, no padding) or `ops.unfold`, then a
    matmul. Both give the same numbers to float rounding.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, has_bias=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        # torch's default: kaiming_uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) bias.
        self.weight = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), shape), name="weight")
        fan_in = in_channels * kernel_size * kernel_size
        self.bias = (Parameter(initializer(Uniform(1 / math.sqrt(fan_in)), (out_channels,)), name="bias")
                     if has_bias else None)
        self.use_matmul = uses_matmul_convolution()
        self.is_patchify = kernel_size == stride and padding == 0

    def construct(self, x):
        if not self.use_matmul:
            return ops.conv2d(x, self.weight, self.bias, stride=self.stride, pad_mode="pad",
                              padding=self.padding)
        batch, channels, height, width = x.shape
        k = self.kernel_size
        weight = self.weight.reshape(self.out_channels, -1)
        if self.is_patchify:
            out_h, out_w = height // k, width // k
            patches = x.reshape(batch, channels, out_h, k, out_w, k).transpose(0, 2, 4, 1, 3, 5)
            out = ops.matmul(patches.reshape(batch, out_h * out_w, -1), weight.T).transpose(0, 2, 1)
        else:
            out_h = (height + 2 * self.padding - k) // self.stride + 1
            out_w = (width + 2 * self.padding - k) // self.stride + 1
            columns = ops.unfold(x, k, padding=self.padding, stride=self.stride)
            out = ops.matmul(weight, columns)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)


class GELU(nn.Cell):
    """Exact (erf) GELU, as torch's nn.GELU(); MindSpore's nn.GELU defaults to the tanh approximation."""

    def construct(self, x):
        return ops.gelu(x, approximate="none")


class DropPath(nn.Cell):
    """Stochastic depth: drops the whole residual branch per sample, scaled by 1/keep in training."""

    def __init__(self, rate):
        super().__init__()
        self.keep_prob = 1.0 - rate

    def construct(self, x):
        if not self.training or self.keep_prob == 1.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = ops.floor(self.keep_prob + ops.rand(shape, dtype=x.dtype))
        return x / self.keep_prob * keep


def drop_path(rate):
    return DropPath(rate) if rate > 0 else nn.Identity()


class Mlp(nn.Cell):
    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = dense(dim, hidden_dim)
        self.act = GELU()
        self.fc2 = dense(hidden_dim, dim)
        self.drop = nn.Dropout(p=drop)

    def construct(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def softmax_float32(x):
    """Softmax computed in float32 whatever the AMP level, cast back to the input's dtype."""
    return ops.softmax(x.astype(ms.float32), axis=-1).astype(x.dtype)
