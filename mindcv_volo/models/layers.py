"""Building blocks shared by the VOLO cells, with PyTorch's numerics.

MindSpore's defaults differ from PyTorch where it changes the numbers (LayerNorm eps 1e-7, tanh GELU),
so every block here is built through these helpers and the official weights give the official output.
Each helper builds the cell of a backend (`backend.Backend`): the formulation is chosen when the cell is built,
and a cell's construct follows it; what it still decides at run time is what a kernel takes (float32 inputs,
AMP's casting cells).
"""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import TruncatedNormal
from mindspore.ops import CustomRegOp, DataType, constexpr

from . import cpu_kernels
from .backend import Backend

LAYER_NORM_EPS = 1e-5  # also the fused CPU kernel's constant (cpu_kernels.cc)

class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm over the last axis (eps 1e-5) by MindSpore's op; parameters `gamma`, `beta` as
    nn.LayerNorm's."""

    def __init__(self, dim):
        super().__init__((dim,), epsilon=LAYER_NORM_EPS)

    def construct(self, x):
        y, _, _ = self.layer_norm(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))
        return y


class FusedLayerNorm(LayerNorm):
    """LayerNorm with a float32 input in one multi-threaded kernel each way (MindSpore's CPU LayerNorm and
    LayerNormGrad are single-threaded); other dtypes by MindSpore's op."""

    def __init__(self, dim):
        super().__init__(dim)
        self.fused = cpu_kernels.LayerNormFunction()

    def construct(self, x):
        if x.dtype == ms.float32:
            return self.fused(x, self.gamma, self.beta)
        return super().construct(x)


class OnnxLayerNorm(LayerNorm):
    """LayerNorm as the formula in plain ops. MindSpore exports its LayerNorm as ReduceSumSquare + Div passes,
    which onnxruntime leaves as they are; this textbook form (Pow 2, ReduceMean) it fuses into one
    LayerNormalization kernel."""

    def construct(self, x):
        centered = x - x.mean(axis=-1, keep_dims=True)
        variance = ops.pow(centered, 2.0).mean(axis=-1, keep_dims=True)
        return centered / ops.sqrt(variance + self.epsilon) * self.gamma + self.beta


def layer_norm(dim, backend: Backend):
    """The LayerNorm cell of `backend`."""
    if backend.fused_kernels:
        return FusedLayerNorm(dim)
    return OnnxLayerNorm(dim) if backend is Backend.ONNX else LayerNorm(dim)


def batch_norm(channels):
    # MindSpore's momentum is the weight of the running value: 0.9 here is torch's momentum=0.1.
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9)


class Dense(nn.Dense):
    """nn.Dense (parameters `weight`, `bias`) on (..., in_features), optionally with a residual added to its
    output (`residual + dense(x)`, the end of a block's branch)."""

    def construct(self, x, residual=None):
        out = self.project(x)
        if self.has_bias:
            out = self.bias_add(out, self.bias)
        out = out.reshape(x.shape[:-1] + (out.shape[-1],))
        return out if residual is None else residual + out

    def project(self, x):
        """x @ weight^T as (rows, out_features), without the bias: for a kernel that adds it itself."""
        return self.matmul(x.reshape(-1, x.shape[-1]), self.weight)


class FusedDense(Dense):
    """Dense with a bias, whose float32 bias and residual are added in one kernel pass
    (`ResidualBiasAddFunction`); in training the bias gradient is one multi-threaded column sum (MindSpore's CPU
    BiasAddGrad took ~5% of a training step). Without a residual, inference keeps nn.Dense's ops exactly (a
    bias-add kernel alone measured ~3% slower there)."""

    def __init__(self, in_features, out_features, **kwargs):
        super().__init__(in_features, out_features, has_bias=True, **kwargs)
        self.fused_bias_add = cpu_kernels.BiasAddFunction()
        self.fused_residual_add = cpu_kernels.ResidualBiasAddFunction()

    def construct(self, x, residual=None):
        out = self.project(x)
        out_shape = x.shape[:-1] + (out.shape[-1],)
        if residual is not None and out.dtype == ms.float32 and residual.dtype == ms.float32:
            return self.fused_residual_add(out, self.bias, residual.reshape(out.shape)).reshape(out_shape)
        if self.training and out.dtype == ms.float32:
            out = self.fused_bias_add(out, self.bias)
        else:
            out = self.bias_add(out, self.bias)
        out = out.reshape(out_shape)
        return out if residual is None else residual + out


def dense_plus_residual(layer, x, residual=None):
    """residual + layer(x), or layer(x) when residual is None: `Dense` adds the residual itself (one kernel pass
    with the bias); AMP O1's casting wrapper around a Dense takes x alone."""
    if residual is None:
        return layer(x)
    if isinstance(layer, Dense):
        return layer(x, residual)
    return residual + layer(x)


def dense(in_features, out_features, has_bias=True, *, backend: Backend):
    """The linear layer of `backend`, initialised as the official VOLO: truncated normal(0.02) weights, zero
    bias."""
    init = dict(weight_init=TruncatedNormal(0.02), bias_init="zeros")
    if has_bias and backend.fused_kernels:
        return FusedDense(in_features, out_features, **init)
    return Dense(in_features, out_features, has_bias=has_bias, **init)


# The matmul primitives: their gradients are matmuls with transpose flags. `ops.matmul` (MatMulExt)
# differentiates through explicit Transpose copies of its inputs, which took ~20% of a CPU training step.
matmul_nt = ops.MatMul(transpose_b=True)  # (M, K) x (N, K) -> (M, N)
batch_matmul = ops.BatchMatMul()  # (..., M, K) x (..., K, N) -> (..., M, N), equal leading axes


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
SQRT2 = 1.4142135623730951


def _erf_on_host(x):
    """erf of a float32 array, correctly rounded (math.erf in float64)."""
    return np.vectorize(math.erf, otypes=[np.float32])(x)


def onnx_erf():
    """erf as a Custom op that MindSpore's ONNX exporter writes as ONNX's own `Erf` node.

    The exporter has no mapping for MindSpore's Erf, but it writes a Custom op as a node whose type is the
    op's registered name, in the standard domain. In MindSpore the op runs on the host, through Python's
    correctly rounded math.erf (float32 only, CPU only, slow): enough to check the export formulation.
    """
    # a new registration each time: ops.Custom overwrites the name in the one it is given
    reg_info = (CustomRegOp("Erf").input(0, "x").output(0, "y")
                .dtype_format(DataType.F32_Default, DataType.F32_Default).target("CPU").get_op_info())
    return ops.Custom(_erf_on_host, out_shape=lambda x: x, out_dtype=lambda x: x, func_type="pyfunc",
                      reg_info=reg_info)


class GELU(nn.Cell):
    """Exact (erf) GELU, as torch's nn.GELU(); MindSpore's nn.GELU defaults to the tanh approximation.

    Written as torch computes it, x * 0.5 * (1 + erf(x / sqrt 2)), with the division as a multiplication:
    `ops.gelu(approximate="none")` expands to Div + Erf + Add + Mul + Mul, and on CPU the Div pass costs
    as much as three Mul passes. Same numbers to float rounding, in any float dtype, on any device.
    """

    def construct(self, x):
        return x * 0.5 * (1.0 + ops.erf(x * SQRT1_2))


class FusedGELU(GELU):
    """GELU with a float32 input in one kernel pass each way."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.GeluFunction()

    def construct(self, x):
        if x.dtype == ms.float32:
            return self.fused(x)
        return super().construct(x)


class OnnxGELU(GELU):
    """GELU with `onnx_erf`, and the division kept: onnxruntime fuses x * 0.5 * (1 + erf(x / sqrt 2)) into one
    Gelu kernel, but not the form with the multiplication."""

    def __init__(self):
        super().__init__()
        self.erf = onnx_erf()

    def construct(self, x):
        return x * 0.5 * (1.0 + self.erf(x / SQRT2))


def gelu(backend: Backend):
    """The GELU cell of `backend`."""
    if backend.fused_kernels:
        return FusedGELU()
    return OnnxGELU() if backend is Backend.ONNX else GELU()


class DropPath(nn.Cell):
    """Stochastic depth: in training, x / keep_prob * keep per sample (keep: 0 or 1), as the official.

    `keep` (B,) is fed with the step's inputs, drawn on the host from the seed and the position in the run
    (`engine.step.DropPathMasks`): MindSpore's in-graph random state can be neither saved nor restored, and
    Ascend does not reproduce it from a seed. A caller that feeds no masks (MindCV's own train loop, say)
    gets them drawn in the graph. Inference, and a rate of 0, pass x through.
    """

    def __init__(self, rate):
        super().__init__()
        self.keep_prob = 1.0 - rate

    def passes_through(self):
        """Static: inference, or a rate of 0."""
        return not self.training or self.keep_prob == 1.0

    def construct(self, x, keep=None):
        if self.passes_through():
            return x
        if keep is None:
            keep = ops.floor(self.keep_prob + ops.rand((x.shape[0],), dtype=x.dtype))
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x / self.keep_prob * keep.astype(x.dtype).reshape(shape)


class Mlp(nn.Cell):
    """fc1, GELU, fc2 (+ `residual`, if given). (The official Mlp's dropout is never switched on in VOLO: there is
    none.)

    Args:
        dim: input and output features.
        hidden_dim: features between fc1 and fc2.
        backend: the formulation of the cells (`backend.Backend`).
    """

    def __init__(self, dim: int, hidden_dim: int, backend: Backend):
        super().__init__()
        self.fc1 = dense(dim, hidden_dim, backend=backend)
        self.act = gelu(backend)
        self.fc2 = dense(hidden_dim, dim, backend=backend)

    def construct(self, x, residual=None):
        return dense_plus_residual(self.fc2, self.act(self.fc1(x)), residual)


class FusedMlp(Mlp):
    """Mlp whose float32 input takes fc1's bias add and the GELU as one kernel pass each way
    (`cpu_kernels.BiasGeluFunction`): the bias add and its gradient are no passes of their own."""

    def __init__(self, dim: int, hidden_dim: int, backend: Backend):
        super().__init__(dim, hidden_dim, backend)
        self.bias_gelu = cpu_kernels.BiasGeluFunction()

    def construct(self, x, residual=None):
        # not when AMP has wrapped fc1 in a casting cell (O1: the Dense layers in float16)
        if x.dtype != ms.float32 or not isinstance(self.fc1, Dense):
            return super().construct(x, residual)
        hidden = self.bias_gelu(self.fc1.project(x), self.fc1.bias).reshape(x.shape[:-1] + (-1,))
        return dense_plus_residual(self.fc2, hidden, residual)


def mlp(dim, hidden_dim, backend: Backend):
    """The Mlp cell of `backend`."""
    return (FusedMlp if backend.fused_kernels else Mlp)(dim, hidden_dim, backend)


@constexpr
def swap_plan(shape, perm):
    """How x.transpose(perm) of an x of `shape` is a swap of two adjacent groups of axes (the form of every
    transpose in VOLO): ((A, P, Q, D), output shape), x.transpose(perm) being x.reshape(A, P, Q, D) with its
    P and Q axes swapped; None for any other permutation. Static shapes only: a constant of the graph."""
    n = len(perm)
    first = next((i for i in range(n) if perm[i] != i), n)
    end = next((k for k in range(n, first, -1) if perm[k - 1] != k - 1), first)
    if first == end:
        return None
    middle = perm[first]
    if list(perm[first:end]) != list(range(middle, end)) + list(range(first, middle)):
        return None
    blocks = (math.prod(shape[:first]), math.prod(shape[first:middle]), math.prod(shape[middle:end]),
              math.prod(shape[end:]))
    return blocks, tuple(shape[axis] for axis in perm)


def transpose(x, perm, swap=None):
    """x.transpose(perm). With the CPU kernel cell `swap` (cpu_kernels.SwapAxesFunction) and a float32 x whose
    permutation swaps two adjacent groups of axes: one SwapAxes kernel pass on a reshape (a reshape alone when
    one group has size 1), same bits. MindSpore's CPU Transpose keeps an 8-byte source index per output element
    for the graph's lifetime (2x the float32 output, for every Transpose node): ~57 MB per image in VOLO-D1
    inference, more than the activations."""
    if swap is not None and x.dtype == ms.float32:
        plan = swap_plan(x.shape, perm)
        if plan is not None:
            blocks, out_shape = plan
            if blocks[1] == 1 or blocks[2] == 1:
                return x.reshape(out_shape)
            return swap(x.reshape(blocks)).reshape(out_shape)
    return x.transpose(perm)


def swap_axes_kernel(backend: Backend):
    """The SwapAxes kernel cell for `transpose` when `backend` has the fused CPU kernels; else None."""
    return cpu_kernels.SwapAxesFunction() if backend.fused_kernels else None


def split_class_token(x):
    """(B, 1 + N, C) -> class token (B, 1, C), other tokens (B, N, C), as x[:, :1], x[:, 1:].

    One Split op: MindSpore's CPU StridedSlice (what indexing compiles to) copies ~10x slower per element.
    """
    return ops.split(x, (1, x.shape[1] - 1), axis=1)


class Softmax(nn.Cell):
    """Softmax over the last axis, computed in float32 whatever the AMP level, cast back to the input's
    dtype."""

    def construct(self, x):
        return ops.softmax(x.astype(ms.float32), axis=-1).astype(x.dtype)


class FusedSoftmax(Softmax):
    """Softmax in one kernel pass each way (MindSpore's gradient takes four)."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.SoftmaxFunction()

    def construct(self, x):
        return self.fused(x.astype(ms.float32)).astype(x.dtype)


def softmax(backend: Backend):
    """The Softmax cell of `backend`."""
    return FusedSoftmax() if backend.fused_kernels else Softmax()
