"""Reference trajectories: the official VOLO training, step for step, as fixtures for tests/test_trajectories.py.

The official side is timm's VOLO (the official architecture and parameter names), the token-labeling losses of
sail-sg/volo (`TokenLabelCrossEntropy` with its `SoftTargetCrossEntropy`, written here from their definition),
the official target construction (smoothed one-hot labels; teacher maps: softmax of the top-k logits placed in
a zero map, then `t * on + off`), timm's AdamW with the weight-decay filter (no decay on biases, norms,
pos_embed and cls_token), `ModelEmaV2` and `CosineLRScheduler`, driven as sail-sg's main.py drives them.
The randomness the official code draws inside the model is fixed here and saved with the case, so the test
feeds the same draws to train.py's step: the MixToken box (at the pooling scale: timm's `rand_bbox` is
replaced by the case's box) and the drop-path masks (timm's DropPath modules are replaced by ones that read
the case's masks).

Runs in its own PyTorch environment (torch never enters the project's dependencies):

  python3 -m venv ~/torchenv && ~/torchenv/bin/pip install torch timm numpy safetensors
  ~/torchenv/bin/python benchmarks/reference_trajectories.py            # every case
  ~/torchenv/bin/python benchmarks/reference_trajectories.py mix_token  # one case

Each case is one file tests/fixtures/trajectories/CASE.npz (a few hundred KB at most): `case` (its settings,
JSON), `final/NAME` (the state dict under the official names after the last update; `ema/NAME`, the EMA's,
with EMA), the teacher maps (`map_indices`, `map_scores`), the draws (`boxes` (steps, 4) as (x1, y1, x2, y2)
on the token grid, `drop_masks` (micro-steps, rows, B)) and `losses` (one per micro-step, before its update).
The initial weights and the batch come from the case's seed (`seeded_state`, `seeded_batch`: numpy, below,
shared with the test; numpy's generator streams are the same in 1.26 and 2.x) and `digest` (sha256 of their
bytes) proves the test regenerates the very same arrays. The full-size case keeps of its final weights only
`final_sample/NAME` (the first SAMPLE values of each tensor) and `delta_norm/NAME` (the norm of its change).
`schedule.npz` holds the official per-epoch learning rates.

This module imports torch only inside the functions that need it: the test imports the numpy helpers.
"""
import hashlib
import json
import os
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "trajectories")

TINY = dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], stem_hidden_dim=8,
            mlp_ratio=2.0, img_size=64, num_classes=10)
D1 = dict(layers=[4, 4, 8, 2], embed_dims=[192, 384, 384, 384], num_heads=[6, 12, 12, 12], img_size=224,
          num_classes=1000)
OFFICIAL_EMA_DECAY = 0.99992  # sail-sg/volo main.py's --model-ema-decay
SAMPLE = 32  # values kept of each final tensor of the full-size case

BASE = dict(arch=TINY, batch_size=4, steps=8, lr=1e-3, weight_decay=0.05, smoothing=0.1, cls_weight=1.0,
            dense_weight=0.5, mix_token=False, drop_path_rate=0.0, label_maps=False, ema_decay=None,
            accumulation=1, seed=0)
CASES = {
    "mix_token": dict(BASE, mix_token=True),
    "drop_path": dict(BASE, drop_path_rate=0.1, seed=1),
    # smoothing 0 along the trajectory; the official smoothing of soft targets is pinned at the first step
    "label_maps": dict(BASE, label_maps=True, smoothing=0.0, pinned_smoothing=0.1, top_k=3, seed=2),
    "ema": dict(BASE, ema_decay=OFFICIAL_EMA_DECAY, seed=3),
    "accumulation": dict(BASE, accumulation=2, steps=10, seed=4),
    "full_size": dict(BASE, arch=D1, batch_size=2, steps=2, mix_token=True, drop_path_rate=0.1, seed=5),
}
# The official schedules (main.py's defaults and README commands; `recipe`: ours that must follow it, the short one
# with epochs, warmup and cooldown changed): a shortened D1, the D1 pre-training, the fine-tuning at 384
D1_RECIPE, FINETUNE_RECIPE = "configs/volo_d1_ascend.yaml", "configs/volo_d1_384_ascend_finetune.yaml"
SCHEDULES = {
    "short": dict(lr=1.6e-3, warmup_lr=1e-6, min_lr=1e-5, epochs=30, warmup=5, cooldown=3, recipe=D1_RECIPE),
    "d1": dict(lr=1.6e-3, warmup_lr=1e-6, min_lr=1e-5, epochs=300, warmup=20, cooldown=10, recipe=D1_RECIPE),
    "finetune": dict(lr=8e-6, warmup_lr=1e-6, min_lr=4e-6, epochs=30, warmup=5, cooldown=10, recipe=FINETUNE_RECIPE),
}


# --- numpy: shared with the test ---------------------------------------------------------------------

def seeded_state(shapes, seed):
    """A perturbed state dict {official name: float32 array} from `shapes` {name: shape}, in sorted name order:
    norm and BatchNorm weights 1 + 0.02 n, running variances 1 + 0.1 |n|, the rest 0.02 n (n standard normal)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        noise = rng.standard_normal(shapes[name], dtype=np.float32)
        if name.endswith("running_var"):
            state[name] = 1 + 0.1 * np.abs(noise)
        elif name.endswith(".weight") and len(shapes[name]) == 1:
            state[name] = 1 + 0.02 * noise
        else:
            state[name] = 0.02 * noise
    return state


def seeded_batch(case):
    """(images float32 (B, 3, S, S), labels int32 (B,)) of a case, from its seed."""
    rng = np.random.default_rng(case["seed"] + 1000)
    arch, batch = case["arch"], case["batch_size"] * case["accumulation"]
    images = rng.standard_normal((batch, 3, arch["img_size"], arch["img_size"]), dtype=np.float32)
    return images, rng.integers(0, arch["num_classes"], batch).astype(np.int32)


def digest(state, images, labels):
    """sha256 of the initial weights (sorted by name) and the batch."""
    hasher = hashlib.sha256()
    for array in [state[name] for name in sorted(state)] + [images, labels]:
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def token_grid(case):
    return case["arch"]["img_size"] // 16


def drop_path_keep_probs(arch, rate):
    """The keep probability of each mask row: the two branches of every block with a drop rate, in block order
    (the official rates: 0 in the outlooker stage, rate * i / (blocks - 1) for global block index i)."""
    layers, total = arch["layers"], sum(arch["layers"])
    rates = [rate * index / (total - 1) for index in range(layers[0], total)]
    return [1.0 - r for r in rates if r > 0 for _ in range(2)]


# --- the official side (torch) ----------------------------------------------------------------------

def soft_target_cross_entropy(torch, logits, target):
    """sail-sg's SoftTargetCrossEntropy: mean over rows of -sum target * log_softmax(logits)."""
    return torch.sum(-target * torch.nn.functional.log_softmax(logits, dim=-1), dim=-1).mean()


def token_label_cross_entropy(torch, outputs, target, cls_weight, dense_weight):
    """sail-sg's TokenLabelCrossEntropy: `outputs` (class logits, token logits (B, N, C), box); `target` (B, C)
    (every token's target is its image's) or (B, C, 2 + N) (column 1 the class target, 2: the tokens'). The class
    target is mixed with the flipped batch by lam = 1 - box area / N."""
    cls_logits, aux_logits, (x1, y1, x2, y2) = outputs
    batch, tokens, classes = aux_logits.shape
    if target.dim() == 2:
        target_cls, target_aux = target, target.repeat(1, tokens).reshape(batch * tokens, classes)
    else:
        target_cls = target[:, :, 1]
        target_aux = target[:, :, 2:].transpose(1, 2).reshape(-1, classes)
    lam = 1 - (x2 - x1) * (y2 - y1) / tokens
    if lam < 1:
        target_cls = lam * target_cls + (1 - lam) * target_cls.flip(0)
    return (cls_weight * soft_target_cross_entropy(torch, cls_logits, target_cls)
            + dense_weight * soft_target_cross_entropy(torch, aux_logits.reshape(-1, classes), target_aux))


def on_off(smoothing, classes):
    """The official smoothed target values: (on, off) = (1 - eps + eps / K, eps / K)."""
    return 1.0 - smoothing + smoothing / classes, smoothing / classes


def smoothed_one_hot(torch, labels, classes, smoothing):
    """timm's one_hot with the on/off values: on at the label, off elsewhere."""
    on, off = on_off(smoothing, classes)
    return torch.full((len(labels), classes), off).scatter_(1, torch.from_numpy(labels).long()[:, None], on)


def smoothed(target, smoothing, classes):
    """The official smoothing of a soft (teacher) target: t * on + off."""
    on, off = on_off(smoothing, classes)
    return target * on + off


def teacher_maps(case, rng):
    """Teacher maps on the token grid (indices int32, logits float32, each (B, G, G, k)): every token of an image
    names the same k classes (in its own order), so the class-level target, the average of the map, also names
    only k classes, and the top-k the pipeline keeps per position is the whole map (see label_maps.py)."""
    batch, grid, k = case["batch_size"], token_grid(case), case["top_k"]
    classes = case["arch"]["num_classes"]
    indices = np.empty((batch, grid, grid, k), np.int32)
    for b in range(batch):
        chosen = rng.choice(classes, k, replace=False)
        for cell in np.ndindex(grid, grid):
            indices[(b, *cell)] = rng.permutation(chosen)
    scores = -np.sort(-rng.uniform(0.0, 6.0, (batch, grid, grid, k)), axis=-1)
    return indices, scores.astype(np.float32)


def official_map_target(torch, indices, scores, labels, classes, smoothing):
    """The official target (B, C, 2 + N) from maps already on the token grid and covering the image: column 0
    the ground truth, 1 the class level (roi_align to 1 x 1 of the whole map: the average logit), 2: the tokens;
    softmax over the classes, then the smoothing."""
    batch, grid, _, k = indices.shape
    dense = torch.zeros(batch, grid, grid, classes)
    dense.scatter_(-1, torch.from_numpy(indices).long(), torch.from_numpy(scores))
    tokens = dense.reshape(batch, grid * grid, classes).permute(0, 2, 1)
    class_level = tokens.mean(-1, keepdim=True)
    teacher = torch.softmax(torch.cat([class_level, tokens], -1), dim=1)
    truth = smoothed_one_hot(torch, labels, classes, smoothing)[:, :, None]
    return torch.cat([truth, smoothed(teacher, smoothing, classes)], -1)


class GivenDraws:
    """The draws of the current step, read by the patched model: the MixToken box and the drop-path masks."""
    box = (0, 0, 0, 0)
    masks = None


def official_model(torch, case, draws):
    """timm's VOLO for the case, in training mode, its MixToken box and drop-path masks taken from `draws`."""
    from timm.layers import DropPath
    from timm.models import volo

    arch = case["arch"]
    model = volo.VOLO(**arch, drop_path_rate=case["drop_path_rate"], use_mix_token=case["mix_token"])
    volo.rand_bbox = lambda size, lam, scale=1: draws.box  # the official box, drawn by the case

    class MaskedDropPath(torch.nn.Module):
        def __init__(self, drop_prob, row):
            super().__init__()
            self.keep_prob, self.row = 1.0 - drop_prob, row

        def forward(self, x):
            keep = draws.masks[self.row].reshape((-1,) + (1,) * (x.dim() - 1))
            return x / self.keep_prob * keep

    row = 0
    for index in (0, 2, 3, 4):
        for block in model.network[index]:
            if isinstance(block.drop_path1, DropPath):
                block.drop_path1 = MaskedDropPath(block.drop_path1.drop_prob, row)
                block.drop_path2 = MaskedDropPath(block.drop_path2.drop_prob, row + 1)
                row += 2
    model.train()
    return model


def state_arrays(model):
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def run_case(name, case):
    """Train the case the official way; returns the arrays of its fixture."""
    import torch
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV2

    torch.manual_seed(case["seed"])
    rng = np.random.default_rng(case["seed"])
    draws = GivenDraws()
    model = official_model(torch, case, draws)
    shapes = {key: tuple(value.shape) for key, value in state_arrays(model).items()}
    init = seeded_state(shapes, case["seed"])
    model.load_state_dict({key: torch.from_numpy(value) for key, value in init.items()}, strict=False)
    images, labels = seeded_batch(case)
    classes, grid, steps = case["arch"]["num_classes"], token_grid(case), case["steps"]
    fixture = {}
    if case["label_maps"]:
        map_indices, map_scores = teacher_maps(case, rng)
        fixture.update(map_indices=map_indices, map_scores=map_scores)

        def target_of(smoothing, part):
            return official_map_target(torch, map_indices[part], map_scores[part], labels[part], classes, smoothing)
    else:
        def target_of(smoothing, part):
            return smoothed_one_hot(torch, labels[part], classes, smoothing)

    boxes = np.zeros((steps, 4), np.int64)
    if case["mix_token"]:
        for step in range(steps):  # a box of 1 .. G-1 tokens a side, anywhere on the grid
            height, width = rng.integers(1, grid, 2)
            top, left = rng.integers(0, grid - height + 1), rng.integers(0, grid - width + 1)
            boxes[step] = (top, left, top + height, left + width)
    keep_probs = drop_path_keep_probs(case["arch"], case["drop_path_rate"])
    micro_steps, batch = steps * case["accumulation"], case["batch_size"]
    # drawn at keep 0.75 so that most steps drop something; the scaling 1 / keep_prob is the model's own
    drop_masks = (rng.random((micro_steps, max(len(keep_probs), 1), batch)) < 0.75).astype(np.float32)
    optimizer = create_optimizer_v2(model, "adamw", lr=case["lr"], weight_decay=case["weight_decay"])
    ema = ModelEmaV2(model, decay=case["ema_decay"]) if case["ema_decay"] else None

    def loss_of(micro, smoothing):
        part = slice((micro % case["accumulation"]) * batch, (micro % case["accumulation"] + 1) * batch)
        draws.box = tuple(int(v) for v in boxes[micro // case["accumulation"]])
        draws.masks = torch.from_numpy(drop_masks[micro])
        cls_token, aux_logits, box = model.forward_train(torch.from_numpy(images[part]))
        outputs = (model.head(cls_token), aux_logits, box)  # timm's forward_train stops before the head
        return token_label_cross_entropy(torch, outputs, target_of(smoothing, part), case["cls_weight"],
                                         case["dense_weight"])

    if "pinned_smoothing" in case:  # the official smoothed loss at the start, before any update
        with torch.no_grad():
            fixture["pinned_loss"] = np.float64(loss_of(0, case["pinned_smoothing"]).item())
        model.load_state_dict({key: torch.from_numpy(value) for key, value in init.items()}, strict=False)

    losses = []
    for micro in range(micro_steps):
        loss = loss_of(micro, case["smoothing"])
        losses.append(loss.item())
        (loss / case["accumulation"]).backward()  # the mean of the micro-batches' gradients
        if (micro + 1) % case["accumulation"] == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
    final = state_arrays(model)
    fixture.update(case=json.dumps(dict(case, keep_probs=keep_probs)), boxes=boxes, drop_masks=drop_masks,
                   losses=np.array(losses), digest=digest(init, images, labels))
    if name == "full_size":
        fixture.update({f"final_sample/{key}": value.reshape(-1)[:SAMPLE] for key, value in final.items()})
        fixture.update({f"delta_norm/{key}": np.float64(np.linalg.norm((value - init[key]).astype(np.float64)))
                        for key, value in final.items()})
        return fixture
    fixture.update({f"final/{key}": value for key, value in final.items()})
    if ema is not None:
        fixture.update({f"ema/{key}": value.detach().numpy().copy()
                        for key, value in ema.module.state_dict().items() if not key.endswith("num_batches_tracked")})
    return fixture


def official_schedule(settings):
    """The learning rate each epoch trains at: timm's CosineLRScheduler as timm's create_scheduler builds it for
    --sched cosine, stepped once per epoch with the next epoch's index as the official main.py steps it."""
    import torch
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings["lr"])
    scheduler = CosineLRScheduler(optimizer, t_initial=settings["epochs"], lr_min=settings["min_lr"],
                                  warmup_lr_init=settings["warmup_lr"], warmup_t=settings["warmup"],
                                  cycle_limit=1, t_in_epochs=True)
    lrs = []
    for epoch in range(scheduler.get_cycle_length() + settings["cooldown"]):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
    return np.array(lrs)


def write_npz(path, arrays):
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = f"{path}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def main(argv):
    import torch

    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    names = argv or [*CASES, "schedule"]
    for name in names:
        if name == "schedule":
            arrays = {key: official_schedule(settings) for key, settings in SCHEDULES.items()}
            arrays["settings"] = json.dumps(SCHEDULES)
        else:
            arrays = run_case(name, CASES[name])
        path = os.path.join(OUT, f"{name}.npz")
        write_npz(path, arrays)
        losses = arrays.get("losses")
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KB"
              + (f", losses {', '.join(f'{v:.6f}' for v in losses)}" if losses is not None else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
