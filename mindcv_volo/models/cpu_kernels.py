"""Fused CPU kernels (`cpu_kernels.cc`) as MindSpore AOT custom ops, with their gradients.

The C++ file is compiled with the machine's g++ on first use into a per-user cache, keyed by the source,
the flags and the compiler; concurrent processes (msrun workers) each write their own temporary file and
move it into place. Without a compiler, or if the build fails, `available()` is False after one warning,
and the layers keep MindSpore's own kernels: same numbers, slower.

`MINDCV_VOLO_CPU_KERNELS=0` switches the kernels off; `MINDCV_VOLO_KERNEL_CACHE` moves the cache.
Inside `portable_ops()` no cell takes them: a graph exported for deployment must not name a library that
exists only on this machine.
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn, ops

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -fopenmp-simd: the `omp simd` loop hints only (no OpenMP runtime); -lmvec: glibc's vector erff/expf
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC",
         "-pthread")
LIBS = ("-lmvec",)

_library = None  # path of the built library; "" once the build has failed
_portable_depth = 0


def _cache_dir():
    configured = os.environ.get("MINDCV_VOLO_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mindcv_volo"


def _build():
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++, or $CXX) on PATH"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS + LIBS).encode(),
                                     version.encode()])).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"mindcv_volo-{os.getuid()}"):
        target = folder / f"cpu_kernels-{key}.so"
        if target.exists():
            return str(target), None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{target.name}.{os.getpid()}"
            proc = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), *LIBS],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                return None, f"{compiler} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            os.replace(partial, target)
            return str(target), None
        except OSError:
            continue
    return None, f"no writable cache folder ({_cache_dir()})"


def library_path():
    """Path of the compiled kernels, building them on the first call; None if they cannot be had."""
    global _library
    if _library is None:
        if os.environ.get("MINDCV_VOLO_CPU_KERNELS", "1") == "0":
            _library = ""
        else:
            path, reason = _build()
            if path is None:
                warnings.warn(f"mindcv_volo: fused CPU kernels unavailable ({reason}); using MindSpore's "
                              "own ops (same numbers, slower)", stacklevel=2)
            _library = path or ""
    return _library or None


def available():
    """True when cells built now may use the fused kernels (the caller has chosen the CPU paths)."""
    return _portable_depth == 0 and library_path() is not None


@contextlib.contextmanager
def portable_ops():
    """Cells built inside use MindSpore's own ops only (for export)."""
    global _portable_depth
    _portable_depth += 1
    try:
        yield
    finally:
        _portable_depth -= 1


def _custom(name, out_shape, out_dtype):
    return ops.Custom(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _same(x, *_):
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
        self.forward_op = _custom("LayerNormForward", _same, _same)
        self.backward_op = _custom("LayerNormBackward", _map_and_two_vectors, _map_and_two_vectors)

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
        self.forward_op = _custom(self.forward_name, _same, _same)
        self.backward_op = _custom(self.backward_name, _same, _same)

    def construct(self, x):
        return self.forward_op(x)

    def bprop(self, x, out, dout):
        return (self.backward_op(out if self.backward_from_output else x, dout),)


class GeluFunction(UnaryKernelFunction):
    """Exact (erf) GELU, float32, in one pass; the gradient in one pass."""

    forward_name, backward_name = "GeluForward", "GeluBackward"


class SoftmaxFunction(UnaryKernelFunction):
    """Softmax over the last axis, float32; the gradient from the output, as MindSpore's."""

    forward_name, backward_name, backward_from_output = "SoftmaxForward", "SoftmaxBackward", True


class BatchNormReluFunction(Float32KernelCell):
    """Training BatchNorm (batch statistics, eps 1e-5) + ReLU on a channels-last map: (x, gamma, beta) ->
    (y, batch mean, biased batch variance); the gradient one kernel, from x. The caller updates the running
    statistics."""

    def __init__(self):
        super().__init__()
        self.forward_op = _custom("BatchNormReluForward", _map_and_two_vectors, _map_and_two_vectors)
        self.backward_op = _custom("BatchNormReluBackward", _map_and_two_vectors, _map_and_two_vectors)

    def construct(self, x, gamma, beta):
        return self.forward_op(x, gamma, beta)

    def bprop(self, x, gamma, beta, out, dout):
        return self.backward_op(x, gamma, beta, dout[0])


class AffineReluFunction(Float32KernelCell):
    """max(0, x * scale + shift) per channel of a channels-last map (inference BatchNorm + ReLU), one pass;
    the gradient one kernel."""

    def __init__(self):
        super().__init__()
        self.forward_op = _custom("AffineReluForward", _same, _same)
        self.backward_op = _custom("AffineReluBackward", _map_and_two_vectors, _map_and_two_vectors)

    def construct(self, x, scale, shift):
        return self.forward_op(x, scale, shift)

    def bprop(self, x, scale, shift, out, dout):
        return self.backward_op(x, scale, shift, dout)


def window_ops(kernel_size, padding, stride):
    """Sliding windows on channels-last maps as two custom ops and their geometry input:
    im2col(x, geometry): (B, H, W, C) -> (B, out_h, out_w, k * k, C), as `layers.unfold_channels_last`;
    col2im(cols, geometry): (B, out_h, out_w, k * k, C) -> (B, out_h * stride, out_w * stride, C), the
    overlap-add (its adjoint, when the map is stride-aligned). The callers define the gradients."""

    def out_size(size):
        return (size + 2 * padding - kernel_size) // stride + 1

    im2col = _custom("Im2ColForward",
                     lambda x, geometry: (x[0], out_size(x[1]), out_size(x[2]), kernel_size * kernel_size, x[3]),
                     _same)
    col2im = _custom("Col2ImForward", lambda cols, geometry: (cols[0], cols[1] * stride, cols[2] * stride, cols[4]),
                     _same)
    for op in (im2col, col2im):
        # PyNative caches an op's inferred output shape by its name, attributes and input shapes: without
        # this attribute a 4x4/4 patchify of a map would reuse the shape of a 3x3 unfold of the same map
        op.add_prim_attr("geometry", (kernel_size, stride, padding))
    return im2col, col2im, Tensor(np.array([kernel_size, stride, padding], np.int32))


class BiasAddFunction(Float32KernelCell):
    """(x (N, C), bias (C)) -> x + bias by MindSpore's BiasAdd, as nn.Dense (a kernel pass of our own measured
    slower there); the bias gradient, a column sum, one kernel instead of the slow BiasAddGrad."""

    def __init__(self):
        super().__init__()
        self.forward_op = ops.BiasAdd()
        self.backward_op = _custom("BiasAddBackward", lambda dy: dy[-1:], _same)

    def construct(self, x, bias):
        return self.forward_op(x, bias)

    def bprop(self, x, bias, out, dout):
        return dout, self.backward_op(dout)
