"""timm's model API on VOLO: classifier reset, pre-logits, intermediates, gradient checkpointing (recompute)."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from conftest import TINY_ARCH, WeightedSum
from mindcv_volo.models import VOLO
from mindcv_volo.weights import load_checkpoint_into, save_checkpoint

TINY = {**TINY_ARCH, "num_classes": 5}  # conftest's tiny VOLO, with five classes
IMG = TINY["img_size"]  # 32 px: stride-8 grid 4 x 4, token grid 2 x 2


def tiny(**overrides):
    model = VOLO(**{**TINY, **overrides})
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


# --- forward_intermediates --------------------------------------------------------------------------

class Intermediates(Wrapper):
    """forward_intermediates with the keyword arguments fixed when the cell is built (graph constants)."""

    def __init__(self, model, **kwargs):
        super().__init__(model)
        self.kwargs = kwargs

    def construct(self, x):
        return self.model.forward_intermediates(x, **self.kwargs)


class LiteralIndices(Wrapper):
    """The indices written in `construct` itself: a list literal and an int."""

    def construct(self, x):
        tokens, maps = self.model.forward_intermediates(x, indices=[0, -1])
        last_two = self.model.forward_intermediates(x, indices=2, intermediates_only=True)
        return tokens, maps, last_two


@pytest.fixture(scope="module")
def reference():
    """The tiny model, an input, its four stage outputs computed cell by cell (NCHW) and its forward_features."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    model = tiny()
    x = images()
    stage0 = model.network[0](model.embed(x))
    stage1 = model.network[2](model.network[1](stage0) + model.pos_embed)
    stage2 = model.network[3](stage1)
    stage3 = model.network[4](stage2)
    expected = dict(maps=[m.asnumpy().transpose(0, 3, 1, 2) for m in (stage0, stage1, stage2, stage3)],
                    tokens=model.forward_features(x).asnumpy())
    # features_only gives the same maps: stride 8 (16 channels), then three at stride 16 (32 channels)
    features_only = tiny(features_only=True)
    for param, value in zip(features_only.get_parameters(), model.get_parameters()):
        param.set_data(value.data.copy())
    maps = features_only(x)
    ms.set_context(mode=previous)
    assert [m.shape for m in maps] == [(2, 16, 4, 4), (2, 32, 2, 2), (2, 32, 2, 2), (2, 32, 2, 2)]
    assert_maps(maps, expected, [0, 1, 2, 3])
    return model, x, expected


def assert_maps(maps, expected, stages):
    assert len(maps) == len(stages)
    for got, stage in zip(maps, stages):
        np.testing.assert_allclose(got.asnumpy(), expected["maps"][stage], atol=1e-5, err_msg=f"stage {stage}")


@pytest.mark.parametrize("indices, stages", [(None, [0, 1, 2, 3]), (3, [1, 2, 3]), ([0, 2], [0, 2]),
                                             ((-1, -4), [3, 0])])
@pytest.mark.slow  # a graph compiled per choice of stages
def test_intermediates_equal_features_only_and_tokens_equal_forward_features(reference, indices, stages, mode):
    model, x, expected = reference
    tokens, maps = Intermediates(model, indices=indices)(x)
    np.testing.assert_allclose(tokens.asnumpy(), expected["tokens"], atol=1e-5)
    assert_maps(maps, expected, stages)


@pytest.mark.slow  # a graph compiled per call form
def test_intermediates_with_indices_written_in_construct(reference, mode):
    model, x, expected = reference
    tokens, maps, last_two = LiteralIndices(model)(x)
    np.testing.assert_allclose(tokens.asnumpy(), expected["tokens"], atol=1e-5)
    assert_maps(maps, expected, [0, 3])
    assert_maps(last_two, expected, [2, 3])


@pytest.mark.slow  # a graph compiled per call form
def test_intermediates_called_from_python(reference, mode):
    model, x, expected = reference
    assert_maps(model.forward_intermediates(x, indices=[1, 2], intermediates_only=True), expected, [1, 2])


@pytest.mark.parametrize("stop_early", [False, True])
def test_intermediates_only_and_stop_early(reference, stop_early, mode):
    model, x, expected = reference
    maps = Intermediates(model, indices=[0, 1], stop_early=stop_early, intermediates_only=True)(x)
    assert_maps(maps, expected, [0, 1])


def test_intermediates_norm_and_nhwc(reference, mode):
    model, x, expected = reference
    _, maps = Intermediates(model, norm=True, output_fmt="NHWC")(x)
    gamma, beta = model.norm.gamma.asnumpy(), model.norm.beta.asnumpy()
    # stage 0 (other channels) is left as it is; stages 1-3 get the final LayerNorm over channels (eps 1e-5)
    np.testing.assert_allclose(maps[0].asnumpy(), expected["maps"][0].transpose(0, 2, 3, 1), atol=1e-5)
    for stage in (1, 2, 3):
        raw = expected["maps"][stage].transpose(0, 2, 3, 1).astype(np.float64)
        normed = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-5) * gamma + beta
        np.testing.assert_allclose(maps[stage].asnumpy(), normed, atol=1e-4, err_msg=f"stage {stage}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(indices=0), r"last-n \(0\) is out of range \(1 to 4\)"),
    (dict(indices=[4]), r"feature index 4 is out of range \(0 to 3\)"),
    (dict(indices=[-5]), r"feature index -1 is out of range \(0 to 3\)"),
    (dict(output_fmt="NLC"), "output_fmt must be 'NCHW' or 'NHWC'"),
    (dict(indices=[1], stop_early=True), "stop_early=True stops after stage 1, before the final tokens"),
])
def test_intermediates_refuse_what_they_cannot_give(reference, kwargs, message):
    model, x, _ = reference
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(x, **kwargs)


# --- set_grad_checkpointing (recompute) -------------------------------------------------------------

def training_gradients(checkpointing, drop_path_rate, steps=1, backend=None):
    """Gradients of the tiny model's loss at each of `steps` calls, from the same seed and weights."""
    ms.set_seed(0)
    model = VOLO(**TINY, drop_path_rate=drop_path_rate, backend=backend)
    model.set_train(True)
    if checkpointing:
        model.set_grad_checkpointing()
    loss = WeightedSum(model, np.random.default_rng(1).normal(size=(2, 5)))  # reaches every parameter through both heads
    grad_fn = ms.value_and_grad(loss, None, model.trainable_params())
    return [[g.asnumpy() for g in grad_fn(images())[1]] for _ in range(steps)]


@pytest.mark.slow  # compiles the model's gradients twice per backend
@pytest.mark.parametrize("backend", ["cpu", "cpu_unfused"])
def test_recompute_gives_the_gradients_of_the_plain_model_in_graph_mode(backend):
    """Drop path on: the recomputed blocks must draw the masks of the forward pass. Two steps: the masks
    change between steps (so they matter) and must still agree."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        plain, recomputed = (training_gradients(checkpointing, drop_path_rate=0.3, steps=2, backend=backend)
                             for checkpointing in (False, True))
    finally:
        ms.set_context(mode=previous)
    for step in range(2):
        for ours, theirs in zip(recomputed[step], plain[step]):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(plain[0], plain[1])) > 1e-2  # the masks did change


def test_recompute_in_pynative_gives_the_same_gradients():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        plain, recomputed = (training_gradients(checkpointing, drop_path_rate=0.0) for checkpointing in (False, True))
    finally:
        ms.set_context(mode=previous)
    for ours, theirs in zip(recomputed[0], plain[0]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing, runs", [(False, ["mlp", "head"]), (True, ["mlp", "head", "mlp"])])
def test_recompute_in_pynative_reruns_the_blocks_in_the_backward_pass(checkpointing, runs):
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model = tiny()
        model.set_train(True)
        if checkpointing:
            model.set_grad_checkpointing()
        calls = []
        model.network[2][0].mlp.register_forward_hook(lambda *_: calls.append("mlp"))  # inside a block
        model.head.register_forward_hook(lambda *_: calls.append("head"))  # outside every block
        ms.grad(WeightedSum(model, np.random.default_rng(1).normal(size=(2, 5))), None, model.trainable_params())(images())
    finally:
        ms.set_context(mode=previous)
    assert calls == runs


def test_recompute_with_drop_path_is_refused_in_pynative():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        with pytest.raises(RuntimeError, match="redraw the drop-path masks"):
            tiny(drop_path_rate=0.1).set_grad_checkpointing()
    finally:
        ms.set_context(mode=previous)


def test_recompute_covers_every_block_and_cannot_be_turned_off():
    model = tiny()
    model.set_grad_checkpointing(False)  # off while off: nothing to do
    assert not model.grad_checkpointing
    blocks = model.blocks()
    # 1 outlooker + 3 transformers + 2 class blocks, in network order
    assert [type(b).__name__ for b in blocks] == ["Outlooker"] + ["Transformer"] * 3 + ["ClassBlock"] * 2
    assert blocks[1] is model.network[2][0] and blocks[-1] is model.post_network[1]
    model.set_grad_checkpointing()
    model.set_grad_checkpointing()  # again: no effect
    assert model.grad_checkpointing
    with pytest.raises(RuntimeError, match="cannot be turned off"):
        model.set_grad_checkpointing(False)
