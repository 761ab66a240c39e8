"""Building blocks shared by the VOLO cells, with PyTorch's numerics.

MindSpore's defaults differ from PyTorch where it changes the numbers (LayerNorm eps 1e-7, tanh GELU),
so every block here is built through these helpers and the official weights give the official output.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, TruncatedNormal, Uniform, initializer
from mindspore.ops import constexpr

from . import cpu_kernels

LAYER_NORM_EPS = 1e-5  # also the fused CPU kernel's constant (cpu_kernels.cc)


def uses_fused_cpu_kernels():
    """Whether cells built now take the fused kernels (`cpu_kernels`): on the CPU paths, if they build."""
    return uses_cpu_paths() and cpu_kernels.available()


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm over the last axis (eps 1e-5); parameters `gamma`, `beta` as nn.LayerNorm's.

    With the fused CPU kernels a float32 input takes one multi-threaded kernel each way (MindSpore's CPU
    LayerNorm and LayerNormGrad are single-threaded); otherwise, and for other dtypes, MindSpore's.
    """

    def __init__(self, dim):
        super().__init__((dim,), epsilon=LAYER_NORM_EPS)
        self.fused = cpu_kernels.LayerNormFunction() if uses_fused_cpu_kernels() else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x, self.gamma, self.beta)
        y, _, _ = self.layer_norm(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))
        return y


def layer_norm(dim):
    return LayerNorm(dim)


def batch_norm(channels):
    # MindSpore's momentum is the weight of the running value: 0.9 here is torch's momentum=0.1.
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9)


class Dense(nn.Dense):
    """nn.Dense (parameters `weight`, `bias`); in training with the fused CPU kernels the bias gradient of a
    float32 output is one multi-threaded column sum (MindSpore's CPU BiasAddGrad took ~5% of a training
    step). Inference keeps nn.Dense's ops exactly (the bias cell measured ~3% slower there)."""

    def __init__(self, in_features, out_features, has_bias=True, **kwargs):
        super().__init__(in_features, out_features, has_bias=has_bias, **kwargs)
        self.fused_bias_add = cpu_kernels.BiasAddFunction() if has_bias and uses_fused_cpu_kernels() else None

    def construct(self, x):
        shape = x.shape
        out = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.has_bias:
            if self.fused_bias_add is not None and self.training and out.dtype == ms.float32:
                out = self.fused_bias_add(out, self.bias)
            else:
                out = self.bias_add(out, self.bias)
        return out.reshape(shape[:-1] + (out.shape[-1],))


def dense(in_features, out_features, has_bias=True):
    """Linear layer initialised as the official VOLO: truncated normal(0.02) weights, zero bias."""
    return Dense(in_features, out_features, weight_init=TruncatedNormal(0.02), bias_init="zeros", has_bias=has_bias)


# The matmul primitives: their gradients are matmuls with transpose flags. `ops.matmul` (MatMulExt)
# differentiates through explicit Transpose copies of its inputs, which took ~20% of a CPU training step.
matmul_nt = ops.MatMul(transpose_b=True)  # (M, K) x (N, K) -> (M, N)
batch_matmul = ops.BatchMatMul()  # (..., M, K) x (..., K, N) -> (..., M, N), equal leading axes


def uses_cpu_paths():
    """The one device seam: True when cells are built for MindSpore's CPU backend.

    Where MindSpore's CPU kernels are slow the cells take another formulation with the same numbers:
    convolutions as unfold/patchify + matmul (CPU Conv2D runs at ~0.6 GFLOP/s, ~50x slower) and
    outlook attention's unfold/fold as index gathers on channels-last maps (`unfold_channels_last`,
    `ChannelsLastFold`) instead of Im2Col/Col2Im between NCHW transposes. On GPU and Ascend the plain
    ops (`ops.conv2d` on cuDNN / the Cube units, `ops.unfold`, `ops.fold`) are the fast path and are kept.
    The choice is made when a cell is built, from the device set at that time.
    """
    return ms.get_context("device_target") == "CPU"


class Conv2d(nn.Cell):
    """Conv2d with torch's parameter layout and init: `weight` (out, in, k, k), optional `bias`.

    One cell, two computations behind the seam `uses_cpu_paths()`: `ops.conv2d` on
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
        self.use_matmul = uses_cpu_paths()
        self.is_patchify = kernel_size == stride and padding == 0
        if self.use_matmul:
            self.unfold = ChannelsLastUnfold(kernel_size, padding, stride)  # for `channels_last`; no parameters

    def construct(self, x):
        if not self.use_matmul:
            return ops.conv2d(x, self.weight, self.bias, stride=self.stride, pad_mode="pad",
                              padding=self.padding)
        batch, channels, height, width = x.shape
        k = self.kernel_size
        # the parameters in the activations' dtype (float16 under AMP O2/O3), as ops.conv2d would
        weight = self.weight.astype(x.dtype).reshape(self.out_channels, -1)
        if self.is_patchify:
            out_h, out_w = height // k, width // k
            patches = x.reshape(batch, channels, out_h, k, out_w, k).transpose(0, 2, 4, 1, 3, 5)
            out = matmul_nt(patches.reshape(batch * out_h * out_w, -1), weight)
            out = out.reshape(batch, out_h * out_w, -1).transpose(0, 2, 1)
        else:
            out_h = (height + 2 * self.padding - k) // self.stride + 1
            out_w = (width + 2 * self.padding - k) // self.stride + 1
            columns = ops.unfold(x, k, padding=self.padding, stride=self.stride)
            out = batch_matmul(ops.broadcast_to(weight, (batch,) + weight.shape), columns)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype).reshape(1, -1, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)

    def channels_last(self, x):
        """The same convolution on channels-last maps: (B, H, W, C) -> (B, H', W', out_channels).

        On CPU the patches come straight from the channels-last map, in (ky, kx, c) order: by the im2col
        kernel where it applies (`ChannelsLastUnfold`; for the stem's 4x4/4 patchify ~4 ms where MindSpore's
        Transpose takes ~17 ms); otherwise, for kernel == stride, one transpose whose inner runs are k * C
        contiguous values, else the gather unfold. Then one 2-D matmul (~2x the speed of the broadcast
        batched matmul of the NCHW path).
        Elsewhere it is the NCHW path between two transposes.
        """
        if not self.use_matmul:
            return self.construct(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        batch, height, width, channels = x.shape
        k = self.kernel_size
        if self.is_patchify and not self.unfold.takes_kernels(x):
            out_h, out_w = height // k, width // k
            patches = x.reshape(batch * out_h, k, out_w, k * channels).transpose(0, 2, 1, 3)
        else:
            patches = self.unfold(x)
            out_h, out_w = patches.shape[1], patches.shape[2]
        # (out, in, ky, kx) -> (out, ky, kx, in): the patches' order
        weight = self.weight.astype(x.dtype).transpose(0, 2, 3, 1).reshape(self.out_channels, -1)
        out = matmul_nt(patches.reshape(batch * out_h * out_w, k * k * channels), weight)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype)
        return out.reshape(batch, out_h, out_w, self.out_channels)


class FusedBatchNormRelu(nn.Cell):
    """The fused CPU kernels for ReLU(BatchNorm2d(x)) on channels-last maps, training and inference.
    Parameter-free: `batch_norm_relu_channels_last` passes the BatchNorm's parameters in."""

    def __init__(self):
        super().__init__()
        self.training_kernel = cpu_kernels.BatchNormReluFunction()
        self.inference_kernel = cpu_kernels.AffineReluFunction()


def batch_norm_relu_channels_last(bn, x, fused=None):
    """ReLU(bn(x)) for a channels-last x, with the parameters and statistics of the BatchNorm2d `bn`.

    With the fused CPU kernels (`fused`, a FusedBatchNormRelu) and a float32 x: in training one kernel
    computes the batch statistics, the normalisation and the ReLU channels-last, and the running statistics
    are updated here as nn.BatchNorm2d does (unbiased variance); in inference one affine + ReLU pass.
    Without them, inference applies the per-channel affine map along the last axis (MindSpore's CPU
    BatchNorm on a (B*H*W, C, 1, 1) view is ~15x slower than on NCHW) and training runs `bn` itself on the
    NCHW view. When AMP has wrapped `bn` in a casting cell it is always `bn` on the NCHW view.
    """
    plain = isinstance(bn, nn.BatchNorm2d)
    use_fused = fused is not None and plain and x.dtype == ms.float32
    if bn.training:
        if use_fused and bn.use_batch_statistics is None:
            out, mean, var = fused.training_kernel(x, bn.gamma, bn.beta)
            count = x.shape[0] * x.shape[1] * x.shape[2]
            ops.assign(bn.moving_mean, bn.moving_mean * (1 - bn.momentum) + mean * bn.momentum)
            ops.assign(bn.moving_variance,
                       bn.moving_variance * (1 - bn.momentum) + var * (count / (count - 1) * bn.momentum))
            return out
        return ops.relu(bn(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1)
    if not plain:
        return ops.relu(bn(x.transpose(0, 3, 1, 2))).transpose(0, 2, 3, 1)
    scale = bn.gamma / ops.sqrt(bn.moving_variance + bn.eps)
    shift = bn.beta - bn.moving_mean * scale
    if use_fused:
        return fused.inference_kernel(x, scale, shift)
    return ops.relu(x * scale.astype(x.dtype) + shift.astype(x.dtype))


SQRT1_2 = 0.7071067811865476


class GELU(nn.Cell):
    """Exact (erf) GELU, as torch's nn.GELU(); MindSpore's nn.GELU defaults to the tanh approximation.

    Written as torch computes it, x * 0.5 * (1 + erf(x / sqrt 2)), with the division as a multiplication:
    `ops.gelu(approximate="none")` expands to Div + Erf + Add + Mul + Mul, and on CPU the Div pass costs
    as much as three Mul passes. With the fused CPU kernels a float32 input takes one pass each way.
    Same numbers to float rounding, in any float dtype, on any device.
    """

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.GeluFunction() if uses_fused_cpu_kernels() else None

    def construct(self, x):
        if self.fused is not None and x.dtype == ms.float32:
            return self.fused(x)
        return x * 0.5 * (1.0 + ops.erf(x * SQRT1_2))


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


def split_class_token(x):
    """(B, 1 + N, C) -> class token (B, 1, C), other tokens (B, N, C), as x[:, :1], x[:, 1:].

    One Split op: MindSpore's CPU StridedSlice (what indexing compiles to) copies ~10x slower per element.
    """
    return ops.split(x, (1, x.shape[1] - 1), axis=1)


class Softmax(nn.Cell):
    """Softmax over the last axis, computed in float32 whatever the AMP level, cast back to the input's
    dtype; with the fused CPU kernels one pass each way (MindSpore's gradient takes four)."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.SoftmaxFunction() if uses_fused_cpu_kernels() else None

    def construct(self, x):
        x32 = x.astype(ms.float32)
        out = self.fused(x32) if self.fused is not None else ops.softmax(x32, axis=-1)
        return out.astype(x.dtype)


# Sliding windows on channels-last maps, by index gathers. What `ops.unfold` / `ops.fold` compute (torch's
# nn.Unfold / F.fold), with the kernel offset as its own axis and the channels last, so outlook attention
# needs no NCHW transposes. A flat map gets one zero token appended; padding taps point at it. The index
# tables depend on static shapes only and are compile-time constants in graph mode.

def _out_size(size, kernel_size, padding, stride):
    return (size + 2 * padding - kernel_size) // stride + 1


def _window_sources(height, width, kernel_size, padding, stride):
    """(out_h, out_w, k, k) flat source index of each window tap; height * width marks a padding tap."""
    offsets = np.arange(kernel_size) - padding
    rows = np.arange(_out_size(height, kernel_size, padding, stride))[:, None] * stride + offsets
    cols = np.arange(_out_size(width, kernel_size, padding, stride))[:, None] * stride + offsets
    rows, cols = rows[:, None, :, None], cols[None, :, None, :]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return np.where(inside, rows * width + cols, height * width)


@constexpr
def _unfold_index(height, width, kernel_size, padding, stride):
    return Tensor(_window_sources(height, width, kernel_size, padding, stride).reshape(-1).astype(np.int32))


@constexpr
def _fold_index(height, width, kernel_size, padding, stride):
    """(m, height * width): for each pixel the window taps that cover it, padded with the zero slot.

    m = ceil(k / stride)^2 (4 for VOLO's k=3, stride 2): overlap-add becomes m gathers and m - 1 adds.
    """
    sources = _window_sources(height, width, kernel_size, padding, stride).reshape(-1)
    covering = [[] for _ in range(height * width)]
    for tap, pixel in enumerate(sources):
        if pixel < height * width:
            covering[pixel].append(tap)
    table = np.full((max(map(len, covering)), height * width), len(sources), np.int32)
    for pixel, taps in enumerate(covering):
        table[:len(taps), pixel] = taps
    return Tensor(table)


def _with_zero_token(x):
    """(B, L, C) -> (B, L + 1, C), the last token zero."""
    return ops.cat((x, ops.zeros((x.shape[0], 1, x.shape[2]), x.dtype)), axis=1)


def unfold_channels_last(x, kernel_size, padding, stride):
    """(B, H, W, C) -> (B, out_h, out_w, k * k, C): the k x k window of every output position.

    Equals `ops.unfold` of the NCHW map, reshaped (B, C, k*k, L) -> (B, L, k*k, C).
    """
    batch, height, width, channels = x.shape
    index = _unfold_index(height, width, kernel_size, padding, stride)
    taps = ops.gather(_with_zero_token(x.reshape(batch, height * width, channels)), index, 1)
    return taps.reshape(batch, _out_size(height, kernel_size, padding, stride),
                        _out_size(width, kernel_size, padding, stride), kernel_size * kernel_size, channels)


def fold_channels_last(cols, height, width, kernel_size, padding, stride):
    """(B, out_h, out_w, k * k, C) -> (B, height, width, C): overlap-add of the windows (`ops.fold`)."""
    batch, channels = cols.shape[0], cols.shape[-1]
    flat = _with_zero_token(cols.reshape(batch, -1, channels))
    table = _fold_index(height, width, kernel_size, padding, stride)
    out = ops.gather(flat, table[0], 1)
    for i in range(1, table.shape[0]):
        out = out + ops.gather(flat, table[i], 1)
    return out.reshape(batch, height, width, channels)


class ChannelsLastWindows(nn.Cell):
    """Base of the unfold / fold cells: the window geometry, and the fused im2col / col2im kernels when the
    CPU kernels are built (one pass each, multi-threaded, where the gathers need a zero-token concat and
    MindSpore's Gather). No parameters."""

    def __init__(self, kernel_size, padding, stride):
        super().__init__()
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.kernels = uses_fused_cpu_kernels()
        if self.kernels:
            self.im2col, self.col2im, self.geometry = cpu_kernels.window_ops(kernel_size, padding, stride)

    def add_flags(self, **flags):
        # AMP's float16 flags (to_float) cast every op's inputs in PyNative mode, the kernels' included,
        # and the kernels read float32 only: a float16 cell keeps the gathers
        if flags.get("fp16") or flags.get("bf16"):
            self.kernels = False
        return super().add_flags(**flags)

    def takes_kernels(self, x):
        """Static: the kernels are built, x is float32, and folding its windows gives back its size."""
        return (self.kernels and x.dtype == ms.float32
                and _out_size(x.shape[1], self.kernel_size, self.padding, self.stride) * self.stride == x.shape[1]
                and _out_size(x.shape[2], self.kernel_size, self.padding, self.stride) * self.stride == x.shape[2])


class ChannelsLastUnfold(ChannelsLastWindows):
    """`unfold_channels_last` as a cell whose gradient is the fold (its adjoint), not a scatter of the
    gathers: MindSpore differentiates Gather with UnsortedSegmentSum, which is slower on CPU."""

    def construct(self, x):
        if self.takes_kernels(x):
            return self.im2col(x, self.geometry)
        return unfold_channels_last(x, self.kernel_size, self.padding, self.stride)

    def bprop(self, x, out, dout):
        if self.takes_kernels(x):
            return (self.col2im(dout, self.geometry),)
        return (fold_channels_last(dout, x.shape[1], x.shape[2], self.kernel_size, self.padding, self.stride),)


class ChannelsLastFold(ChannelsLastWindows):
    """`fold_channels_last` onto the (out_h * stride, out_w * stride) map (VOLO's maps are stride-aligned);
    its gradient is the unfold."""

    def construct(self, cols):
        if self.kernels and cols.dtype == ms.float32:
            return self.col2im(cols, self.geometry)
        return fold_channels_last(cols, cols.shape[1] * self.stride, cols.shape[2] * self.stride,
                                  self.kernel_size, self.padding, self.stride)

    def bprop(self, cols, out, dout):
        if self.kernels and cols.dtype == ms.float32:
            return (self.im2col(dout, self.geometry),)
        return (unfold_channels_last(dout, self.kernel_size, self.padding, self.stride),)
