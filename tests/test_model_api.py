"""timm's model API on VOLO: classifier reset, pre-logits, intermediates, gradient checkpointing (recompute)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindcv_volo.models import VOLO
from mindcv_volo.weights import load_checkpoint_into, save_checkpoint

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


def params(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


class Wrapper(nn.Cell):
    """Calls a method of the model in a graph of its own: each test compiles the model as it is then.
    (A method called from Python outside `construct` runs op by op, in either mode.)
    auto_prefix=False: the model's parameters keep their names."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model


class Logits(Wrapper):
    def construct(self, x):
        return self.model(x)


class Features(Wrapper):
    def construct(self, x):
        return self.model.forward_features(x)


# --- parameter names -------------------------------------------------------------------------------

@pytest.mark.parametrize("features_only", [False, True])
def test_running_the_model_keeps_its_parameter_names(features_only, mode):
    """In PyNative a slice of a CellList is a new CellList that renames its cells' parameters (network.2.0.* became
    0.0.*): a checkpoint saved after a PyNative forward pass no longer loaded."""
    model = tiny(features_only=features_only)
    names = param_shapes(model)
    model(images())
    assert param_shapes(model) == names


# --- get_classifier / reset_classifier ------------------------------------------------------------

def test_get_classifier_is_the_class_head():
    model = tiny()
    assert model.get_classifier() is model.head


def test_reset_classifier_builds_fresh_heads_named_as_a_model_built_for_that_count(mode, tmp_path):
    ms.set_seed(0)
    model = tiny()
    old = params(model)
    model.reset_classifier(7)

    assert model.num_classes == 7 and model.get_classifier() is model.head
    assert param_shapes(model) == param_shapes(tiny(num_classes=7))  # same names, in the same order
    new = params(model)
    for name in ("head.weight", "aux_head.weight"):
        assert new[name].shape == (7, 32)
        assert 0.014 < new[name].std() < 0.026 and np.abs(new[name]).max() < 0.1  # truncated normal, std 0.02
    for name in ("head.bias", "aux_head.bias"):
        np.testing.assert_array_equal(new[name], np.zeros(7, np.float32))
    for name, value in old.items():  # the rest of the network is untouched
        if "head" not in name:
            np.testing.assert_array_equal(new[name], value, err_msg=name)

    x = images()
    logits = Logits(model)(x)
    assert logits.shape == (2, 7)
    # the checkpoint of the reset model loads strictly into a model built with 7 classes, same outputs
    path = str(tmp_path / "reset.ckpt")
    save_checkpoint({p.name: p for p in model.get_parameters()}, path)
    rebuilt = load_checkpoint_into(tiny(num_classes=7), path)
    np.testing.assert_allclose(Logits(rebuilt)(x).asnumpy(), logits.asnumpy(), atol=1e-6)


def test_reset_to_the_same_count_draws_new_weights():
    ms.set_seed(0)
    model = tiny()
    before = params(model)
    model.reset_classifier(5)
    after = params(model)
    for name in ("head.weight", "aux_head.weight"):
        assert after[name].shape == (5, 32) and np.abs(after[name] - before[name]).min() > 0


def test_reset_to_zero_classes_gives_the_class_token_features(mode):
    model = tiny()
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert not any("head" in p.name for p in model.get_parameters())
    x = images()
    features = Logits(model)(x).asnumpy()
    assert features.shape == (2, 32)
    np.testing.assert_allclose(features, Features(model)(x).asnumpy()[:, 0], atol=1e-6)


def test_reset_inside_a_parent_cell_keeps_the_parents_prefix():
    class Parent(nn.Cell):
        def __init__(self, net):
            super().__init__()
            self.net = net

    model = tiny()
    Parent(model)  # prefixes every parameter name with "net."
    model.reset_classifier(7)
    assert param_shapes(model) == [("net." + name, shape) for name, shape in param_shapes(tiny(num_classes=7))]


# --- forward_head -----------------------------------------------------------------------------------

class Head(Wrapper):
    """Tokens, pre-logits, logits from the tokens, and model(x), in one graph."""

    def construct(self, x):
        tokens = self.model.forward_features(x)
        return tokens, self.model.forward_head(tokens, pre_logits=True), self.model.forward_head(tokens), self.model(x)


def test_forward_head_pre_logits_is_the_normed_class_token(mode):
    model = tiny()
    tokens, pre_logits, logits, model_logits = (t.asnumpy() for t in Head(model)(images()))
    assert pre_logits.shape == (2, 32)
    np.testing.assert_array_equal(pre_logits, tokens[:, 0])
    np.testing.assert_allclose(pre_logits.mean(-1), 0, atol=1e-5)  # after the norm (gamma 1, beta 0 at init)
    np.testing.assert_allclose(logits, model_logits, atol=1e-6)
    # the default head is the official eval output, by hand
    weight, bias = model.head.weight.asnumpy(), model.head.bias.asnumpy()
    aux_weight, aux_bias = model.aux_head.weight.asnumpy(), model.aux_head.bias.asnumpy()
    expected = pre_logits @ weight.T + bias + 0.5 * (tokens[:, 1:] @ aux_weight.T + aux_bias).max(axis=1)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
