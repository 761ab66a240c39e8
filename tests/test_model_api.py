"""timm's model API on VOLO: classifier reset, pre-logits, intermediates, gradient checkpointing (recompute)."""
import mindspore as ms
import numpy as np
import pytest

from mindcv_volo.models import VOLO

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 4, 4, 4), num_classes=5, stem_hidden_dim=8)
IMG = 32  # stride-8 grid 4 x 4, token grid 2 x 2


def tiny(**overrides):
    model = VOLO(img_size=IMG, **{**TINY, **overrides})
    model.set_train(False)
    return model


def images(batch=2, seed=0):
    return ms.Tensor(np.random.default_rng(seed).standard_normal((batch, 3, IMG, IMG)).astype(np.float32))


def param_shapes(model):
    """[(name, shape)] of the model's parameters, in order."""
    return [(p.name, p.shape) for p in model.get_parameters()]


# --- parameter names -------------------------------------------------------------------------------

@pytest.mark.parametrize("features_only", [False, True])
def test_running_the_model_keeps_its_parameter_names(features_only, mode):
    """In PyNative a slice of a CellList is a new CellList that renames its cells' parameters (network.2.0.* became
    0.0.*): a checkpoint saved after a PyNative forward pass no longer loaded."""
    model = tiny(features_only=features_only)
    names = param_shapes(model)
    model(images())
    assert param_shapes(model) == names
