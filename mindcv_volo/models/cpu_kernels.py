"""Fused CPU kernels (`cpu_kernels.cc`) as MindSpore AOT custom ops, with their gradients.

The C++ file is compiled with the machine's g++ on first use into a per-user cache. The kernels give the
same bits whatever instruction set they are built for (see the file's header), and they are built for a
fixed level, not for this CPU: `x86-64-v4` (AVX-512) where the CPU has it, else `x86-64-v3` (AVX2 + FMA),
`x86-64-v2` or `x86-64`; elsewhere the compiler's default (the AVX-512 build runs GELU ~1.7x faster than the
AVX2 one on an AVX-512 Xeon). The cache key holds everything the binary depends on: the source, the flags
(the level among them), the compiler and the machine's architecture, plus the CPU's own flags for a `native`
build. Concurrent processes (msrun workers) each write their own temporary file
and move it into place. A library is used only after it loads and its GELU matches float64 math on a few
points; without a compiler, or if the build, the load or that check fails, `available()` is False after
one warning, and the layers keep MindSpore's own kernels: same numbers, slower.

`MINDCV_VOLO_CPU_KERNELS=0` switches the kernels off; `MINDCV_VOLO_KERNEL_CACHE` moves the cache;
`MINDCV_VOLO_KERNEL_ARCH` sets the -march level (e.g. `native`, for a test). Inside `portable_ops()` no cell
takes them: a graph exported for deployment must not name a library that exists only on this machine.
"""
import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn, ops

from ..files import atomic_path

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -fopenmp-simd: the `omp simd` loop hints only (no OpenMP runtime). -ffp-contract=off: no FMA contraction,
# which only some instruction sets have. -fno-trapping-math lets the loops' selects vectorize; it changes no
# value.
FLAGS = ("-std=c++17", "-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
         "-shared", "-fPIC", "-pthread")
# The x86-64 micro-architecture levels, best first, with the /proc/cpuinfo flags each adds to the next.
X86_LEVELS = (("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
              ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
              ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
              ("x86-64", set()))

_library = None  # path of the built library; "" once the build has failed


class _BuildFailed(Exception):
    """The compiler refused: nothing is moved into the cache."""
_portable_depth = 0


def _cache_dir():
    configured = os.environ.get("MINDCV_VOLO_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mindcv_volo"


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def supported_targets():
    """The -march levels this CPU runs, best first ("" is the compiler's default, off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [""]
    flags, levels, needed = _cpu_flags(), [], set()
    for level, adds in reversed(X86_LEVELS):
        needed |= adds
        if needed <= flags:
            levels.insert(0, level)
    return levels


def default_target():
    return os.environ.get("MINDCV_VOLO_KERNEL_ARCH") or supported_targets()[0]


def _flags(target):
    return FLAGS + ((f"-march={target}",) if target else ())


def library_name(target, compiler_version):
    """The cache file name: a hash of everything the binary depends on."""
    # a native build depends on this very CPU; a fixed level only on the level, which is in the flags
    cpu = " ".join(sorted(_cpu_flags())) if target == "native" else ""
    parts = (SOURCE.read_bytes(), " ".join(_flags(target)).encode(), compiler_version.encode(),
             platform.machine().encode(), cpu.encode())
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return f"cpu_kernels-{digest}.so"


def build(target=None):
    """(path of the library built for -march=`target`, None) or (None, why not); cached."""
    target = default_target() if target is None else target
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None, "no C++ compiler (g++, or $CXX) on PATH"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    flags = _flags(target)
    name = library_name(target, version)
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"mindcv_volo-{os.getuid()}"):
        path = folder / name
        if path.exists():
            return str(path), None
        try:
            with atomic_path(path) as partial:
                proc = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise _BuildFailed(f"{compiler} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            return str(path), None
        except _BuildFailed as failure:
            return None, str(failure)
        except OSError:
            continue
    return None, f"no writable cache folder ({_cache_dir()})"


def call_kernel(path, name, inputs, output_shapes):
    """Run kernel `name` of the library at `path` on float32 numpy `inputs` (int32 ones, a geometry, stay int32)
    outside MindSpore (ctypes), with the AOT calling convention; returns the float32 outputs."""
    arrays = [np.ascontiguousarray(a, np.int32 if a.dtype == np.int32 else np.float32) for a in inputs]
    arrays += [np.zeros(shape, np.float32) for shape in output_shapes]
    count = len(arrays)
    sizes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    function = getattr(ctypes.CDLL(path), name)
    function.restype = ctypes.c_int
    function(count, (ctypes.c_void_p * count)(*(a.ctypes.data for a in arrays)),
             (ctypes.c_int * count)(*(a.ndim for a in arrays)),
             (ctypes.POINTER(ctypes.c_int64) * count)(*(ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in sizes)),
             None, None, None)
    return arrays[len(inputs):]


def check_library(path):
    """None if the library loads and its GELU matches float64 math (tails included), else why not."""
    points = np.array([-12.0, -6.0, -3.54, -1.0, -1e-3, 0.0, 0.5, 2.0, 7.0], np.float32)
    expected = [float(x) * 0.5 * math.erfc(-float(x) / math.sqrt(2)) for x in points]
    try:
        (got,) = call_kernel(path, "GeluForward", [points], [points.shape])
    except (OSError, AttributeError) as err:
        return f"cannot load {path}: {err}"
    if not np.allclose(got, expected, rtol=1e-6, atol=1e-30):
        return f"{path} computes GELU wrongly (got {got.tolist()}, expected {expected})"
    return None


def library_path():
    """Path of the compiled kernels, building them on the first call; None if they cannot be had."""
    global _library
    if _library is None:
        if os.environ.get("MINDCV_VOLO_CPU_KERNELS", "1") == "0":
            _library = ""
        else:
            path, reason = build()
            if path is not None:
                reason = check_library(path)
            if reason is not None:
                warnings.warn(f"mindcv_volo: fused CPU kernels unavailable ({reason}); using MindSpore's "
                              "own ops (same numbers, slower)", stacklevel=2)
            _library = path if reason is None else ""
    return _library or None


@contextlib.contextmanager
def kernels_from(path):
    """Cells built inside take the kernels of the library at `path` (a test builds for several targets)."""
    global _library
    previous, _library = _library, path
    try:
        yield
    finally:
        _library = previous


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


def custom_op(name, out_shape, out_dtype):
    """The kernel `name` of the library as a MindSpore AOT custom op."""
    return ops.Custom(f"{library_path()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


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
