"""Shared test set-up: the device (CPU unless MINDCV_VOLO_TEST_DEVICE names another), the reference fixtures and
their conversion, one small VOLO, tiny image data, one runner for the command-line tools, and the session's
reference training run."""
import contextlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would drown the test output
# CPU, or the accelerator scripts/device_check.sh runs the parity tests on (Ascend or GPU)
ms.set_device(os.environ.get("MINDCV_VOLO_TEST_DEVICE", "CPU"))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE_CONFIGS = json.loads((FIXTURES / "configs.json").read_text())

# The one small architecture of the tests: every stage of VOLO, compiled and trained in seconds on 2 cores.
TINY_ARCH = {"layers": [1, 1, 1, 1], "embed_dims": [16, 32, 32, 32], "num_heads": [1, 2, 2, 2],
             "stem_hidden_dim": 8, "mlp_ratio": 2.0, "img_size": 32}
CLASSES = ("circle", "square", "stripes")


# A tiny hand-written pickle writer (protocol 2 opcodes): small torch.save files without torch, for the weights
# reader's tests and the official label-map format.

def p_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()                 # GLOBAL


def p_str(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw               # BINUNICODE


def p_int(i):
    return b"J" + struct.pack("<i", i)                            # BININT


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"                          # MARK ... TUPLE


def p_dict(pairs):
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"       # EMPTY_DICT MARK ... SETITEMS


def p_tensor(storage_class, key, numel, offset, size, stride):
    """What torch.save writes for a tensor: _rebuild_tensor_v2(persistent storage, offset, size, stride, ...)."""
    storage = p_tuple(p_str("storage"), p_global("torch", storage_class), p_str(key), p_str("cpu"), p_int(numel))
    hooks = p_global("collections", "OrderedDict") + b")R"        # OrderedDict()
    args = p_tuple(storage + b"Q", p_int(offset), p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)),
                   b"\x89", hooks)                               # ... requires_grad=False, hooks
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_checkpoint(path, body, storages=None, byteorder="little"):
    """A torch-style zip: archive/data.pkl holding `body` as the pickled object, archive/data/<key>."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        archive.writestr("archive/byteorder", byteorder)
        archive.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


class WeightedSum(nn.Cell):
    """sum(cell(*args) * weights): a scalar whose gradient is the cell's vector-Jacobian product with `weights`.
    auto_prefix=False: the wrapped cell's parameters keep their names."""

    def __init__(self, cell, weights):
        super().__init__(auto_prefix=False)
        self.cell = cell
        self.weights = ms.Tensor(np.asarray(weights, np.float32))

    def construct(self, *args):
        return (self.cell(*args) * self.weights).sum()


def check_against_numpy(cell, fn, inputs, grad_tol):
    """cell(*inputs) against fn in float64, and its gradients against central differences of fn."""
    tensors = [ms.Tensor(v.astype(np.float32)) for v in inputs]
    out = cell(*tensors).asnumpy()
    np.testing.assert_allclose(out, fn(*inputs), rtol=1e-5, atol=1e-6)
    weights = np.random.default_rng(1).standard_normal(out.shape)
    grads = ms.grad(WeightedSum(cell, weights), tuple(range(len(inputs))))(*tensors)
    for got, expected in zip(grads if isinstance(grads, tuple) else (grads,), numeric_grads(fn, inputs, weights)):
        np.testing.assert_allclose(got.asnumpy(), expected, rtol=grad_tol, atol=grad_tol)


def numeric_grads(fn, inputs, weights, eps=1e-6):
    """Central differences of sum(fn(*inputs) * weights), in float64."""
    result = []
    for i, value in enumerate(inputs):
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted = [v.copy() for v in inputs]
            shifted[i][index] += eps
            up = (fn(*shifted) * weights).sum()
            shifted[i][index] -= 2 * eps
            grad[index] = (up - (fn(*shifted) * weights).sum()) / (2 * eps)
        result.append(grad)
    return result


def reference_options(name, img_size=None):
    """Command-line options that build the reference model `name` (configs.json), at `img_size` if given."""
    config = dict(REFERENCE_CONFIGS[name], **({"img_size": img_size} if img_size else {}))
    return ["--num_classes", str(config.pop("num_classes")), "--arch_overrides", json.dumps(config)]


def overrides(config_name, img_size):
    """The reference config `config_name` as VOLO arguments, at `img_size`."""
    return {**REFERENCE_CONFIGS[config_name], "img_size": img_size}


# The reference models' cases: (fixture weights file, reference config, img_size, reference outputs).
CASES = {
    "d1like_safetensors": ("tiny_d1like_64.safetensors", "tiny_d1like_64", 64, "tiny_d1like_64.io.npz"),
    "d1like_pth": ("tiny_d1like_64.pth", "tiny_d1like_64", 64, "tiny_d1like_64.io.npz"),
    "d1like_pth_tar": ("tiny_d1like_64.pth.tar", "tiny_d1like_64", 64, "tiny_d1like_64.io.npz"),
    "d5like_safetensors": ("tiny_d5like_96.safetensors", "tiny_d5like_96", 96, "tiny_d5like_96.io.npz"),
    "d1like_resized_to_96": ("tiny_d1like_64.safetensors", "tiny_d1like_64", 96, "tiny_d1like_64_at_96.io.npz"),
}


class ConvertedCheckpoints(dict):
    """case -> .ckpt path, each case converted once, on first use, through `python -m mindcv_volo.convert`."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def __missing__(self, case):
        src, config_name, img_size, _ = CASES[case]
        dst = self.folder / f"{case}.ckpt"
        result = run_tool("-m", "mindcv_volo.convert", "--src", FIXTURES / src, "--dst", dst,
                          "--model", "volo_d1_224", *reference_options(config_name, img_size))
        assert result.returncode == 0, result.stderr
        self[case] = dst
        return dst


class AllOutputs(nn.Cell):
    """Eval logits, normed tokens, class and per-token logits in one compiled graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x):
        cls_logits, aux_logits = self.model.forward_train(x)
        return self.model(x), self.model.forward_features(x), cls_logits, aux_logits


def load_converted(converted, case, **model_args):
    """The case's converted checkpoint in a model built by MindCV's create_model (with `model_args`, e.g. a
    backend), in eval mode."""
    from mindcv.models import create_model

    _, config_name, img_size, _ = CASES[case]
    model = create_model("volo_d1_224", checkpoint_path=str(converted[case]), **overrides(config_name, img_size),
                         **model_args)
    model.set_train(False)
    return model


def tiny_volo(num_classes=len(CLASSES), **overrides):
    """A VOLO of TINY_ARCH (any argument of the constructor can be replaced)."""
    from mindcv_volo.models import VOLO
    from mindcv_volo.models.volo import ARCHS

    return VOLO(**{**ARCHS["d1"], **TINY_ARCH, "num_classes": num_classes, **overrides})


def run_tool(*args, cwd=ROOT, timeout=600, cache=None, env=None):
    """Run `python ARGS...` (a script such as train.py, or -m mindcv_volo.X) as a user would; returns the
    CompletedProcess (text). `cache`: a folder for MindSpore's compile cache, shared by runs of one recipe
    (the second compiles in seconds); runs of different recipes must not share one, since the cache is
    looked up by the script, not the graph."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=tool_env(cache, env))


def tool_env(cache=None, extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("GLOG_v", None)  # as a user runs it: the scripts choose MindSpore's log level themselves
    if cache:
        env.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(cache))
    env.update(extra or {})
    return env


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def read_ckpt(path):
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(path)).items() if not isinstance(value, str)}


def max_difference(a, b):
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0
               for k in a)


# --- tiny image data --------------------------------------------------------------------------------------

def draw(kind, rng, size=32):
    """A 32x32 RGB picture of one of three shapes, jittered in place, colour and noise."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(12, 20, size=2)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(36, 64)
    elif kind == "square":
        half = rng.integers(5, 8)
        mask = (abs(yy - cy) < half) & (abs(xx - cx) < half)
    else:
        mask = (xx // rng.integers(3, 5)) % 2 == 0
    colour = rng.integers(120, 255, size=3)
    image = rng.integers(0, 40, size=(size, size, 3)) + mask[..., None] * colour
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root, per_class=None, seed=0, classes=CLASSES):
    """ImageFolder PNGs under root/<split>/<class>/; per_class {split: count}. Returns root."""
    from PIL import Image

    per_class = per_class or {"train": 16, "val": 4}
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for kind in classes:
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                Image.fromarray(draw(kind, rng)).save(os.path.join(folder, f"{index:03d}.png"))
    return str(root)


def tiny_config(path, data_dir, save_dir, **overrides):
    """A recipe for the tiny model on the tiny data, deterministic (no random augmentation, no drop path)."""
    config = {
        "model": "volo_d1_224", "arch_overrides": TINY_ARCH, "num_classes": len(CLASSES), "image_resize": 32,
        "crop_pct": 1.0, "data_dir": str(data_dir), "ckpt_save_dir": str(save_dir), "batch_size": 8,
        "epoch_size": 2, "lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 1, "warmup_lr": 1e-4, "weight_decay": 0.05,
        "drop_path_rate": 0.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": None,
        "num_parallel_workers": 1, "log_interval": 2, "keep_checkpoint_max": 5, "seed": 7,
    }
    config.update(overrides)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return str(path)


# --- order -----------------------------------------------------------------------------------------------

# The longest files first (measured with --durations=0 on the 2-core machine: 140 s down to 54 s): pytest-xdist hands out whole files
# in collection order (pytest.ini), so these start at once and the short files fill in around them, instead of
# a long file running alone at the end while the other worker idles.
LONGEST_FIRST = ("test_recipes.py", "test_msrun.py", "test_trajectories.py", "test_model_api.py", "test_finetune.py",
                 "test_train.py", "test_token_label_training.py", "test_accelerator_formulation.py", "test_onnx.py",
                 "test_cpu_kernels.py", "test_ascend_ops_check.py", "test_model.py", "test_bad_input.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest keep their order


# --- fixtures ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def graph_mode():
    """train.py's execution mode, for the steps inside; the previous mode afterwards."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


@pytest.fixture(params=["graph", pytest.param("pynative", marks=pytest.mark.slow)])
def mode(request):
    """Run the test in GRAPH_MODE and (the full suite only) in PYNATIVE_MODE."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The reference cases' checkpoints, converted through the converter CLI on first use (ConvertedCheckpoints)."""
    return ConvertedCheckpoints(tmp_path_factory.mktemp("converted"))


# The umask the exported files below are written under: the tests check they get 0640, not MindSpore's 0400.
EXPORT_UMASK = 0o027


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory):
    """The tiny D1-like fixture converted and exported to ONNX with a dynamic batch through the CLIs, as a user
    does, under EXPORT_UMASK; (its .ckpt, its .onnx)."""
    folder = tmp_path_factory.mktemp("exported")
    ckpt, onnx_file = folder / "tiny.ckpt", folder / "tiny.onnx"
    previous = os.umask(EXPORT_UMASK)  # the tools inherit it
    try:
        convert = run_tool("-m", "mindcv_volo.convert", "--src", FIXTURES / "tiny_d1like_64.safetensors", "--dst",
                           ckpt, "--model", "volo_d1_224", *reference_options("tiny_d1like_64"))
        assert convert.returncode == 0, convert.stderr
        export = run_tool("-m", "mindcv_volo.export", "--ckpt_path", ckpt, "--out", onnx_file, "--file_format", "ONNX",
                          "--dynamic_batch")  # the checkpoint describes its model
        assert export.returncode == 0, export.stderr
    finally:
        os.umask(previous)
    return ckpt, onnx_file


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """Tiny ImageFolder data: 3 classes of drawn shapes, 24 train and 6 val images each."""
    return make_image_folder(tmp_path_factory.mktemp("shapes"), {"train": 24, "val": 6})


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as an ImageFolder set at 32 px (1,438 train, 359 val), as the quick start writes it."""
    from mindcv_volo.digits import write_digits

    folder = tmp_path_factory.mktemp("digits")
    write_digits(str(folder))
    return folder


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """The compile cache shared by the runs of REFERENCE_RECIPE (reference, killed, resumed)."""
    return tmp_path_factory.mktemp("compile_cache")


# Every random part of training, on: what a resumed run must redraw exactly.
RANDOM_PARTS = dict(drop_path_rate=0.2, loss="token_label", mix_token=True, auto_augment="randaug-m9-mstd0.5-inc1",
                    re_prob=0.25, scale=[0.5, 1.0], ratio=[0.75, 1.333], hflip=0.5)

# The reference run, shared by the train and validate tests.
EPOCHS = 3
STEPS = 24  # 72 train images / batch 3 per step
REFERENCE_RECIPE = dict(epoch_size=EPOCHS, batch_size=3, ema=True, ema_decay=0.9, clip_grad=True, clip_value=1.0,
                        gradient_accumulation_steps=2, keep_checkpoint_max=2, label_smoothing=0.1,
                        val_while_train=True, val_interval=2, **RANDOM_PARTS)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, shapes, compile_cache):
    """One uninterrupted run of REFERENCE_RECIPE: EMA, clipping, gradient accumulation and every random part
    (drop path, MixToken, RandAugment, random erasing, crop and flip) on; (process, ckpt dir, config)."""
    folder = tmp_path_factory.mktemp("reference")
    config = tiny_config(folder / "recipe.yaml", shapes, folder / "ckpt", **REFERENCE_RECIPE)
    proc = run_tool("train.py", "-c", config, cache=compile_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, folder / "ckpt", config
