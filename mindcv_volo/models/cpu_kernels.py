"""The fused CPU kernels (`cpu_kernels.cc`, built by `kernel_library`) as MindSpore AOT custom ops, with their
gradients. Cells are built with them for the "cpu" backend only (`backend.Backend`): a graph exported for
deployment must not name a library that exists only on this machine.
"""
import numpy as np
from mindspore import Tensor, nn, ops

from .kernel_library import library_path


def custom_op(name, out_shape, out_dtype):
    """The kernel `name` of the library as a MindSpore AOT custom op."""
    path = library_path()
    if path is None:
        raise RuntimeError(f"{name}: the fused CPU kernels are unavailable; build for the backend that "
                           "backend.resolve_backend gives")
    return ops.Custom(f"{path}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def same_shape(x, *_):
    return x


def _map_and_two_vectors(x, vector, *_):
    """Output shapes (dtypes) of a kernel whose outputs are x-like, then two like the per-channel vector."""
    return x, vector, vector


class Float32KernelCell(nn.Cell):
    """A cell around float32-only kernels. AMP's `to_float(float16)` flags every cell to cast its inputs to
    float16 (in PyNative mode every op's inputs); here they become float32 flags instead."""

    def add_flags(self, **flags):
        if flags.get("fp16") or flags.get("bf16"):
            flags = dict(flags, fp16=False, bf16=False, fp32=True)
        return super().add_flags(**flags)


class LayerNormFunction(Float32KernelCell):
    """(x, gamma, beta) -> LayerNorm over the last axis, eps 1e-5, float32; the gradient is one kernel."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("LayerNormForward", same_shape, same_shape)
        self.backward_op = custom_op("LayerNormBackward", _map_and_two_vectors, _map_and_two_vectors)

    def construct(self, x, gamma, beta):
        return self.forward_op(x, gamma, beta)

    def bprop(self, x, gamma, beta, out, dout):
        return self.backward_op(x, gamma, dout)


class UnaryKernelFunction(Float32KernelCell):
    """y = forward kernel(x); the gradient one backward kernel of (x, dy), or of (y, dy)."""

    forward_name = backward_name = None
    backward_from_output = False

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op(self.forward_name, same_shape, same_shape)
        self.backward_op = custom_op(self.backward_name, same_shape, same_shape)

    def construct(self, x):
        return self.forward_op(x)

    def bprop(self, x, out, dout):
        return (self.backward_op(out if self.backward_from_output else x, dout),)


class GeluFunction(UnaryKernelFunction):
    """Exact (erf) GELU, float32, in one pass; the gradient in one pass."""

    forward_name, backward_name = "GeluForward", "GeluBackward"


class BiasGeluFunction(Float32KernelCell):
    """(h (..., C), bias (C)) -> GELU(h + bias), one pass; the gradient one pass giving dh and dbias."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("BiasGeluForward", same_shape, same_shape)
        self.backward_op = custom_op("BiasGeluBackward", lambda h, bias, dy: (h, bias),
                                     lambda h, bias, dy: (h, bias))

    def construct(self, h, bias):
        return self.forward_op(h, bias)

    def bprop(self, h, bias, out, dout):
        return self.backward_op(h, bias, dout)


class SoftmaxFunction(UnaryKernelFunction):
    """Softmax over the last axis, float32; the gradient from the output, as MindSpore's."""

    forward_name, backward_name, backward_from_output = "SoftmaxForward", "SoftmaxBackward", True


class BatchNormReluFunction(Float32KernelCell):
    """Training BatchNorm (batch statistics, eps 1e-5) + ReLU on a channels-last map: (x, gamma, beta) ->
    (y, batch mean, biased batch variance); the gradient one kernel, from x. The caller updates the running
    statistics."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("BatchNormReluForward", _map_and_two_vectors, _map_and_two_vectors)
        self.backward_op = custom_op("BatchNormReluBackward", _map_and_two_vectors, _map_and_two_vectors)

    def construct(self, x, gamma, beta):
        return self.forward_op(x, gamma, beta)

    def bprop(self, x, gamma, beta, out, dout):
        return self.backward_op(x, gamma, beta, dout[0])


class AffineReluFunction(Float32KernelCell):
    """max(0, x * scale + shift) per channel of a channels-last map (inference BatchNorm + ReLU), one pass;
    the gradient one kernel."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("AffineReluForward", same_shape, same_shape)
        self.backward_op = custom_op("AffineReluBackward", _map_and_two_vectors, _map_and_two_vectors)

    def construct(self, x, scale, shift):
        return self.forward_op(x, scale, shift)

    def bprop(self, x, scale, shift, out, dout):
        return self.backward_op(x, scale, shift, dout)


class BiasAddFunction(Float32KernelCell):
    """(x (N, C), bias (C)) -> x + bias by MindSpore's BiasAdd, as nn.Dense (a kernel pass of our own measured
    slower there); the bias gradient, a column sum, one kernel instead of the slow BiasAddGrad."""

    def __init__(self):
        super().__init__()
        self.forward_op = ops.BiasAdd()
        self.backward_op = custom_op("BiasAddBackward", lambda dy: dy[-1:], same_shape)

    def construct(self, x, bias):
        return self.forward_op(x, bias)

    def bprop(self, x, bias, out, dout):
        return dout, self.backward_op(dout)


def _qkv_heads_shapes(qkv, scale):
    batch, tokens, _, heads, depth = qkv
    return (batch, heads, tokens, depth), (batch, heads, depth, tokens), (batch, heads, tokens, depth)


class QkvHeadsFunction(Float32KernelCell):
    """qkv (B, N, 3, H, D) -> q * scale (B, H, N, D), k^T (B, H, D, N), v (B, H, N, D): the fused projection's
    output laid out for q @ k^T and attn @ v in one pass (a Split, a Mul and three transposes otherwise); the
    gradient the same pass back."""

    def __init__(self, scale):
        super().__init__()
        self.forward_op = custom_op("QkvHeadsForward", _qkv_heads_shapes, lambda qkv, scale: (qkv, qkv, qkv))
        self.backward_op = custom_op("QkvHeadsBackward", lambda dq, dk_t, dv, scale: (dq[0], dq[2], 3, dq[1], dq[3]),
                                     same_shape)
        self.scale = Tensor(np.array([scale], np.float32))

    def construct(self, qkv):
        return self.forward_op(qkv, self.scale)

    def bprop(self, qkv, out, dout):
        return (self.backward_op(dout[0], dout[1], dout[2], self.scale),)


class ResidualBiasAddFunction(Float32KernelCell):
    """(h (N, C), bias (C), residual (N, C)) -> residual + (h + bias) in one pass, the bits of BiasAdd then Add
    (two passes); the gradient: dy itself for h and the residual, its column sum (one kernel) for the bias."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("ResidualBiasAddForward", same_shape, same_shape)
        self.bias_grad = custom_op("BiasAddBackward", lambda dy: dy[-1:], same_shape)

    def construct(self, h, bias, residual):
        return self.forward_op(h, bias, residual)

    def bprop(self, h, bias, residual, out, dout):
        return dout, self.bias_grad(dout), dout


def _swapped_shape(x):
    return x[0], x[2], x[1], x[3]


class SwapAxesFunction(nn.Cell):
    """(A, P, Q, D) -> (A, Q, P, D), float32, in one kernel pass: a transpose without MindSpore's CPU Transpose,
    which keeps an 8-byte index per output element for the graph's lifetime. Its gradient is the same swap of
    dy. Under AMP's float16 flags (in PyNative they cast every op's inputs, which the float32 kernel would
    misread) it is MindSpore's Transpose, as before the kernel."""

    def __init__(self):
        super().__init__()
        # two instances of the one kernel: sharing one between construct and bprop makes a graph cycle once
        # the cell is inside a recomputed cell
        self.forward_op, self.backward_op = (custom_op("SwapAxesForward", _swapped_shape, same_shape)
                                             for _ in range(2))
        self.kernel = True

    def add_flags(self, **flags):
        if flags.get("fp16") or flags.get("bf16"):
            self.kernel = False
        return super().add_flags(**flags)

    def construct(self, x):
        if self.kernel:
            return self.forward_op(x)
        return x.transpose(0, 2, 1, 3)

    def bprop(self, x, out, dout):
        if self.kernel:
            return (self.backward_op(dout),)
        return (dout.transpose(0, 2, 1, 3),)


def _first_two(v, logits, *_):
    return v, logits


class OutlookAttentionFunction(Float32KernelCell):
    """Outlook attention's core on channels-last maps, float32: (v (B, H, W, C), logits (B, OH, OW, heads * K^4))
    -> (B, H, W, C), the overlap-add over the K x K windows (stride, padding) of softmax(scale * logits) times each
    window's taps of v, per head: `windows.ChannelsLastUnfold`, the softmax, the batched matmul and
    `windows.ChannelsLastFold` as one kernel. The gradient is one kernel that recomputes the softmax from the
    logits. The map must be stride-aligned (OH * stride = H)."""

    def __init__(self, num_heads, scale, kernel_size, padding, stride):
        super().__init__()
        self.forward_op = custom_op("OutlookForward", same_shape, same_shape)
        self.backward_op = custom_op("OutlookBackward", _first_two, _first_two)
        self.geometry = Tensor(np.array([kernel_size, stride, padding, num_heads], np.int32))
        self.scale = Tensor(np.array([scale], np.float32))

    def construct(self, v, logits):
        return self.forward_op(v, logits, self.geometry, self.scale)

    def bprop(self, v, logits, out, dout):
        return self.backward_op(v, logits, dout, self.geometry, self.scale)


def _halved(x):
    return x[0], x[1] // 2, x[2] // 2, x[3]


def _doubled(x):
    return x[0], x[1] * 2, x[2] * 2, x[3]


class AvgPool2x2Function(Float32KernelCell):
    """The mean of each 2 x 2 block of a channels-last map with even sides, float32: (B, H, W, C) ->
    (B, H / 2, W / 2, C), one pass each way (MindSpore's ReduceMean over a reshape and its gradient: ~14 ms on
    (8, 28, 28, 192), these ~4.5 ms)."""

    def __init__(self):
        super().__init__()
        self.forward_op = custom_op("AvgPool2x2Forward", _halved, same_shape)
        self.backward_op = custom_op("AvgPool2x2Backward", _doubled, same_shape)

    def construct(self, x):
        return self.forward_op(x)

    def bprop(self, x, out, dout):
        return (self.backward_op(dout),)
