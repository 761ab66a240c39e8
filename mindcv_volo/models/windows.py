"""Sliding windows on channels-last maps (unfold, fold) and the convolution built on them.

What `ops.unfold` / `ops.fold` compute (torch's nn.Unfold / F.fold), with the window tap as its own axis and
the channels last, so outlook attention needs no NCHW transposes: by index gathers, or by the fused im2col /
col2im kernels of the "cpu" backend. `Conv2d` is torch's convolution by `ops.conv2d`; `MatmulConv2d` the same
by windows + one matmul (the CPU backends). `output_size` is the one formula for the number of window positions.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer
from mindspore.ops import constexpr

from . import cpu_kernels
from .backend import Backend
from .layers import batch_matmul, matmul_nt, swap_axes_kernel, transpose


def output_size(size, kernel_size, padding, stride):
    """Positions of a k-window along an axis of `size`, as torch's unfold and convolutions count them."""
    return (size + 2 * padding - kernel_size) // stride + 1


# By index gathers: a flat map gets one zero token appended; padding taps point at it. The index tables
# depend on static shapes only and are compile-time constants in graph mode.


def _window_sources(height, width, kernel_size, padding, stride):
    """(out_h, out_w, k, k) flat source index of each window tap; height * width marks a padding tap."""
    offsets = np.arange(kernel_size) - padding
    rows = np.arange(output_size(height, kernel_size, padding, stride))[:, None] * stride + offsets
    cols = np.arange(output_size(width, kernel_size, padding, stride))[:, None] * stride + offsets
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
    return taps.reshape(batch, output_size(height, kernel_size, padding, stride),
                        output_size(width, kernel_size, padding, stride), kernel_size * kernel_size, channels)


def fold_channels_last(cols, height, width, kernel_size, padding, stride):
    """(B, out_h, out_w, k * k, C) -> (B, height, width, C): overlap-add of the windows (`ops.fold`)."""
    batch, channels = cols.shape[0], cols.shape[-1]
    flat = _with_zero_token(cols.reshape(batch, -1, channels))
    table = _fold_index(height, width, kernel_size, padding, stride)
    out = ops.gather(flat, table[0], 1)
    for i in range(1, table.shape[0]):
        out = out + ops.gather(flat, table[i], 1)
    return out.reshape(batch, height, width, channels)


def _window_kernels(kernel_size, padding, stride):
    """Sliding windows on channels-last maps as two custom ops and their geometry input:
    im2col(x, geometry): (B, H, W, C) -> (B, out_h, out_w, k * k, C), as `unfold_channels_last`;
    col2im(cols, geometry): (B, out_h, out_w, k * k, C) -> (B, out_h * stride, out_w * stride, C), the
    overlap-add (its adjoint, when the map is stride-aligned). The callers define the gradients."""

    def out_size(size):
        return output_size(size, kernel_size, padding, stride)

    im2col = cpu_kernels.custom_op(
        "Im2ColForward", lambda x, geometry: (x[0], out_size(x[1]), out_size(x[2]), kernel_size * kernel_size, x[3]),
        cpu_kernels.same_shape)
    col2im = cpu_kernels.custom_op(
        "Col2ImForward", lambda cols, geometry: (cols[0], cols[1] * stride, cols[2] * stride, cols[4]),
        cpu_kernels.same_shape)
    for op in (im2col, col2im):
        # PyNative caches an op's inferred output shape by its name, attributes and input shapes: without
        # this attribute a 4x4/4 patchify of a map would reuse the shape of a 3x3 unfold of the same map
        op.add_prim_attr("geometry", (kernel_size, stride, padding))
    return im2col, col2im, Tensor(np.array([kernel_size, stride, padding], np.int32))


class ChannelsLastWindows(nn.Cell):
    """Base of the unfold / fold cells: the window geometry, and for a backend with the fused CPU kernels the
    im2col / col2im kernels (one pass each, multi-threaded, where the gathers need a zero-token concat and
    MindSpore's Gather). No parameters."""

    def __init__(self, kernel_size, padding, stride, backend: Backend):
        super().__init__()
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.kernels = backend.fused_kernels
        if self.kernels:
            self.im2col, self.col2im, self.geometry = _window_kernels(kernel_size, padding, stride)

    def add_flags(self, **flags):
        # AMP's float16 flags (to_float) cast every op's inputs in PyNative mode, the kernels' included,
        # and the kernels read float32 only: a float16 cell keeps the gathers
        if flags.get("fp16") or flags.get("bf16"):
            self.kernels = False
        return super().add_flags(**flags)

    def takes_kernels(self, x):
        """Static: the kernels are built, x is float32, and folding its windows gives back its size."""
        return (self.kernels and x.dtype == ms.float32
                and output_size(x.shape[1], self.kernel_size, self.padding, self.stride) * self.stride == x.shape[1]
                and output_size(x.shape[2], self.kernel_size, self.padding, self.stride) * self.stride == x.shape[2])


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


class UnfoldMatmul(ChannelsLastWindows):
    """(x (B, H, W, C), weight (O, k * k * C)) -> (B, OH, OW, O): the im2col kernel's patches times weight^T, as
    the convolution's `unfold` + `matmul_nt`, with a gradient that recomputes the patches from x instead of
    keeping them from the forward. The patches are k * k times the map (for the stem's 3x3 convolutions 27.6 MB
    per image each): autodiff of unfold + matmul keeps them alive from the forward to the backward. In the
    backward the weight's gradient comes first, then the input's (ordered), so one such matrix lives at a time.
    Used where the kernels apply (`takes_kernels`); the same ops and numbers as unfold + matmul_nt, to float
    rounding.

    The backward's matmuls take the shapes MindSpore's CPU MatMul runs fastest (measured on the stem's 3x3
    convolution, B=8, 112 x 112, 64 -> 64 channels): the weight's gradient as (patches^T dy)^T, 57 ms, not dy^T
    patches, 89 ms; and for a stride-1 "same" convolution the input's gradient as the same convolution of dy
    with the flipped weight (im2col of dy, then a matmul into C columns, 40 ms + the im2col), not dy W into
    k * k * C columns (75 ms) overlap-added by col2im."""

    def __init__(self, kernel_size, padding, stride, backend: Backend):
        super().__init__(kernel_size, padding, stride, backend)
        self.matmul = ops.MatMul()
        self.matmul_tn = ops.MatMul(transpose_a=True)
        self.same_size = stride == 1 and 2 * padding == kernel_size - 1
        if self.kernels:
            # its own instance, marked: an identical im2col would be merged with the forward's (CSE), and the
            # forward's patches kept alive for it
            self.im2col_again = _window_kernels(kernel_size, padding, stride)[0]
            self.im2col_again.add_prim_attr("recomputed_in_backward", True)
            self.im2col_of_dy = _window_kernels(kernel_size, padding, stride)[0]

    def construct(self, x, weight):
        patches = self.im2col(x, self.geometry)
        batch, out_h, out_w = patches.shape[0], patches.shape[1], patches.shape[2]
        out = matmul_nt(patches.reshape(batch * out_h * out_w, -1), weight)
        return out.reshape(batch, out_h, out_w, weight.shape[0])

    def bprop(self, x, weight, out, dout):
        patches = self.im2col_again(ops.depend(x, dout), self.geometry)  # in the backward, not before
        shape = patches.shape
        rows = shape[0] * shape[1] * shape[2]
        out_channels, k = weight.shape[0], self.kernel_size
        dout_rows = dout.reshape(rows, out_channels)
        dweight = self.matmul_tn(patches.reshape(rows, -1), dout_rows).T
        if self.same_size:
            # dx[y, x, c] = sum over (ky, kx, o) of dy[y + p - ky, x + p - kx, o] w[o, ky, kx, c]: the convolution
            # of dy with w flipped in (ky, kx), its in and out channels swapped
            flipped = ops.flip(weight.reshape(out_channels, k, k, -1), (1, 2)).transpose(3, 1, 2, 0)
            dy_patches = self.im2col_of_dy(ops.depend(dout, dweight), self.geometry)
            dx = matmul_nt(dy_patches.reshape(rows, -1), flipped.reshape(flipped.shape[0], -1))
            return dx.reshape(x.shape), dweight
        dpatches = self.matmul(ops.depend(dout_rows, dweight), weight)
        return self.col2im(dpatches.reshape(shape), self.geometry), dweight


class Conv2d(nn.Cell):
    """Conv2d with torch's parameter layout and init: `weight` (out, in, k, k), optional `bias`; `ops.conv2d`
    (cuDNN, Ascend's Cube units, ONNX's Conv)."""

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

    def construct(self, x):
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, pad_mode="pad", padding=self.padding)

    def channels_last(self, x):
        """The same convolution on channels-last maps: (B, H, W, C) -> (B, H', W', out_channels); here the NCHW
        convolution between two transposes."""
        return self.construct(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)


class MatmulConv2d(Conv2d):
    """Conv2d as patches + one matmul, for MindSpore's CPU backend (its Conv2D runs at ~0.6 GFLOP/s, ~50x
    slower): a patchify reshape (kernel == stride, no padding) or the window unfold, then a matmul. The same
    numbers as `ops.conv2d` to float rounding."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, has_bias=True, *,
                 backend: Backend):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, has_bias)
        self.is_patchify = kernel_size == stride and padding == 0
        self.unfold = ChannelsLastUnfold(kernel_size, padding, stride, backend)  # for `channels_last`; no parameters
        self.swap = swap_axes_kernel(backend)
        self.unfold_matmul = UnfoldMatmul(kernel_size, padding, stride, backend)

    def construct(self, x):
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
            out_h = output_size(height, k, self.padding, self.stride)
            out_w = output_size(width, k, self.padding, self.stride)
            columns = ops.unfold(x, k, padding=self.padding, stride=self.stride)
            out = batch_matmul(ops.broadcast_to(weight, (batch,) + weight.shape), columns)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype).reshape(1, -1, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)

    def channels_last(self, x):
        """The same convolution on channels-last maps: (B, H, W, C) -> (B, H', W', out_channels).

        The patches come straight from the channels-last map, in (ky, kx, c) order: by the im2col kernel where
        it applies (`ChannelsLastUnfold`; for the stem's 4x4/4 patchify ~4 ms where MindSpore's Transpose takes
        ~17 ms); otherwise, for kernel == stride, one transpose whose inner runs are k * C contiguous values,
        else the gather unfold. Then one 2-D matmul (~2x the speed of the broadcast batched matmul of the NCHW
        path).
        """
        batch, height, width, channels = x.shape
        k = self.kernel_size
        # (out, in, ky, kx) -> (out, ky, kx, in): the patches' order
        weight = transpose(self.weight.astype(x.dtype), (0, 2, 3, 1), self.swap).reshape(self.out_channels, -1)
        if self.unfold_matmul.takes_kernels(x):
            out = self.unfold_matmul(x, weight)
            return out + self.bias.astype(x.dtype) if self.bias is not None else out
        if self.is_patchify and not self.unfold.takes_kernels(x):
            out_h, out_w = height // k, width // k
            patches = x.reshape(batch * out_h, k, out_w, k * channels).transpose(0, 2, 1, 3)
        else:
            patches = self.unfold(x)
            out_h, out_w = patches.shape[1], patches.shape[2]
        out = matmul_nt(patches.reshape(batch * out_h * out_w, k * k * channels), weight)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype)
        return out.reshape(batch, out_h, out_w, self.out_channels)


def conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, has_bias=True, *, backend: Backend):
    """The convolution cell of `backend`: patches + matmul for the CPU backends, else `ops.conv2d`."""
    if backend.matmul_convs:
        return MatmulConv2d(in_channels, out_channels, kernel_size, stride, padding, has_bias, backend=backend)
    return Conv2d(in_channels, out_channels, kernel_size, stride, padding, has_bias)
