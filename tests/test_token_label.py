"""MixToken and the token-labeling loss: boxes, mixed tokens, un-mixed aux logits and loss values by hand."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from mindcv_volo.token_labeling.loss import (LabelMapsWithLoss, LabelsWithLoss, TokenLabelCrossEntropy,
                                             mix_ground_truth, topk_target)
from mindcv_volo.engine.randomness import STREAMS
from mindcv_volo.token_labeling.mix_token import box_mask, clipped_box, mix_rng, mixed_lambda, sample_mix_box

from conftest import tiny_volo


# --- the box ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam, center, grid, box, lam_used", [
    # sqrt(1 - 0.19) = 0.9; int(4 * 0.9) = 3, half 1: rows [0 - 1, 0 + 1] -> [0, 1), cols [3 - 1, 3 + 1] -> [2, 4)
    (0.19, (0, 3), (4, 4), (0, 2, 1, 4), 1 - 2 / 16),
    (0.0, (2, 2), (4, 4), (0, 0, 4, 4), 0.0),          # the whole grid
    (0.99, (1, 1), (4, 4), (1, 1, 1, 1), 1.0),         # int(4 * 0.1) = 0: an empty box, nothing mixed
    # non-square grid: sqrt(0.25) = 0.5, half-sides int(2) // 2 = 1 (rows) and int(3) // 2 = 1 (cols)
    (0.75, (1, 4), (4, 6), (0, 3, 2, 5), 1 - 4 / 24),
])
def test_clipped_box_by_hand(lam, center, grid, box, lam_used):
    assert clipped_box(lam, center, *grid) == box
    assert mixed_lambda(box, *grid) == pytest.approx(lam_used)


def test_box_mask_marks_rows_x_and_columns_y():
    mask = box_mask((1, 0, 3, 2), 4, 5)
    assert mask.shape == (1, 4, 5, 1) and mask.dtype == np.float32
    expected = np.zeros((4, 5))
    expected[1:3, 0:2] = 1
    np.testing.assert_array_equal(mask[0, :, :, 0], expected)


def test_sample_draws_beta_then_row_then_column_from_the_step_state():
    lam, box = sample_mix_box(mix_rng(7, 2, 5), 14, 14)
    ref = np.random.default_rng([STREAMS["mix_token"], 7, 2, 5, 0])
    ref_lam = ref.beta(1.0, 1.0)
    center = (ref.integers(14), ref.integers(14))
    assert lam == ref_lam and box == clipped_box(ref_lam, center, 14, 14)
    # A resumed run draws the same box at the same (seed, epoch, step); other steps draw other boxes.
    assert sample_mix_box(mix_rng(7, 2, 5), 14, 14) == (lam, box)
    assert len({sample_mix_box(mix_rng(7, 2, s), 14, 14)[1] for s in range(20)}) > 10
    assert sample_mix_box(mix_rng(7, 2, 5, rank=1), 14, 14) != (lam, box)


# --- MixToken inside VOLO --------------------------------------------------------------------------

def test_forward_train_mixes_tokens_and_unmixes_aux_by_hand():
    ms.set_seed(0)
    model = tiny_volo(5, img_size=64)  # token grid 4 x 4, stride-8 grid 8 x 8
    model.set_train(False)  # BatchNorm on its running statistics: both passes see the same network
    x = ms.Tensor(np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32))
    box = (1, 0, 3, 2)  # rows 1-2, columns 0-1 of the 4 x 4 grid

    # By hand: stride-8 tokens rows 2-5, columns 0-3 come from the flipped batch (image 2, 1, 0).
    tokens = model.embed(x).asnumpy()
    mixed = tokens.copy()
    mixed[:, 2:6, 0:4] = tokens[::-1, 2:6, 0:4]
    out = model.forward_cls(model.forward_tokens(ms.Tensor(mixed)))
    cls_expected = model.head(out[:, 0]).asnumpy()
    aux = model.aux_head(out[:, 1:]).asnumpy().reshape(3, 4, 4, 5)
    aux_expected = aux.copy()
    aux_expected[:, 1:3, 0:2] = aux[::-1, 1:3, 0:2]  # un-mixed: each token back with its own image

    cls_logits, aux_logits = model.forward_train(x, ms.Tensor(box_mask(box, 4, 4)))
    np.testing.assert_allclose(cls_logits.asnumpy(), cls_expected, atol=1e-5)
    np.testing.assert_allclose(aux_logits.asnumpy().reshape(3, 4, 4, 5), aux_expected, atol=1e-5)
    # Not vacuous: the box changes the tokens of images 0 and 2 (image 1 is its own flip partner).
    assert np.abs(mixed - tokens)[[0, 2]].max() > 1e-2 and np.array_equal(mixed[1], tokens[1])


class WeightedOutputs(nn.Cell):
    """sum(wc * class logits) + sum(wa * aux logits) of forward_train, or of the same network mixed by hand."""

    def __init__(self, model, by_hand):
        super().__init__()
        self.model, self.by_hand = model, by_hand
        rng = np.random.default_rng(1)
        self.wc = ms.Tensor(rng.normal(size=(3, 5)).astype(np.float32))
        self.wa = ms.Tensor(rng.normal(size=(3, 4, 5)).astype(np.float32))

    def construct(self, x, mask, fine_mask):
        if self.by_hand:
            tokens = self.model.embed(x)
            tokens = tokens * (1 - fine_mask) + ops.flip(tokens, (0,)) * fine_mask
            out = self.model.forward_cls(self.model.forward_tokens(tokens))
            cls_logits, aux_logits = self.model.head(out[:, 0]), self.model.aux_head(out[:, 1:])
            flat = mask.reshape(1, 4, 1)
            aux_logits = aux_logits * (1 - flat) + ops.flip(aux_logits, (0,)) * flat
        else:
            cls_logits, aux_logits = self.model.forward_train(x, mask)
        return (cls_logits * self.wc).sum() + (aux_logits * self.wa).sum()


def test_forward_train_with_mix_mask_is_trainable():
    ms.set_seed(0)
    model = tiny_volo(5)  # token grid 2 x 2
    model.set_train(False)
    x = ms.Tensor(np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32))
    mask = box_mask((0, 1, 2, 2), 2, 2)  # the right column
    fine = mask.repeat(2, axis=1).repeat(2, axis=2)
    grads = [ms.grad(WeightedOutputs(model, by_hand), None, model.trainable_params())(
        x, ms.Tensor(mask), ms.Tensor(fine)) for by_hand in (False, True)]
    for ours, hand in zip(*grads):
        np.testing.assert_allclose(ours.asnumpy(), hand.asnumpy(), atol=1e-5)


# --- targets and loss ------------------------------------------------------------------------------

CLS = np.array([[1.0, -0.5, 0.25], [0.3, 0.8, -1.2]], np.float32)                     # (B=2, K=3)
AUX = np.arange(24, dtype=np.float32).reshape(2, 4, 3) % 5 * 0.4 - 0.7                 # (B=2, N=4, K=3)
LABELS = np.array([2, 0], np.int32)


def cross_entropy(logits, target):
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -(target * log_p).sum(-1)


def expected_loss(cls_target, dense_target, lam, eps, dtype=np.float32, scale=1.0):
    """cls_weight 1 * CE(class) + dense_weight 0.5 * mean CE(tokens), in float64 from `dtype` inputs."""
    smooth = lambda t: t * (1 - eps) + eps / 3  # noqa: E731
    mixed = lam * cls_target + (1 - lam) * cls_target[::-1]
    cls, aux = (v.astype(dtype).astype(np.float64) * scale for v in (CLS, AUX))
    return cross_entropy(cls, smooth(mixed)).mean() + 0.5 * cross_entropy(aux, smooth(dense_target)).mean()


NO_DROP = ms.Tensor(np.ones((1, 2), np.float32))  # drop-path masks of a model without drop path


class FakeNet(nn.Cell):
    """Stands in for VOLO in the with-loss cells: 'images' (B, 1 + N, K) are the logits, times `scale`."""

    def __init__(self):
        super().__init__()
        self.scale = ms.Parameter(ms.Tensor(1.0, ms.float32), name="scale")

    def forward_train(self, x, mix_mask, drop_masks):
        return x[:, 0] * self.scale.astype(x.dtype), x[:, 1:] * self.scale.astype(x.dtype)


def test_topk_target_is_softmax_with_zero_logits_elsewhere():
    # Teacher top-2 of 4 classes: class 0 logit 2, class 2 logit 1; classes 1 and 3 count as logit 0.
    target = topk_target(ms.Tensor([[0, 2]], ms.int32), ms.Tensor([[2.0, 1.0]], ms.float32), 4).asnumpy()
    e = math.e
    np.testing.assert_allclose(target, np.array([[e ** 2, 1, e, 1]]) / (e ** 2 + e + 2), rtol=1e-5)
    # Zero-score padding may repeat an index: it adds nothing.
    padded = topk_target(ms.Tensor([[0, 2, 0]], ms.int32), ms.Tensor([[2.0, 1.0, 0.0]], ms.float16), 4)
    np.testing.assert_allclose(padded.asnumpy(), target, rtol=1e-5)


def test_mix_ground_truth_as_the_official_gt_loss():
    teacher = ms.Tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], ms.float32)
    truth = ms.Tensor([[1.0, 0, 0], [1.0, 0, 0]], ms.float32)
    # Row 0 agrees (argmax 0): 0.5 / 0.5. Row 1 does not: 0.9 teacher, 0.1 truth.
    np.testing.assert_allclose(mix_ground_truth(teacher, truth).asnumpy(),
                               [[0.85, 0.1, 0.05], [0.19, 0.27, 0.54]], rtol=1e-6)


def test_loss_of_zero_logits_is_log_k_whatever_the_target():
    loss = TokenLabelCrossEntropy()(ms.Tensor(np.zeros((2, 3), np.float32)), ms.Tensor(np.zeros((2, 4, 3), np.float32)),
                                    ms.Tensor(np.eye(3, dtype=np.float32)[LABELS]),
                                    ms.Tensor(np.full((2, 4, 3), 1 / 3, np.float32)), ms.Tensor(0.4, ms.float32))
    assert float(loss) == pytest.approx(1.5 * math.log(3), rel=1e-5)


@pytest.mark.parametrize("lam, eps", [(1.0, 0.0), (0.75, 0.0), (0.75, 0.1)])
def test_loss_ground_truth_mode_by_hand(mode, lam, eps):
    one_hot = np.eye(3)[LABELS]
    dense = np.broadcast_to(one_hot[:, None], (2, 4, 3))  # every token: its own image's label
    net = LabelsWithLoss(FakeNet(), TokenLabelCrossEntropy(smoothing=eps), num_classes=3)
    images = ms.Tensor(np.concatenate([CLS[:, None], AUX], axis=1))
    inputs = (images, ms.Tensor(LABELS), ms.Tensor(np.zeros((1, 2, 2, 1), np.float32)), ms.Tensor(lam, ms.float32),
              NO_DROP)
    loss, (grad,) = ms.value_and_grad(net, None, net.trainable_params())(*inputs)
    assert loss.dtype == ms.float32
    assert float(loss) == pytest.approx(expected_loss(one_hot, dense, lam, eps), rel=1e-5)
    # Trainable: d loss / d scale at 1 by central difference of the hand-computed loss.
    h = 1e-4
    slope = (expected_loss(one_hot, dense, lam, eps, scale=1 + h) - expected_loss(one_hot, dense, lam, eps, scale=1 - h))
    assert float(grad) == pytest.approx(slope / (2 * h), rel=1e-4)


@pytest.mark.parametrize("ground_truth", [False, True])
def test_loss_label_map_mode_by_hand(mode, ground_truth):
    rng = np.random.default_rng(3)
    cls_idx = np.array([[2, 0], [1, 2]], np.int32)
    cls_val = np.array([[3.0, 1.0], [2.0, -1.0]], np.float32)
    tok_idx = rng.permuted(np.tile(np.arange(3), (2, 4, 1)), axis=-1)[..., :2].astype(np.int32)
    tok_val = rng.normal(size=(2, 4, 2)).astype(np.float32) * 2

    def dense_softmax(idx, val):  # by hand: logits on the top-k classes, 0 elsewhere, softmax
        logits = np.zeros(idx.shape[:-1] + (3,))
        np.put_along_axis(logits, idx, val, -1)
        return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)

    cls_target = dense_softmax(cls_idx, cls_val)
    if ground_truth:
        truth = np.eye(3)[LABELS]
        ratio = np.where(cls_target.argmax(-1) == LABELS, 0.5, 0.9)[:, None]
        cls_target = ratio * cls_target + (1 - ratio) * truth
    tok_val = tok_val.astype(np.float16)  # AMP-style inputs: the expected value sees the same rounding
    expected = expected_loss(cls_target, dense_softmax(tok_idx, tok_val.astype(np.float64)), 0.6, 0.1, np.float16)

    net = LabelMapsWithLoss(FakeNet(), TokenLabelCrossEntropy(smoothing=0.1), num_classes=3, ground_truth=ground_truth)
    images = ms.Tensor(np.concatenate([CLS[:, None], AUX], axis=1).astype(np.float16))
    loss = net(images, ms.Tensor(LABELS), ms.Tensor(cls_idx), ms.Tensor(cls_val), ms.Tensor(tok_idx),
               ms.Tensor(tok_val), ms.Tensor(np.zeros((1, 2, 2, 1), np.float32)), ms.Tensor(0.6, ms.float32), NO_DROP)
    assert loss.dtype == ms.float32  # computed in float32 from float16 logits
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_loss_rejects_bad_weights():
    with pytest.raises(ValueError):
        TokenLabelCrossEntropy(cls_weight=0, dense_weight=0)
    with pytest.raises(ValueError):
        TokenLabelCrossEntropy(smoothing=1.0)
