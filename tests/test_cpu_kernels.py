"""The fused CPU kernels (mindcv_volo/models/cpu_kernels.cc) against float64 NumPy, values and gradients,
and the switches that keep them out of places where they do not belong."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from conftest import TINY_ARCH, WeightedSum, check_against_numpy, run_tool, tiny_volo
from mindcv_volo.models import cpu_kernels, kernel_library
from mindcv_volo.models.backend import Backend, resolve_backend
from mindcv_volo.models.layers import (Dense, FusedDense, FusedGELU, FusedLayerNorm, FusedMlp, FusedSoftmax, Mlp,
                                       dense, gelu, layer_norm, mlp, softmax)

RNG = np.random.default_rng(0)


def numpy_layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta


def numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kernels_build_on_this_machine():
    # CI has g++: the layers below must run the kernels, not the fallback, or this file tests nothing new
    assert kernel_library.available(), "the fused CPU kernels did not build (see the warning)"
    assert resolve_backend() is Backend.CPU  # the default on CPU
    assert isinstance(layer_norm(8, Backend.CPU), FusedLayerNorm) and isinstance(gelu(Backend.CPU), FusedGELU)
    assert isinstance(softmax(Backend.CPU), FusedSoftmax)


# The kernels are checked as built by default (a fixed level: x86-64-v4, AVX-512, or x86-64-v3, AVX2), for this
# very CPU (native: AVX-512 where it has it) and for the x86-64 floor (SSE2), and must give the same bits:
# what passes here passes on any x86-64 CPU.
SUPPORTED = kernel_library.supported_targets()
ON_X86 = "x86-64" in SUPPORTED
TARGETS = list(dict.fromkeys([kernel_library.default_target()] + (
    [t for t in ("x86-64-v3", "x86-64") if t in SUPPORTED] + ["native"] if ON_X86 else [])))


@pytest.fixture(scope="module")
def libraries():
    built = {}
    for target in TARGETS:
        path, reason = kernel_library.build(None if target == "default" else target)
        assert path is not None, f"{target}: {reason}"
        built[target] = path
    return built


@pytest.fixture(params=TARGETS)
def build(request, libraries):
    """Cells built in the test take the kernels built for this target."""
    with kernel_library.kernels_from(libraries[request.param]):
        yield request.param


@pytest.mark.parametrize("shape", [(2, 3, 5, 24), (3, 1, 16), (600, 8)])  # > 256 rows: split over threads
def test_layer_norm_values_and_gradients(mode, build, shape):
    x = RNG.standard_normal(shape) * 3 + 1
    gamma, beta = RNG.standard_normal(shape[-1:]), RNG.standard_normal(shape[-1:])
    cell = cpu_kernels.LayerNormFunction()
    check_against_numpy(cell, numpy_layer_norm, [x, gamma, beta], grad_tol=2e-3)


def gelu_points():
    """Every region of float32: the far tails (GELU ~ -1e-32 at -12), the centre, +-inf, NaN-free."""
    x = np.concatenate([np.linspace(-20, 20, 8001), RNG.standard_normal(40000) * 3,  # > 16384: threads
                        [-12.5, -9.0, -6.0, -3.54, -1e-30, 0.0, 1e-30, 3e38, -3e38]])
    return x.astype(np.float32).astype(np.float64)  # the points the kernel sees


def test_gelu_matches_float64_over_the_whole_range(mode, build):
    x = gelu_points()
    cdf = np.where(x < 0, 0.5 * np.vectorize(math.erfc)(-x / np.sqrt(2)),
                   1 - 0.5 * np.vectorize(math.erfc)(x / np.sqrt(2)))
    out = cpu_kernels.GeluFunction()(Tensor(x.astype(np.float32))).asnumpy()
    # relative to the value itself, tails included (the libmvec erff of an AVX-512 build returned 0 there),
    # down to 1e-35: MindSpore's threads flush subnormal floats to zero, so an intermediate within a few
    # hundred times float32's smallest normal number (1.2e-38) becomes 0 there
    np.testing.assert_allclose(out, x * cdf, rtol=1e-6, atol=1e-35)
    weights = np.random.default_rng(1).standard_normal(x.shape)
    grad = ms.grad(WeightedSum(cpu_kernels.GeluFunction(), weights))(Tensor(x.astype(np.float32))).asnumpy()
    pdf = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(grad, weights * (cdf + x * pdf), rtol=1e-5, atol=1e-6)


def test_gelu_of_infinities_and_nan(build):
    out = cpu_kernels.GeluFunction()(Tensor(np.array([np.inf, -np.inf, np.nan], np.float32))).asnumpy()
    assert out[0] == np.inf and np.isnan(out[1:]).all()  # as torch: -inf * Phi(-inf) = -inf * 0


# outlook attention: v, its windows' logits (4 heads: 8 (batch, head) pairs for the threads), dout; geometry (kernel,
# stride, padding, heads) and scale
OUTLOOK_V, OUTLOOK_LOGITS = (2, 28, 28, 48), (2, 14, 14, 4 * 81)
OUTLOOK_CONSTANTS = [np.array([3, 2, 1, 4], np.int32), np.array([0.35], np.float32)]


def outlook_operands(x):
    v = x[:math.prod(OUTLOOK_V)].reshape(OUTLOOK_V)
    return v, x[-math.prod(OUTLOOK_LOGITS):].reshape(OUTLOOK_LOGITS), x[::-1][:v.size].reshape(OUTLOOK_V)


KERNEL_CASES = {  # name: (inputs, output shapes); sizes large enough to be split over threads
    "GeluForward": lambda x: ([x], [x.shape]),
    "GeluBackward": lambda x: ([x, x[::-1]], [x.shape]),
    "BiasGeluForward": lambda x: ([x.reshape(-1, 197), x[:197]], [(x.size // 197, 197)]),
    "BiasGeluBackward": lambda x: ([x.reshape(-1, 197), x[:197], x[::-1].reshape(-1, 197)],
                                   [(x.size // 197, 197), (197,)]),
    "QkvHeadsForward": lambda x: ([x[:4 * 197 * 96].reshape(4, 197, 3, 4, 8), x[:1]],
                                  [(4, 4, 197, 8), (4, 4, 8, 197), (4, 4, 197, 8)]),
    "QkvHeadsBackward": lambda x: ([x[:4 * 197 * 32].reshape(4, 4, 197, 8), x[1:4 * 197 * 32 + 1].reshape(4, 4, 8, 197),
                                    x[::-1][:4 * 197 * 32].reshape(4, 4, 197, 8), x[:1]], [(4, 197, 3, 4, 8)]),
    "ResidualBiasAddForward": lambda x: ([x.reshape(-1, 197), x[:197], x[::-1].reshape(-1, 197)],
                                         [(x.size // 197, 197)]),
    "SoftmaxForward": lambda x: ([x.reshape(-1, 197)], [(x.size // 197, 197)]),
    "SoftmaxBackward": lambda x: ([x.reshape(-1, 197), x[::-1].reshape(-1, 197)], [(x.size // 197, 197)]),
    "LayerNormForward": lambda x: ([x.reshape(-1, 394), x[:394], x[394:788]], [(x.size // 394, 394)]),
    "LayerNormBackward": lambda x: ([x.reshape(-1, 394), x[:394], x[::-1].reshape(-1, 394)],
                                    [(x.size // 394, 394), (394,), (394,)]),
    "BatchNormReluForward": lambda x: ([x.reshape(-1, 197), x[:197], x[197:394]],
                                       [(x.size // 197, 197), (197,), (197,)]),
    "BatchNormReluBackward": lambda x: ([x.reshape(-1, 197), x[:197], x[197:394], x[::-1].reshape(-1, 197)],
                                        [(x.size // 197, 197), (197,), (197,)]),
    "BiasAddBackward": lambda x: ([x.reshape(-1, 197)], [(197,)]),
    "SwapAxesForward": lambda x: ([x.reshape(8, 197, 197, 1)], [(8, 197, 197, 1)]),
    "OutlookForward": lambda x: ([*outlook_operands(x)[:2], *OUTLOOK_CONSTANTS], [OUTLOOK_V]),
    "OutlookBackward": lambda x: ([*outlook_operands(x), *OUTLOOK_CONSTANTS], [OUTLOOK_V, OUTLOOK_LOGITS]),
    "AvgPool2x2Forward": lambda x: ([x.reshape(1, 394, 4, 197)], [(1, 197, 2, 197)]),
    "AvgPool2x2Backward": lambda x: ([x[:197 * 394].reshape(1, 197, 2, 197)], [(1, 394, 4, 197)]),
}


def test_every_build_gives_the_same_bits(libraries):
    """Not close: equal. No result may depend on the instruction set or the thread count (4 chunks here)."""
    x = (RNG.standard_normal(197 * 394 * 4) * 3).astype(np.float32)
    for name, case in KERNEL_CASES.items():
        inputs, shapes = case(x)
        results = {target: kernel_library.call_kernel(path, name, inputs, shapes) for target, path in libraries.items()}
        first = results[TARGETS[0]]
        for target, outputs in results.items():
            for got, expected in zip(outputs, first):
                assert got.tobytes() == expected.tobytes(), f"{name}: {target} differs from {TARGETS[0]}"


def test_cache_key_holds_what_the_binary_depends_on(monkeypatch):
    name = kernel_library.library_name
    monkeypatch.setattr(kernel_library, "_cpu_flags", lambda: {"sse2", "avx2"})
    native, fixed = name("native", "g++ 12"), name("x86-64-v3", "g++ 12")
    assert len({native, fixed, name("x86-64", "g++ 12"), name("x86-64-v3", "g++ 13")}) == 4
    monkeypatch.setattr(kernel_library, "_cpu_flags", lambda: {"sse2", "avx2", "avx512f"})
    assert name("native", "g++ 12") != native  # another CPU: another native build
    assert name("x86-64-v3", "g++ 12") == fixed  # a fixed level serves every CPU that has it


def test_an_unloadable_library_falls_back_with_one_warning(tmp_path):
    # a cache shared between machines could hold a file this machine cannot load
    code = ("from mindcv_volo.models import kernel_library as k; import pathlib, subprocess, shutil; "
            "from mindcv_volo.models.backend import resolve_backend; "
            "version = subprocess.run([shutil.which('g++'), '--version'], capture_output=True, text=True).stdout; "
            "pathlib.Path(k._cache_dir(), k.library_name(k.default_target(), version)).write_bytes(b'no ELF'); "
            "print('backend', resolve_backend('cpu'))")
    proc = run_python(code, MINDCV_VOLO_KERNEL_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "backend cpu_unfused" in proc.stdout
    assert proc.stderr.count("fused CPU kernels unavailable (cannot load") == 1


@pytest.mark.parametrize("shape", [(2, 4, 9), (2, 3, 197), (1000, 9)])
def test_softmax_values_and_gradients(mode, build, shape):
    x = RNG.standard_normal(shape) * 4
    check_against_numpy(cpu_kernels.SoftmaxFunction(), numpy_softmax, [x], grad_tol=1e-4)


def test_softmax_cell_keeps_float16_and_computes_in_float32(mode):
    x = RNG.standard_normal((4, 9)).astype(np.float16)
    out = softmax(Backend.CPU)(Tensor(x))
    assert out.dtype == ms.float16
    np.testing.assert_allclose(out.asnumpy(), numpy_softmax(x.astype(np.float64)), atol=1e-3)


def test_nan_propagates(mode):
    x = np.ones((4, 8), np.float32)
    x[1, 3] = np.nan
    for cell, args in [(cpu_kernels.LayerNormFunction(), (np.ones(8, np.float32), np.zeros(8, np.float32))),
                       (cpu_kernels.SoftmaxFunction(), ()), (cpu_kernels.GeluFunction(), ())]:
        out = cell(Tensor(x), *map(Tensor, args)).asnumpy()
        assert np.isnan(out[1]).any() and np.isfinite(np.delete(out, 1, axis=0)).all(), type(cell).__name__


def kernel_cells(model):
    """The cells of `model` that call the fused kernels, and the window cells that may."""
    return [cell for _, cell in model.cells_and_names()
            if isinstance(cell, (cpu_kernels.Float32KernelCell, cpu_kernels.SwapAxesFunction))
            or getattr(cell, "kernels", False) is True]


@pytest.mark.parametrize("backend", [Backend.CPU_UNFUSED, Backend.PORTABLE, Backend.ONNX])
def test_only_the_cpu_backend_builds_cells_with_kernels(backend):
    assert kernel_cells(tiny_volo(backend=Backend.CPU))
    model = tiny_volo(backend=backend)
    assert model.backend is backend and kernel_cells(model) == []


def run_python(code, **env):
    return run_tool("-c", code, timeout=300, env=env)


MODEL_RUNS = f"""
import numpy as np, mindspore as ms
ms.set_device("CPU")
from mindcv_volo import VOLO
net = VOLO(**{{**dict({TINY_ARCH!r}), "num_classes": 3}})
net.set_train(False)
print("backend", net.backend, net(ms.Tensor(np.zeros((1, 3, 32, 32), np.float32))).shape)
"""


def test_switched_off_by_environment():
    proc = run_python(MODEL_RUNS, MINDCV_VOLO_BACKEND="cpu_unfused")
    assert proc.returncode == 0, proc.stderr
    assert "backend cpu_unfused (1, 3)" in proc.stdout
    assert "fused CPU kernels unavailable" not in proc.stderr  # switched off on purpose: no warning


def test_without_a_compiler_warns_once_and_falls_back(tmp_path):
    proc = run_python(MODEL_RUNS, CXX=str(tmp_path / "no-such-g++"), MINDCV_VOLO_KERNEL_CACHE=str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert "backend cpu_unfused (1, 3)" in proc.stdout
    assert proc.stderr.count("fused CPU kernels unavailable (no C++ compiler (g++, or $CXX) on PATH)") == 1


@pytest.mark.slow  # builds the kernel library from scratch
def test_builds_into_the_cache_once(tmp_path):
    cache = tmp_path / "cache"
    for _ in range(2):
        proc = run_python("from mindcv_volo.models import kernel_library; print(kernel_library.library_path())",
                          MINDCV_VOLO_KERNEL_CACHE=str(cache))
        assert proc.returncode == 0, proc.stderr
    built = sorted(p.name for p in cache.iterdir())
    assert len(built) == 1 and built[0].startswith("cpu_kernels-") and built[0].endswith(".so")
    assert proc.stdout.strip() == str(cache / built[0])


def test_amp_float16_flags_do_not_reach_the_kernels(mode):
    # to_float(float16) would cast the kernels' inputs to float16, which they would read as float32
    x = RNG.standard_normal((6, 9)).astype(np.float32)
    cell = cpu_kernels.SoftmaxFunction().to_float(ms.float16)
    out = cell(Tensor(x))
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), numpy_softmax(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


class StemChannelsLast(nn.Cell):
    def __init__(self, stem):
        super().__init__()
        self.stem = stem

    def construct(self, x):
        return self.stem.channels_last(x)


def test_stem_batch_norm_relu_kernels_equal_batchnorm2d(mode):
    """The stem with the fused BatchNorm + ReLU kernels against the same stem on nn.BatchNorm2d (NCHW):
    outputs, parameter gradients and running statistics after a training step, then inference."""
    from mindcv_volo.models.volo import ChannelsLastPatchEmbed

    fused = StemChannelsLast(ChannelsLastPatchEmbed(3, 8, 16, Backend.CPU))
    plain = StemChannelsLast(ChannelsLastPatchEmbed(3, 8, 16, Backend.CPU_UNFUSED))
    assert fused.stem.bn_relu is not None and plain.stem.bn_relu is None
    for p, q in zip(fused.get_parameters(), plain.get_parameters()):
        assert p.name == q.name
        q.set_data(Tensor(p.asnumpy()))
    x = Tensor((RNG.standard_normal((2, 3, 32, 32)) * 2 + 0.5).astype(np.float32))
    weights = np.random.default_rng(1).standard_normal((2, 4, 4, 16))
    results = []
    for net in (fused, plain):
        net.set_train(True)
        loss = WeightedSum(net, weights)
        value, grads = ms.value_and_grad(loss, None, net.trainable_params())(x)
        stats = [p.asnumpy() for p in net.get_parameters() if "moving" in p.name]
        net.set_train(False)
        results.append((value.asnumpy(), [g.asnumpy() for g in grads], stats, net(x).asnumpy()))
    (value, grads, stats, inference), (value_ref, grads_ref, stats_ref, inference_ref) = results
    # A sum of 512 weighted outputs of size ~1 cancels down to ~0.1 at times: its rounding scales with the terms
    # (measured up to 6.7e-6 over 12 seeds in both modes, against 3.7e-5 here; rtol 1e-5 alone failed seed 2 in
    # graph mode), not with the sum
    np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-7 * np.abs(weights).sum())
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max())
    assert len(stats) == 6 and np.abs(stats[0]).max() > 1e-3  # the running stats moved
    for s, s_ref in zip(stats, stats_ref):
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(inference, inference_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 700])  # 700 rows: split over threads
def test_affine_relu_values_and_gradients(mode, rows):
    x = RNG.standard_normal((rows, 5))
    scale, shift = RNG.standard_normal(5), RNG.standard_normal(5)
    check_against_numpy(cpu_kernels.AffineReluFunction(), lambda x, s, t: np.maximum(0, x * s + t), [x, scale, shift],
          grad_tol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5), (600, 7)])  # 600 rows: split over threads
def test_bias_add_values_and_gradients(mode, shape):
    x, bias = RNG.standard_normal(shape), RNG.standard_normal(shape[-1:])
    check_against_numpy(cpu_kernels.BiasAddFunction(), lambda x, b: x + b, [x, bias], grad_tol=1e-4)


def numpy_gelu(x):
    return x * 0.5 * np.vectorize(math.erfc)(-x / np.sqrt(2))


@pytest.mark.parametrize("shape", [(3, 5), (600, 64)])  # 600 x 64: split over threads each way
def test_bias_gelu_values_and_gradients(mode, shape):
    """Against float64: the values, and the gradients from GELU's derivative Phi(x) + x phi(x)."""
    h, bias = RNG.standard_normal(shape) * 2, RNG.standard_normal(shape[-1:])
    h, bias = (v.astype(np.float32) for v in (h, bias))
    cell = cpu_kernels.BiasGeluFunction()
    x = h.astype(np.float64) + bias
    np.testing.assert_allclose(cell(Tensor(h), Tensor(bias)).asnumpy(), numpy_gelu(x), rtol=1e-5, atol=1e-6)
    weights = np.random.default_rng(1).standard_normal(shape)
    dh, dbias = ms.grad(WeightedSum(cell, weights), (0, 1))(Tensor(h), Tensor(bias))
    expected = weights * (numpy_gelu(x) / np.where(x == 0, 1, x) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi))
    np.testing.assert_allclose(dh.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dbias.asnumpy(), expected.sum(0), rtol=1e-5, atol=1e-5)


def check_against_unfused(make, input_shape):
    """A cell built by `make(backend)` with the kernels ("cpu") against one built without them ("cpu_unfused"),
    on the same random parameters: the value of a weighted sum and every gradient (input and parameters).
    Returns both."""
    fused, plain = make(Backend.CPU), make(Backend.CPU_UNFUSED)
    for p, q in zip(fused.get_parameters(), plain.get_parameters()):
        assert p.name == q.name
        q.set_data(Tensor(RNG.standard_normal(p.shape).astype(np.float32) * 0.3))
        p.set_data(Tensor(q.asnumpy()))
    x = Tensor(RNG.standard_normal(input_shape).astype(np.float32))
    weights = np.random.default_rng(1).standard_normal(input_shape)
    results = []
    for net in (fused, plain):
        value, grads = ms.value_and_grad(WeightedSum(net, weights), 0, net.trainable_params())(x)
        results.append([value.asnumpy(), grads[0].asnumpy()] + [g.asnumpy() for g in grads[1]])
    (value, *grads), (value_ref, *grads_ref) = results
    # the weighted sum cancels (hundreds of terms of size ~1 to ~0.03): its rounding scales with the terms
    np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-7 * np.abs(weights).sum())
    assert len(grads) == 1 + len(fused.trainable_params())
    for got, expected in zip(grads, grads_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    return fused, plain


def test_mlp_takes_the_bias_gelu_kernel_with_the_numbers_of_dense_and_gelu(mode):
    """The MLP with fc1's bias add in the GELU kernel against fc1 + GELU on MindSpore's ops: values and every
    gradient; and AMP O1's float16 Dense layers (fc1 wrapped in a casting cell) keep fc1 + GELU."""
    from mindcv_volo.engine.step import apply_amp

    fused, plain = check_against_unfused(lambda backend: mlp(16, 48, backend), (2, 5, 7, 16))
    assert type(fused) is FusedMlp and type(plain) is Mlp
    apply_amp(fused, "O1")
    assert not isinstance(fused.fc1, type(plain.fc2))  # wrapped
    x = Tensor(RNG.standard_normal((2, 5, 7, 16)).astype(np.float32))
    np.testing.assert_allclose(fused(x).asnumpy(), plain(x).asnumpy(), atol=2e-2)


class QkvHeadsLoss(nn.Cell):
    """sum(q * wq) + sum(k_t * wk) + sum(v * wv) of the QkvHeads kernel's three outputs."""

    def __init__(self, scale, weights):
        super().__init__()
        self.cell = cpu_kernels.QkvHeadsFunction(scale)
        self.weights = [Tensor(w.astype(np.float32)) for w in weights]

    def construct(self, qkv):
        q, k_t, v = self.cell(qkv)
        return (q * self.weights[0]).sum() + (k_t * self.weights[1]).sum() + (v * self.weights[2]).sum()


@pytest.mark.parametrize("shape", [(1, 3, 1, 2), (4, 197, 12, 32)])  # (B, N, heads, d); 48 planes: threads
def test_qkv_heads_values_and_gradients(mode, shape):
    """Copies and one multiplication: equal to NumPy's float32, not close."""
    batch, tokens, heads, depth = shape
    qkv = RNG.standard_normal((batch, tokens, 3, heads, depth)).astype(np.float32)
    scale = np.float32(depth ** -0.5)
    q, k_t, v = (t.asnumpy() for t in cpu_kernels.QkvHeadsFunction(float(scale))(Tensor(qkv)))
    assert np.array_equal(q, (qkv[:, :, 0] * scale).transpose(0, 2, 1, 3))
    assert np.array_equal(k_t, qkv[:, :, 1].transpose(0, 2, 3, 1))
    assert np.array_equal(v, qkv[:, :, 2].transpose(0, 2, 1, 3))
    weights = [RNG.standard_normal(t.shape).astype(np.float32) for t in (q, k_t, v)]
    grad = ms.grad(QkvHeadsLoss(float(scale), weights))(Tensor(qkv)).asnumpy()
    expected = np.stack([weights[0].transpose(0, 2, 1, 3) * scale, weights[1].transpose(0, 3, 1, 2),
                         weights[2].transpose(0, 2, 1, 3)], axis=2)
    assert np.array_equal(grad, expected)


def test_attention_takes_the_qkv_kernel_with_the_numbers_of_split_and_transposes(mode):
    """Self-attention with q, k, v from the QkvHeads kernel against Split + Mul + Transpose: values and every
    gradient, parameter names unchanged."""
    from mindcv_volo.models.volo import Attention, FusedAttention, Transformer

    fused, plain = check_against_unfused(lambda backend: Transformer.build_attention(32, 4, True, 0.0, backend),
                                         (2, 5, 7, 32))
    assert type(fused) is FusedAttention and type(plain) is Attention


@pytest.mark.parametrize("shape", [(3, 5), (600, 64)])  # 600 x 64: split over threads
def test_residual_bias_add_values_and_gradients(mode, shape):
    """The bits of BiasAdd then Add; the gradient dy for h and the residual, its column sum for the bias."""
    h, bias, residual = (RNG.standard_normal(s).astype(np.float32) for s in (shape, shape[-1:], shape))
    cell = cpu_kernels.ResidualBiasAddFunction()
    assert np.array_equal(cell(Tensor(h), Tensor(bias), Tensor(residual)).asnumpy(), residual + (h + bias))
    weights = RNG.standard_normal(shape)
    dh, dbias, dresidual = ms.grad(WeightedSum(cell, weights), (0, 1, 2))(Tensor(h), Tensor(bias), Tensor(residual))
    weights = weights.astype(np.float32)
    assert np.array_equal(dh.asnumpy(), weights) and np.array_equal(dresidual.asnumpy(), weights)
    np.testing.assert_allclose(dbias.asnumpy(), weights.astype(np.float64).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block, input_shape", [("Outlooker", (2, 6, 6, 32)), ("Transformer", (2, 5, 7, 32)),
                                                ("ClassBlock", (2, 9, 32))])
def test_blocks_add_their_residuals_in_the_kernel_with_the_numbers_of_add(mode, block, input_shape):
    """Each VOLO block with its residual adds inside the branches' last Dense against the plain adds: values and
    every gradient (drop path 0, so the block's two residual adds both take the kernel)."""
    from mindcv_volo.models import volo

    fused, _ = check_against_unfused(lambda backend: getattr(volo, block)(32, 4, backend=backend), input_shape)
    assert isinstance(fused.attn.proj, FusedDense) and isinstance(fused.mlp.fc2, FusedDense)


def test_dense_takes_the_bias_kernel_and_keeps_its_parameter_names():
    layer = dense(4, 3, backend=Backend.CPU)
    assert type(layer) is FusedDense and type(dense(4, 3, has_bias=False, backend=Backend.CPU)) is Dense
    layer.set_train(True)  # the kernel serves the gradient: training only
    assert [p.name for p in layer.get_parameters()] == ["weight", "bias"]
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    expected = x @ layer.weight.asnumpy().T + layer.bias.asnumpy()
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (3, 70, 40, 2), (1, 3, 2500, 1), (64, 600, 12, 32)])
def test_swap_axes_values_and_gradients(mode, shape):
    """Both loops (runs of >= 8 values, tiled planes for shorter runs), large enough to be split over threads;
    a copy: equal, not close."""
    x = RNG.standard_normal(shape).astype(np.float32)
    cell = cpu_kernels.SwapAxesFunction()
    assert np.array_equal(cell(Tensor(x)).asnumpy(), x.transpose(0, 2, 1, 3))
    dy = RNG.standard_normal(x.transpose(0, 2, 1, 3).shape).astype(np.float32)
    grad = ms.grad(WeightedSum(cell, dy))(Tensor(x)).asnumpy()
    assert np.array_equal(grad, dy.transpose(0, 2, 1, 3))


# every permutation VOLO transposes with (attention, class attention, outlook attention, stem, weights)
VOLO_PERMUTATIONS = [((2, 49, 4, 16), (0, 2, 1, 3)), ((2, 49, 4, 16), (0, 2, 3, 1)), ((2, 4, 49, 16), (0, 2, 1, 3)),
                     ((2, 16, 9, 4, 8), (0, 1, 3, 2, 4)), ((2, 3, 32, 32), (0, 2, 3, 1)), ((8, 4, 3, 3), (0, 2, 3, 1)),
                     ((2, 4, 1, 16), (0, 2, 1, 3))]


@pytest.mark.parametrize("shape, perm", VOLO_PERMUTATIONS)
def test_transpose_takes_the_swap_kernel_with_the_same_result(mode, shape, perm):
    from mindcv_volo.models.layers import swap_plan, transpose

    assert swap_plan(shape, perm) is not None
    x = RNG.standard_normal(shape).astype(np.float32)

    class Transpose(nn.Cell):
        def __init__(self):
            super().__init__()
            self.swap = cpu_kernels.SwapAxesFunction()

        def construct(self, x):
            return transpose(x, perm, self.swap)

    assert np.array_equal(Transpose()(Tensor(x)).asnumpy(), x.transpose(perm))


def test_swap_plan_refuses_other_permutations():
    from mindcv_volo.models.layers import swap_plan

    assert swap_plan((2, 3, 4, 5), (0, 1, 2, 3)) is None  # identity
    assert swap_plan((2, 3, 4, 5), (0, 3, 1, 2)) == ((2, 12, 5, 1), (2, 5, 3, 4))
    assert swap_plan((2, 3, 4, 5), (1, 0, 3, 2)) is None  # two separate swaps
    assert swap_plan((2, 3, 4, 5), (2, 1, 0, 3)) is None  # reverses three axes


def test_swap_axes_keeps_mindspore_transpose_under_float16_flags(mode):
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float16)
    cell = cpu_kernels.SwapAxesFunction().to_float(ms.float16)
    assert not cell.kernel
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), x.transpose(0, 2, 1, 3))
