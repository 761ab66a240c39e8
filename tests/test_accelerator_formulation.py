"""The accelerator formulation (what the cells build on GPU and Ascend: `ops.conv2d`, `ops.unfold`/`ops.fold`,
MindSpore's LayerNorm, GELU and softmax, AMP in float16) run on this machine's CPU.

How: every model here is built with backend="portable" (a tool run as a subprocess gets
MINDCV_VOLO_BACKEND=portable), and checked to have taken that path (`assert_accelerator_formulation`). On Ascend
or GPU (`scripts/device_check.sh`, with MINDCV_VOLO_TEST_DEVICE) the same tests run on the device, where it is the
default.

Tolerances come from the differences measured on CPU (2 cores, MindSpore 2.10), with a margin of ~4x.
"""
import json
from typing import NamedTuple

import mindspore as ms
import numpy as np
import pytest

from conftest import CASES, FIXTURES, TINY_ARCH, AllOutputs, graph_mode, load_converted, run_tool, tiny_volo
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.runtime import Runtime, amp_level
from mindcv_volo.engine.step import Training, apply_amp, build_training, dynamic_loss_scale
from mindcv_volo.models.backend import Backend
from mindcv_volo.models.layers import GELU, LayerNorm, Softmax
from mindcv_volo.models.volo import OutlookAttention, OutlookCore
from mindcv_volo.models.windows import Conv2d
from mindcv_volo.token_labeling.training import build_token_label_loss

OUTPUTS = ("logits", "tokens", "cls_logits", "aux_logits")
# float32: as the CPU formulation (tests/test_model.py); measured here 9e-8 (logits), 1.3e-6 (tokens).
FLOAT32_TOLERANCE = 1e-4
# AMP O2/O3 (float16 activations, LayerNorm and softmax in float32) against the official float32 outputs.
# Measured, both reference models, GRAPH and PYNATIVE: logits <= 3.9e-4, class logits <= 3.6e-4, aux logits
# <= 5.8e-4 (logits up to ~0.47, where a float16 step is 2.4e-4), tokens <= 5.6e-3 (values up to ~4, step 3.9e-3).
# On CPU MindSpore has no float16 kernel for Conv2D, MatMul, BatchMatMul, BiasAdd and a few reductions: it
# computes them in float32 between casts (README, Limits); the values between ops are float16.
FLOAT16_TOLERANCE = {"logits": 2e-3, "tokens": 2e-2, "cls_logits": 2e-3, "aux_logits": 2e-3}


ACCELERATOR = dict(backend="portable")  # the model argument of every model built here


def assert_accelerator_formulation(model):
    """The cells took the GPU/Ascend path: ops.conv2d, ops.unfold/fold, MindSpore's LayerNorm, GELU, softmax."""
    assert model.backend is Backend.PORTABLE
    cells = [cell for _, cell in model.cells_and_names()]
    convolutions = [cell for cell in cells if isinstance(cell, Conv2d)]
    outlookers = [cell for cell in cells if isinstance(cell, OutlookAttention)]
    fusable = [cell for cell in cells if isinstance(cell, (LayerNorm, GELU, Softmax))]
    assert convolutions and outlookers and fusable
    assert all(type(cell) is Conv2d for cell in convolutions)
    assert all(type(cell.core) is OutlookCore for cell in outlookers)
    assert all(type(cell) in (LayerNorm, GELU, Softmax) for cell in fusable)


def reference_outputs(case):
    return np.load(FIXTURES / CASES[case][3])


@pytest.mark.parametrize("case", ["d1like_safetensors", "d5like_safetensors"])
def test_outputs_match_the_official_model(converted, case, mode):
    model = load_converted(converted, case, **ACCELERATOR)
    assert_accelerator_formulation(model)
    reference = reference_outputs(case)
    outputs = AllOutputs(model)(ms.Tensor(reference["input"]))
    for name, value in zip(OUTPUTS, outputs):
        assert value.shape == reference[name].shape, name
        assert np.abs(value.asnumpy() - reference[name]).max() <= FLOAT32_TOLERANCE, name


@pytest.mark.slow  # compiles the model under AMP per level
@pytest.mark.parametrize("level", ["O2", "O3"])
def test_float16_inference_follows_float32(converted, level, mode):
    model = load_converted(converted, "d1like_safetensors", **ACCELERATOR)
    assert_accelerator_formulation(model)
    reference = reference_outputs("d1like_safetensors")
    outputs = AllOutputs(apply_amp(model, level))(ms.Tensor(reference["input"]))
    for name, value in zip(OUTPUTS, outputs):
        assert value.dtype == ms.float16, name  # computed in float16, not cast back to float32 somewhere
        value = value.asnumpy().astype(np.float32)
        assert np.isfinite(value).all(), name
        assert np.abs(value - reference[name]).max() <= FLOAT16_TOLERANCE[name], name


def test_export_round_trips(converted, tmp_path):
    out = tmp_path / "d1like.mindir"
    result = run_tool("-m", "mindcv_volo.export", "--ckpt_path", converted["d1like_safetensors"], "--out", out,
                      "--batch_size", "2", env={"MINDCV_VOLO_BACKEND": "portable"})
    assert result.returncode == 0, result.stderr
    graph = out.read_bytes()
    # the accelerator formulation's graph (the CPU formulation's export holds Gather and no Conv2D)
    assert b"Conv2D" in graph and b"Im2Col" in graph and b"Col2Im" in graph and b"Gather" not in graph
    reference = reference_outputs("d1like_safetensors")
    logits = ms.nn.GraphCell(ms.load(str(out)))(ms.Tensor(reference["input"])).asnumpy()
    assert np.abs(logits - reference["logits"]).max() <= FLOAT32_TOLERANCE


# --- train.py's step ------------------------------------------------------------------------------------

SEED, BATCH, IMG_SIZE, NUM_CLASSES = 7, 4, 64, 3  # 64 px: a 4 x 4 token grid for MixToken's box
MIX_STEP = 4  # the step whose MixToken box (drawn from seed, epoch 0, step) covers 4 of the 16 tokens
LOSS_SCALE, CLIP_VALUE, EMA_DECAY, LR = 1024.0, 1.0, 0.9, 2e-3


def step_config(level):
    """The step of the Ascend recipes on the tiny model: AMP `level`, dynamic loss scale, token labels with
    MixToken (in ground-truth mode: no label maps), AdamW; clipping and EMA on as well."""
    return parse_config([
        "--model", "volo_d1_224", "--num_classes", str(NUM_CLASSES), "--arch_overrides",
        json.dumps({**TINY_ARCH, "img_size": IMG_SIZE}), "--image_resize", str(IMG_SIZE), "--seed", str(SEED),
        "--loss", "token_label", "--mix_token", "True", "--label_smoothing", "0.1",
        "--amp_level", level, "--loss_scale_type", "dynamic", "--loss_scale", str(LOSS_SCALE),
        "--clip_grad", "True", "--clip_value", str(CLIP_VALUE), "--ema", "True", "--ema_decay", str(EMA_DECAY),
        "--opt", "adamw", "--lr", str(LR), "--weight_decay", "0.05", "--epoch_size", "1", "--warmup_epochs", "0"])


def values(params):
    return {p.name: p.asnumpy().copy() for p in params}


class Step(NamedTuple):
    """One update of train.py's step: the training it ran in, the model's values before and after, the optimizer
    state and EMA after, the step's inputs and outputs."""
    training: Training
    before: dict
    after: dict
    optimizer: dict
    ema: dict
    inputs: tuple
    loss: float
    norm: float
    overflow: bool
    scale: float


@pytest.fixture(scope="module")
def steps():
    """{"O0": Step, "O2": Step}: the same first update, from the same weights and inputs, in float32 and float16."""
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((BATCH, 3, IMG_SIZE, IMG_SIZE)).astype(np.float32),
             rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32))
    runtime = Runtime(ms.get_context("device_target"), 0, 0, 1, 1)
    result = {}
    for level in ("O0", "O2"):
        ms.set_seed(SEED)
        model = tiny_volo(NUM_CLASSES, img_size=IMG_SIZE, **ACCELERATOR)
        assert_accelerator_formulation(model)
        training = build_training(step_config(level), model, NUM_CLASSES, runtime, 1, build_token_label_loss)
        before = values(model.get_parameters())
        inputs = training.loss_network.step_inputs(batch, 0, MIX_STEP)
        with graph_mode():
            loss, norm, overflow, scale = training.update_step(*inputs)
        result[level] = Step(training, before, values(model.get_parameters()),
                             values(training.optimizer.get_parameters()), values(training.ema.ema), inputs,
                             float(loss.asnumpy()), float(norm.asnumpy()), bool(overflow.asnumpy()),
                             float(scale.asnumpy()))
    return result


def test_float16_keeps_its_level_and_a_dynamic_scale_on_this_formulation():
    """engine.runtime.amp_level keeps a recipe's O2 for the accelerator formulation even on CPU (it turns it into
    O0 only for the CPU formulation), and loss_scale_type auto then means a dynamic scale, as on Ascend."""
    assert amp_level("O2", Backend.PORTABLE) == "O2" and amp_level("O3", Backend.PORTABLE) == "O3"
    assert dynamic_loss_scale(step_config("O2").replace(loss_scale_type="auto").train_step, "O2")
    assert amp_level("O2", Backend.CPU) == "O0" and amp_level("O2", Backend.CPU_UNFUSED) == "O0"


def relative_difference(a, b):
    """|a - b| / |b| over all values (L2)."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow  # compiles train.py's float16 and float32 steps
def test_float16_step_follows_float32(steps):
    """The first update of train.py's step, float16 (O2) against float32 (O0), same weights and inputs.

    Measured: loss 4.5e-5 apart (of 1.64), global gradient norm 3.3e-4 relative, Adam's moments (the clipped
    gradients and their squares) 2.7e-3 / 1.2e-3 relative, BatchNorm statistics' change 2.8e-4 relative, the
    weights' change 5.2e-2 relative: Adam's first update is about lr * sign(gradient), so where a gradient is
    below float16's rounding its sign, and that element's update (by up to 2 lr), can differ.
    """
    single, half = steps["O0"], steps["O2"]
    assert half.training.amp_level == "O2" and half.training.dynamic_scale
    mask, lam = (value.asnumpy() for value in half.inputs[2:4])
    # MixToken mixed part of the token grid, and the class target's weight is the unmixed share
    assert 0 < mask.sum() < mask.size and lam == pytest.approx(1 - mask.sum() / mask.size)
    for step in (single, half):
        assert not step.overflow and step.scale == LOSS_SCALE
        assert float(step.training.state.loss_scale.asnumpy()) == LOSS_SCALE  # grows only after 1000 good steps
        assert step.norm > CLIP_VALUE  # the gradients were clipped
    assert 0 < abs(half.loss - single.loss) <= 2e-4  # not zero: the float16 step computed in float16
    assert relative_difference(half.norm, single.norm) <= 2e-3
    for moment in ("adam_m.", "adam_v."):
        names = [name for name in single.optimizer if name.startswith(moment)]
        assert names
        assert relative_difference(np.concatenate([half.optimizer[n].ravel() for n in names]),
                                   np.concatenate([single.optimizer[n].ravel() for n in names])) <= 1e-2, moment

    trained = [p.name for p in single.training.optimizer.parameters]
    statistics = sorted(set(single.after) - set(trained))
    assert statistics and all("moving_" in name for name in statistics)  # BatchNorm's running statistics
    for names, tolerance in ((trained, 0.2), (statistics, 1e-3)):
        change_single, change_half = (np.concatenate([(step.after[n] - step.before[n]).ravel() for n in names])
                                      for step in (single, half))
        assert relative_difference(change_half, change_single) <= tolerance
        assert np.abs(change_single).max() > 0
    for step in (single, half):  # the EMA took the update: decay * before + (1 - decay) * after
        for name in step.after:
            expected = EMA_DECAY * step.before[name] + (1 - EMA_DECAY) * step.after[name]
            assert np.abs(step.ema["ema." + name] - expected).max() <= 1e-6, name


@pytest.mark.slow  # compiles train.py's float16 and float32 steps
def test_overflowing_float16_step_is_skipped_and_the_scale_halved(steps):
    """A loss scale of 3e38 overflows float16 (and float32) gradients: the update is skipped (weights, Adam's
    moments and step, EMA unchanged) and the dynamic scale halves, as train.py's step does on Ascend. BatchNorm's
    running statistics follow the forward pass, as in MindSpore's own loss-scale cell."""
    training = steps["O2"].training
    training.state.loss_scale.set_data(ms.Tensor(3e38, ms.float32))
    kept = {"weights": list(training.optimizer.parameters), "optimizer": list(training.optimizer.get_parameters()),
            "ema": list(training.ema.ema)}
    before = {what: values(params) for what, params in kept.items()}
    with graph_mode():
        loss, norm, overflow, scale = training.update_step(*steps["O2"].inputs)
    assert bool(overflow.asnumpy()) and not np.isfinite(float(norm.asnumpy()))
    assert np.isfinite(float(loss.asnumpy()))  # the loss itself is unscaled: only the gradients overflowed
    assert float(scale.asnumpy()) == pytest.approx(3e38, rel=1e-6)
    assert float(training.state.loss_scale.asnumpy()) == pytest.approx(1.5e38, rel=1e-6)
    assert int(training.state.good_steps.asnumpy()) == 0
    for what, params in kept.items():
        after = values(params)
        assert after.keys() == before[what].keys() and after
        assert [name for name in after if not np.array_equal(after[name], before[what][name])] == [], what
