"""MixToken (VOLO's CutMix on the token grid): the box of each training step, drawn on the host.

    rng = mix_rng(seed, epoch, step, rank)              # same (seed, epoch, step) -> same box on resume
    lam, box = sample_mix_box(rng, grid_h, grid_w)       # grid = image / 16 (14 x 14 at 224)
    mix_mask = box_mask(box, grid_h, grid_w)             # (1, grid_h, grid_w, 1) float32
    lam = mixed_lambda(box, grid_h, grid_w)              # class-target weight: 1 - box area / tokens

The graph gets static-shape tensors, never a dynamic slice: `VOLO.forward_train(images, mix_mask)` mixes
the stride-8 tokens inside the box with the batch flipped along axis 0 and un-mixes the per-token logits,
and the loss (`token_labeling.loss`) mixes the class target with lam.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..engine.randomness import step_generator

# The official MixToken draws lam ~ Beta(1, 1), i.e. the box area is uniform.
MIX_BETA = 1.0


def mix_rng(seed, epoch, step, rank=0):
    """The MixToken random state of one training step: a resumed run draws the same boxes.

    Each rank mixes within its own local batch (as the official DDP training, seeded per rank).
    """
    return step_generator("mix_token", seed, epoch, step, rank)


def clipped_box(lam, center, grid_h, grid_w):
    """The official rand_bbox for a given lam and centre: side int(grid * sqrt(1 - lam)), clipped.

    Returns (x1, y1, x2, y2): x indexes axis 1 (height) and y axis 2 (width) of the (B, H, W, C)
    tokens, as the official code. An odd side loses one token (half-sides are floored), as there.
    """
    cut_rat = math.sqrt(1.0 - lam)
    half_h, half_w = int(grid_h * cut_rat) // 2, int(grid_w * cut_rat) // 2
    cx, cy = center
    return (int(np.clip(cx - half_h, 0, grid_h)), int(np.clip(cy - half_w, 0, grid_w)),
            int(np.clip(cx + half_h, 0, grid_h)), int(np.clip(cy + half_w, 0, grid_w)))


def sample_mix_box(rng, grid_h, grid_w):
    """Draw (lam, box) as the official: lam ~ Beta(1, 1), then the centre row, then the centre column."""
    lam = float(rng.beta(MIX_BETA, MIX_BETA))
    cx = int(rng.integers(grid_h))
    cy = int(rng.integers(grid_w))
    return lam, clipped_box(lam, (cx, cy), grid_h, grid_w)


def box_mask(box, grid_h, grid_w):
    """The box as VOLO.forward_train's mix_mask: float32 (1, grid_h, grid_w, 1), 1 inside the box."""
    x1, y1, x2, y2 = box
    mask = np.zeros((1, grid_h, grid_w, 1), np.float32)
    mask[0, x1:x2, y1:y2, 0] = 1.0
    return mask


def mixed_lambda(box, grid_h, grid_w):
    """Weight of each image's own class target: 1 - box area / tokens (the clipped, not the drawn, lam)."""
    x1, y1, x2, y2 = box
    return 1.0 - (x2 - x1) * (y2 - y1) / float(grid_h * grid_w)


class MixTokenSampler:
    """Per step: (mix_mask (1, G, G, 1), lam ()) as Tensors; an empty box when MixToken is off."""

    def __init__(self, seed, grid, rank, enabled):
        self.seed, self.grid, self.rank, self.enabled = seed, grid, rank, enabled

    def __call__(self, epoch, step):
        if not self.enabled:
            return Tensor(np.zeros((1, self.grid, self.grid, 1), np.float32)), Tensor(1.0, ms.float32)
        _, box = sample_mix_box(mix_rng(self.seed, epoch, step, self.rank), self.grid, self.grid)
        return (Tensor(box_mask(box, self.grid, self.grid)),
                Tensor(mixed_lambda(box, self.grid, self.grid), ms.float32))
