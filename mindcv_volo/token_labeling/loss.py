"""Token labeling (Jiang et al. 2021): the targets and the loss of VOLO's training, as the official code.

`VOLO.forward_train(images, mix_mask)` gives class logits and per-token logits, un-mixed so that every
token's target is its own image's token label (MixToken: `token_labeling.mix_token`). The class target
is mixed: lam * t + (1 - lam) * t[::-1]. Targets:

    ground-truth mode   one_hot_target(labels, K) -> (B, K); dense = broadcast_dense_target(t, N) (B, N, K)
    label-map mode      topk_target(indices, scores, K): the official softmax of the teacher logits
                        (0 for classes outside the top-k), for the class level (B, k) -> (B, K) and
                        per token (B, N, k) -> (B, N, K); see token_labeling.label_maps for the columns.

`TokenLabelCrossEntropy` computes cls_weight * CE(class) + dense_weight * mean-over-tokens CE(token),
label smoothing included; `LabelsWithLoss` / `LabelMapsWithLoss` are the network-with-loss cells.
"""
import mindspore as ms
from mindspore import nn, ops


# --- targets (graph mode: static shapes, no Python branching on tensor values) ------------------

def one_hot_target(labels, num_classes):
    """Integer labels (B,) -> float32 one-hot (B, K)."""
    return ops.one_hot(labels.astype(ms.int32), num_classes, ms.Tensor(1.0, ms.float32),
                       ms.Tensor(0.0, ms.float32))


def broadcast_dense_target(cls_target, num_tokens):
    """Ground-truth mode: every token's target is its image's target, (B, K) -> (B, N, K).

    Not mixed with the box: the model un-mixes the per-token logits, so each token is compared with
    its own image (the official TokenLabel losses repeat the target before mixing it too).
    """
    batch, classes = cls_target.shape
    return ops.broadcast_to(cls_target.reshape(batch, 1, classes), (batch, num_tokens, classes))


def topk_target(indices, scores, num_classes):
    """Teacher top-k -> dense soft target (..., K), as the official TokenLabeling.

    The top-k scores are the teacher's logits; the other classes count as logit 0 (the official
    scatters the top-k into a zero map) and a softmax over all K classes gives the target.
    indices: int (..., k); scores: float (..., k). Duplicate indices add (only zero-score padding
    repeats an index, see label_maps.follow_image).
    """
    scores = scores.astype(ms.float32)
    logits = ops.zeros(scores.shape[:-1] + (num_classes,), ms.float32)
    for j in range(scores.shape[-1]):  # k is static: unrolled, k one-hots of (..., K) at a time
        logits = logits + one_hot_target(indices[..., j], num_classes) * scores[..., j:j + 1]
    return ops.softmax(logits, axis=-1)


def mix_ground_truth(teacher_target, gt_target):
    """The official --ground-truth class target (fine-tuning with token labels, TokenLabelGTCrossEntropy).

    Teacher and ground truth are averaged 0.5 / 0.5 where the teacher's top class is the true one,
    0.9 teacher / 0.1 ground truth where it is not.
    """
    agree = (teacher_target.argmax(-1) == gt_target.argmax(-1)).astype(ms.float32).reshape(-1, 1)
    ratio = 0.9 - 0.4 * agree
    return teacher_target * ratio + gt_target * (1.0 - ratio)


def _soft_cross_entropy(logits, target):
    """Mean over all leading axes of -sum_c target_c * log_softmax(logits)_c."""
    return (-(target * ops.log_softmax(logits, axis=-1)).sum(-1)).mean()


class TokenLabelCrossEntropy(nn.Cell):
    """cls_weight * CE(cls_logits, mixed class target) + dense_weight * mean_{b,n} CE(aux_logits, dense target).

    construct(cls_logits (B, K), aux_logits (B, N, K), cls_target (B, K), dense_target (B, N, K), lam ())
    -> float32 scalar. Targets are soft (rows sum to 1), float32 or float16; logits may be float16:
    everything is computed in float32. The class target is mixed with the flipped batch,
    lam * t + (1 - lam) * t[::-1]; lam = 1 (no MixToken) leaves it as is. Label smoothing eps turns
    every target t into t * (1 - eps) + eps / K (the official on/off values, to sum exactly to 1).
    """

    def __init__(self, cls_weight=1.0, dense_weight=0.5, smoothing=0.0):
        super().__init__()
        if cls_weight < 0 or dense_weight < 0 or cls_weight + dense_weight <= 0:
            raise ValueError(f"token-label loss weights must be >= 0 and not both 0, got cls_weight "
                             f"{cls_weight}, dense_weight {dense_weight}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.cls_weight = float(cls_weight)
        self.dense_weight = float(dense_weight)
        self.smoothing = float(smoothing)

    def _smooth(self, target):
        return target * (1.0 - self.smoothing) + self.smoothing / target.shape[-1]

    def construct(self, cls_logits, aux_logits, cls_target, dense_target, lam):
        lam = lam.astype(ms.float32).reshape(())
        cls_target = cls_target.astype(ms.float32)
        # ops.flip rather than [::-1]: MindSpore 2.10 has no gradient for a negative-stride slice.
        cls_target = lam * cls_target + (1.0 - lam) * ops.flip(cls_target, (0,))
        cls_loss = _soft_cross_entropy(cls_logits.astype(ms.float32), self._smooth(cls_target))
        dense_loss = _soft_cross_entropy(aux_logits.astype(ms.float32),
                                         self._smooth(dense_target.astype(ms.float32)))
        return self.cls_weight * cls_loss + self.dense_weight * dense_loss


class LabelsWithLoss(nn.Cell):
    """Network with loss, ground-truth mode: construct(images, labels (B,) int, mix_mask, lam, drop_masks)
    -> loss (drop_masks: the model's drop-path masks of the step, see VOLO.construct)."""

    def __init__(self, network, loss_fn, num_classes):
        super().__init__(auto_prefix=False)  # the network's parameters keep their names
        self.network = network
        self.loss_fn = loss_fn
        self.num_classes = num_classes

    def construct(self, images, labels, mix_mask, lam, drop_masks):
        cls_logits, aux_logits = self.network.forward_train(images, mix_mask, drop_masks)
        cls_target = one_hot_target(labels, self.num_classes)
        dense_target = broadcast_dense_target(cls_target, aux_logits.shape[1])
        return self.loss_fn(cls_logits, aux_logits, cls_target, dense_target, lam)


class LabelMapsWithLoss(nn.Cell):
    """Network with loss, label-map mode (the official pre-training).

    construct(images, labels (B,), cls_indices (B, k), cls_scores (B, k), token_indices (B, N, k),
    token_scores (B, N, k), mix_mask, lam, drop_masks) -> loss. The class target is the teacher's label of
    what the image shows (the official TokenLabelCrossEntropy); `ground_truth=True` mixes in the image label
    as the official --ground-truth fine-tuning does. The columns come from label_maps.label_map_columns.
    """

    def __init__(self, network, loss_fn, num_classes, ground_truth=False):
        super().__init__(auto_prefix=False)
        self.network = network
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        self.ground_truth = ground_truth

    def construct(self, images, labels, cls_indices, cls_scores, token_indices, token_scores, mix_mask, lam,
                  drop_masks):
        cls_logits, aux_logits = self.network.forward_train(images, mix_mask, drop_masks)
        cls_target = topk_target(cls_indices, cls_scores, self.num_classes)
        if self.ground_truth:
            cls_target = mix_ground_truth(cls_target, one_hot_target(labels, self.num_classes))
        dense_target = topk_target(token_indices, token_scores, self.num_classes)
        return self.loss_fn(cls_logits, aux_logits, cls_target, dense_target, lam)
