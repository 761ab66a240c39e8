"""train.py's compiled step, step for step, against the official training (reference trajectories).

The fixtures in tests/fixtures/trajectories/ come from benchmarks/reference_trajectories.py, run in a PyTorch
environment: timm's VOLO, sail-sg's token-labeling losses and targets, timm's AdamW, ModelEmaV2 and
CosineLRScheduler, driven as sail-sg's main.py drives them, from weights and a batch both sides regenerate from
the case's seed (numpy) and with the draws the official code makes inside the model (the MixToken box, the
drop-path masks) given to both. Here the same case runs through engine.step's TrainStep (as train.py builds it:
the token-label loss cell, MindCV's AdamW with the recipe's optimizer options) and must give the official loss
before every micro-step (relative 1e-4) and the official weights after the last update (each tensor within 1e-4
of its scale: the norm of the difference over the tensor's norm; the largest single difference, over the largest
value, is printed too: Adam's normalised steps amplify float32 rounding in the few elements whose gradients are
near 0, up to 1.1e-4 in the 7x7 stem convolution). Where the recipes differ from the official on purpose, the
test pins the difference.
"""
import importlib.util
import json
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import ROOT, graph_mode
from mindcv_volo.engine.augment import Geometry
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.optim import build_optimizer, learning_rates
from mindcv_volo.engine.step import build_train_steps
from mindcv_volo.models import VOLO
from mindcv_volo.models.volo import ARCHS
from mindcv_volo.token_labeling.label_maps import label_map_columns
from mindcv_volo.token_labeling.loss import LabelMapsWithLoss, LabelsWithLoss, TokenLabelCrossEntropy
from mindcv_volo.token_labeling.mix_token import box_mask, mixed_lambda
from mindcv_volo.weights.state import assign_state, from_official_names, official_name

pytestmark = pytest.mark.slow  # a compiled train step per case: the full suite only

TRAJECTORIES = ROOT / "tests" / "fixtures" / "trajectories"
D1_RECIPE = str(ROOT / "configs" / "volo_d1_ascend.yaml")
TOLERANCE = 1e-4


def load_benchmark(name):
    """benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = load_benchmark("reference_trajectories")  # its numpy helpers regenerate each case's weights and batch


def load_case(name):
    with np.load(TRAJECTORIES / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(str(arrays.pop("case"))), arrays


def official_shapes(model):
    return {official_name(p.name): tuple(p.shape) for p in model.get_parameters()}


def official_state(params):
    return {official_name(p.name): p.asnumpy() for p in params}


def step_relative(ours, theirs):
    """The largest |ours - theirs| / |theirs| over the values (the losses of the steps)."""
    theirs = np.asarray(theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs) / np.abs(theirs)))


def norm_relative(ours, theirs):
    """|ours - theirs| / |theirs|, Euclidean norms over the whole tensor."""
    theirs = np.asarray(theirs, np.float64)
    return float(np.linalg.norm(np.asarray(ours, np.float64) - theirs) / max(np.linalg.norm(theirs), 1e-30))


def max_relative(ours, theirs):
    """max |ours - theirs| over max |theirs|."""
    theirs = np.asarray(theirs, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def worst(ours, theirs, measure=norm_relative):
    """(the worst `measure` of a tensor, its name) over the tensors of `theirs`."""
    return max((measure(ours[name], value), name) for name, value in theirs.items())


def map_columns(case, arrays):
    """The label-map columns of the batch, as the training pipeline makes them: each map covers its whole
    image, which is not cropped, flipped or moved."""
    size, grid = case["arch"]["img_size"], reference.token_grid(case)
    whole = Geometry((size, size), (0, 0, size, size), size)
    columns = [label_map_columns(indices, scores, whole, grid)
               for indices, scores in zip(arrays["map_indices"], arrays["map_scores"])]
    return [np.stack(column) for column in zip(*columns)]


class Trajectory:
    """A case trained through train.py's compiled step: `losses` (one per micro-step), the model, the EMA."""

    def __init__(self, name, portable=False):
        self.case, self.arrays = case, arrays = load_case(name)
        # the accelerator formulation (ops.conv2d, unfold/fold, MindSpore's norms) when `portable`
        self.model = model = VOLO(**{**ARCHS["d1"], **case["arch"]}, drop_path_rate=case["drop_path_rate"],
                                  backend="portable" if portable else None)
        assert list(model.drop_path_keep_probs()) == pytest.approx(case["keep_probs"])  # the official rows
        self.init = reference.seeded_state(official_shapes(model), case["seed"])
        images, labels = reference.seeded_batch(case)
        assert reference.digest(self.init, images, labels) == str(arrays["digest"]), "not the official start"
        assign_state(model, from_official_names(model, self.init))
        loss_fn = TokenLabelCrossEntropy(case["cls_weight"], case["dense_weight"], case["smoothing"])
        classes = case["arch"]["num_classes"]
        if case["label_maps"]:
            loss_network = LabelMapsWithLoss(model, loss_fn, classes)
            targets = [labels, *map_columns(case, arrays)]
        else:
            loss_network = LabelsWithLoss(model, loss_fn, classes)
            targets = [labels]
        config = parse_config(["-c", D1_RECIPE, "--weight_decay", str(case["weight_decay"])])
        optimizer = build_optimizer(config.optimizer, model, case["lr"])
        step_options = SimpleNamespace(loss_scale=1.0, ema_decay=case["ema_decay"] or 0.0, clip_grad=False,
                                       clip_value=0.0, gradient_accumulation_steps=case["accumulation"])
        micro, update, _, self.ema = build_train_steps(loss_network, optimizer, model, step_options,
                                                       ema=bool(case["ema_decay"]))
        if "pinned_smoothing" in case:
            self.pinned_loss = self._loss_at_start(targets, images, classes)
        grid, batch, accumulation = reference.token_grid(case), case["batch_size"], case["accumulation"]
        self.losses = []
        with graph_mode():
            for index, masks in enumerate(arrays["drop_masks"]):
                box = tuple(arrays["boxes"][index // accumulation])
                part = slice((index % accumulation) * batch, (index % accumulation + 1) * batch)
                inputs = [Tensor(images[part]), *(Tensor(target[part]) for target in targets),
                          Tensor(box_mask(box, grid, grid)), Tensor(mixed_lambda(box, grid, grid), ms.float32),
                          Tensor(masks)]
                cell = update if (index + 1) % accumulation == 0 else micro
                self.losses.append(float(cell(*inputs)[0].asnumpy()))

    def _loss_at_start(self, targets, images, classes):
        """Our loss of the first batch at the official smoothing, before any update (the forward's BatchNorm
        statistics are put back)."""
        smoothed = LabelMapsWithLoss(self.model, TokenLabelCrossEntropy(
            self.case["cls_weight"], self.case["dense_weight"], self.case["pinned_smoothing"]), classes)
        smoothed.set_train(True)
        batch = self.case["batch_size"]
        grid = reference.token_grid(self.case)
        loss = smoothed(Tensor(images[:batch]), *(Tensor(t[:batch]) for t in targets),
                        Tensor(box_mask((0, 0, 0, 0), grid, grid)), Tensor(1.0, ms.float32),
                        Tensor(self.arrays["drop_masks"][0]))
        assign_state(self.model, from_official_names(self.model, self.init))
        return float(loss.asnumpy())

    def final(self):
        return official_state(self.model.get_parameters())

    def official(self, prefix):
        return {name[len(prefix) + 1:]: value for name, value in self.arrays.items() if name.startswith(prefix + "/")}


def check_trajectory(trajectory):
    """The official loss before every micro-step and the official weights after the last update."""
    reference_losses = trajectory.arrays["losses"]
    assert len(trajectory.losses) == len(reference_losses)
    loss_rel = step_relative(trajectory.losses, reference_losses)
    final, official = trajectory.final(), trajectory.official("final")
    weight_rel, where = worst(final, official)
    element_rel, element_where = worst(final, official, max_relative)
    print(f"\nloss rel {loss_rel:.2e}, weight rel {weight_rel:.2e} ({where}), largest element "
          f"{element_rel:.2e} ({element_where})")
    assert loss_rel <= TOLERANCE, (trajectory.losses, reference_losses.tolist())
    assert weight_rel <= TOLERANCE, where


@pytest.mark.parametrize("name", ["mix_token", "drop_path", "accumulation"])
def test_trajectory(name):
    check_trajectory(Trajectory(name))


def test_mix_token_in_the_accelerator_formulation():
    """Case mix_token again, the model built as on Ascend and GPU (float32): the same official trajectory."""
    check_trajectory(Trajectory("mix_token", portable=True))


def test_teacher_label_maps():
    """Teacher maps, the official TokenLabelCrossEntropy: the trajectory without smoothing; with smoothing 0.1 the
    difference on purpose (label_maps.py: ours sums to 1, the official t (1 - eps + eps / K) + eps / K to
    1 + eps / K) is exactly eps / K times the unsmoothed loss, pinned at the start."""
    trajectory = Trajectory("label_maps")
    check_trajectory(trajectory)
    case = trajectory.case
    eps_over_k = case["pinned_smoothing"] / case["arch"]["num_classes"]
    official = float(trajectory.arrays["pinned_loss"])
    difference = official - trajectory.pinned_loss
    print(f"smoothing: official {official:.6f}, ours {trajectory.pinned_loss:.6f}, difference {difference:.6f}, "
          f"eps / K x unsmoothed loss {eps_over_k * trajectory.losses[0]:.6f}")
    assert difference == pytest.approx(eps_over_k * trajectory.losses[0], rel=1e-3)
    assert official - trajectory.pinned_loss > 1e-3  # a real difference, not a rounding


def test_ema_with_the_official_decay():
    """The EMA (decay 0.99992, as sail-sg's main.py) equals ModelEmaV2's. In 8 updates it moves by about 1e-4 of
    the weights' change, near float32's resolution of the weights themselves: so what it moved is compared over
    the whole state (norm of the difference over the norm of the movement); an EMA left at its start is 100% off."""
    trajectory = Trajectory("ema")
    check_trajectory(trajectory)
    ours = {official_name(p.name): e.asnumpy() for p, e in zip(trajectory.ema.params, trajectory.ema.ema)}
    theirs = trajectory.official("ema")
    ema_rel, where = worst(ours, theirs)
    moved_ours = np.concatenate([(ours[name] - trajectory.init[name]).ravel() for name in theirs]).astype(np.float64)
    moved = np.concatenate([(theirs[name] - trajectory.init[name]).ravel() for name in theirs]).astype(np.float64)
    moved_rel = float(np.linalg.norm(moved_ours - moved) / np.linalg.norm(moved))
    print(f"ema rel {ema_rel:.2e} ({where}), ema movement rel {moved_rel:.2e}")
    assert ema_rel <= TOLERANCE, where
    assert moved_rel <= 1e-2


def test_full_size_volo_d1():
    """volo_d1_224 at batch 2, MixToken and drop path 0.1, 2 steps: the official losses (1e-4); every tensor's change
    (its norm, 1e-2); and the first values of every tensor after the stem (1e-3 of their norm). The stem's
    convolutions and BatchNorms are only printed: at this size their float32 gradients are 1.7e-3 (here) and
    2.0e-3 (PyTorch) off the float64 gradient, and Adam's first steps, about lr * sign(g), turn that into
    differences of up to 2 lr in the elements whose gradients are near 0."""
    trajectory = Trajectory("full_size")
    loss_rel = step_relative(trajectory.losses, trajectory.arrays["losses"])
    final = trajectory.final()
    samples = {name: value.reshape(-1)[:reference.SAMPLE] for name, value in final.items()}
    official = trajectory.official("final_sample")
    stem = {name: value for name, value in official.items() if name.startswith("patch_embed.conv.")}
    sample_rel, where = worst(samples, {name: value for name, value in official.items() if name not in stem})
    stem_rel, stem_where = worst(samples, stem)
    change = {name: np.linalg.norm((value - trajectory.init[name]).astype(np.float64)) for name, value in final.items()}
    change_rel, change_where = worst(change, trajectory.official("delta_norm"), step_relative)
    print(f"\nloss rel {loss_rel:.2e}, weight sample rel {sample_rel:.2e} ({where}), stem {stem_rel:.2e} "
          f"({stem_where}), change norm rel {change_rel:.2e} ({change_where})")
    assert loss_rel <= TOLERANCE
    assert sample_rel <= 1e-3, where
    assert change_rel <= 1e-2, change_where


def test_the_recipes_train_at_the_official_per_epoch_lrs():
    """The official schedule (timm's CosineLRScheduler, stepped per epoch, warmup not a prefix, cooldown at
    min_lr) of a shortened D1 recipe, of the whole D1 recipe and of the 384 px fine-tuning recipe, epoch for
    epoch; and MindCV's own cosine (warmup as a prefix, per step), which the recipes turn off, would not give it."""
    with np.load(TRAJECTORIES / "schedule.npz") as data:
        settings = json.loads(str(data["settings"]))
        official = {name: data[name] for name in settings}
    updates = 3
    for name, s in settings.items():
        recipe = str(ROOT / s["recipe"])
        if name != "short":  # the recipe itself is the official run
            own = parse_config(["-c", recipe]).scheduler
            assert (own.lr, own.warmup_lr, own.min_lr, own.warmup_epochs, own.cooldown_epochs, own.epoch_size) == (
                s["lr"], s["warmup_lr"], s["min_lr"], s["warmup"], s["cooldown"], s["epochs"] + s["cooldown"]), name
        argv = ["-c", recipe, "--epoch_size", str(s["epochs"] + s["cooldown"]), "--warmup_epochs", str(s["warmup"]),
                "--cooldown_epochs", str(s["cooldown"])]
        per_epoch = np.array(learning_rates(parse_config(argv).scheduler, updates)).reshape(-1, updates)
        assert (per_epoch == per_epoch[:, :1]).all()  # one lr per epoch
        np.testing.assert_allclose(per_epoch[:, 0], official[name], rtol=1e-12, atol=0)
        mindcv = np.array(learning_rates(parse_config(argv + ["--warmup_prefix", "True", "--lr_epoch_stair",
                                                              "False"]).scheduler, updates))[::updates]
        assert np.max(np.abs(mindcv - official[name])) > 0.05 * s["lr"], name
