"""Tiny data, a tiny VOLO and subprocess runners for the train/validate tests (CPU, 32 px, seconds per run)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "square", "stripes")
# Small enough to compile and train in seconds on 2 cores; still every stage of VOLO.
TINY_ARCH = {"layers": [1, 1, 1, 1], "embed_dims": [16, 32, 32, 32], "num_heads": [1, 2, 2, 2],
             "stem_hidden_dim": 8, "mlp_ratio": 2.0, "img_size": 32}


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
        # MindSpore's in-graph random state (drop path) and the data pipeline's random ops cannot be put
        # back where a killed run left them, so runs that must match exactly use neither.
        "drop_path_rate": 0.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": None,
        "num_parallel_workers": 1, "log_interval": 2, "keep_checkpoint_max": 5, "seed": 7,
    }
    config.update(overrides)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return str(path)


def script_env(cache=None):
    """The environment of a run; `cache`: a folder for MindSpore's compile cache.

    Runs of one recipe may share a cache folder (the second compiles in seconds instead of a minute);
    runs of different recipes must not, since the cache is looked up by the script, not the graph.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GLOG_v", None)  # as a user runs it: the scripts choose MindSpore's log level themselves
    if cache:
        env.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=str(cache))
    return env


def run_script(script, *args, timeout=600, cache=None):
    """Run train.py / validate.py; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=script_env(cache))


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def read_ckpt(path):
    import mindspore as ms

    return {name: param.asnumpy() for name, param in ms.load_checkpoint(str(path)).items()}


def max_difference(a, b):
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) if a[k].size else 0.0
               for k in a)


# The reference run, shared by test_train.py and test_validate.py (import these fixtures by name).
EPOCHS = 3
STEPS = 24  # 72 train images / batch 3 per step
RECIPE = dict(epoch_size=EPOCHS, batch_size=3, ema=True, ema_decay=0.9, clip_grad=True, clip_value=1.0,
              gradient_accumulation_steps=2, keep_checkpoint_max=2, label_smoothing=0.1, val_while_train=True,
              val_interval=2)


# Fixtures imported into two test modules are two fixtures to pytest: each would run once per module,
# so the values are kept here and made once per session.
_SESSION = {}


def _once(key, make):
    if key not in _SESSION:
        _SESSION[key] = make()
    return _SESSION[key]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return _once("data", lambda: make_image_folder(tmp_path_factory.mktemp("shapes"), {"train": 24, "val": 6}))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The compile cache shared by the runs of RECIPE (reference, killed, resumed)."""
    return _once("cache", lambda: tmp_path_factory.mktemp("compile_cache"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data, cache):
    """One uninterrupted run of RECIPE: EMA, clipping and gradient accumulation on; (process, ckpt dir, config)."""
    def run():
        folder = tmp_path_factory.mktemp("reference")
        config = tiny_config(folder / "recipe.yaml", data, folder / "ckpt", **RECIPE)
        proc = run_script("train.py", "-c", config, cache=cache)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc, folder / "ckpt", config

    return _once("reference", run)
