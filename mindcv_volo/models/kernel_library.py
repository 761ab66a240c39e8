"""The fused CPU kernels' library: `cpu_kernels.cc` compiled, cached and loaded (the custom-op cells that call it
are in `cpu_kernels`).

The C++ file is compiled with the machine's g++ on first use into a per-user cache. The kernels give the
same bits whatever instruction set they are built for (see the file's header), and they are built for a
fixed level, not for this CPU: `x86-64-v4` (AVX-512) where the CPU has it, else `x86-64-v3` (AVX2 + FMA),
`x86-64-v2` or `x86-64`; elsewhere the compiler's default (the AVX-512 build runs GELU ~1.7x faster than the
AVX2 one on an AVX-512 Xeon). The cache key holds everything the binary depends on: the source, the flags
(the level among them), the compiler and the machine's architecture, plus the CPU's own flags for a `native`
build. Concurrent processes (msrun workers) each write their own temporary file
and move it into place. A library is used only after it loads and its GELU matches float64 math on a few
points; without a compiler, or if the build, the load or that check fails, `available()` is False after
one warning, and the "cpu" backend resolves to "cpu_unfused" (`backend.resolve_backend`): same numbers, slower.

`MINDCV_VOLO_KERNEL_CACHE` moves the cache; `MINDCV_VOLO_KERNEL_ARCH` sets the -march level (e.g. `native`, for
a test).
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
        path, reason = build()
        if path is not None:
            reason = check_library(path)
        if reason is not None:
            warnings.warn(f"mindcv_volo: fused CPU kernels unavailable ({reason}); the cpu backend falls back "
                          "to cpu_unfused, MindSpore's own ops (same numbers, slower)", stacklevel=2)
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
    """True when the kernels built, loaded and passed their check (building them on the first call)."""
    return library_path() is not None
