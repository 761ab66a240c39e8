"""The model against the official PyTorch outputs, weights brought in through the converter CLI."""

import mindspore as ms
import numpy as np
import pytest
from mindcv.models import create_model, get_pretrained_cfg, list_models
from mindspore.nn.utils import no_init_parameters

import mindcv_volo
from mindcv_volo.models.volo import block_drop_path_rates
from conftest import CASES, FIXTURES, REFERENCE_CONFIGS, AllOutputs, load_converted, overrides

# The official state dicts' value counts (parameters and BN statistics, num_batches_tracked excluded).
OFFICIAL_VALUE_COUNTS = {
    "volo_d1_224": 26_632_424, "volo_d1_384": 26_778_344, "volo_d2_224": 58_678_720, "volo_d2_384": 58_873_280,
    "volo_d3_224": 86_325_456, "volo_d3_448": 86_626_512, "volo_d4_224": 192_961_904,
    "volo_d4_448": 193_413_488, "volo_d5_224": 295_456_352, "volo_d5_448": 295_907_936,
    "volo_d5_512": 296_092_256,
}


@pytest.mark.parametrize("case", ["d1like_safetensors", "d5like_safetensors"])
def test_outputs_match_the_official_model(converted, case, mode):
    reference = np.load(FIXTURES / CASES[case][3])
    outputs = AllOutputs(load_converted(converted, case))(ms.Tensor(reference["input"]))
    for name, value in zip(("logits", "tokens", "cls_logits", "aux_logits"), outputs):
        assert value.shape == reference[name].shape, name
        assert np.abs(value.asnumpy() - reference[name]).max() <= 1e-4, name


def test_every_checkpoint_shape_converts_to_the_same_weights(converted):
    expected = mindcv_volo.weights.read_checkpoint(str(converted["d1like_safetensors"]))
    for case in ("d1like_pth", "d1like_pth_tar"):
        state = mindcv_volo.weights.read_checkpoint(str(converted[case]))
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(state[name], value, err_msg=f"{case}: {name}")


def test_resized_pos_embed_and_logits_match_the_official_loader(converted, mode):
    reference = np.load(FIXTURES / "tiny_d1like_64_at_96.io.npz")
    model = load_converted(converted, "d1like_resized_to_96")
    assert np.abs(model.pos_embed.asnumpy() - reference["pos_embed"]).max() <= 1e-5
    assert np.abs(model(ms.Tensor(reference["input"])).asnumpy() - reference["logits"]).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(OFFICIAL_VALUE_COUNTS))
def test_value_count_equals_the_official_state_dict(name):
    with no_init_parameters():
        model = create_model(name)
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) == OFFICIAL_VALUE_COUNTS[name]


def test_registry_lists_all_variants_and_replaces_mindcv_entries():
    names = list_models("volo*")
    assert names == sorted([*OFFICIAL_VALUE_COUNTS, "volo_d1", "volo_d2", "volo_d3", "volo_d4", "volo_d5"])
    with no_init_parameters():
        assert isinstance(create_model("volo_d5"), mindcv_volo.VOLO)
        assert create_model("volo_d4_448", num_classes=3).pos_embed.shape == (1, 28, 28, 768)


@pytest.mark.parametrize("name, size, crop_pct", [
    ("volo_d1_224", 224, 0.96), ("volo_d1_384", 384, 1.0), ("volo_d3_448", 448, 1.0), ("volo_d4_448", 448, 1.15),
    ("volo_d5_512", 512, 1.15), ("volo_d2", 224, 0.96)])
def test_data_config(name, size, crop_pct):
    config = get_pretrained_cfg(name)
    assert config["input_size"] == (3, size, size)
    assert config["crop_pct"] == crop_pct
    assert config["interpolation"] == "bicubic"
    assert config["mean"] == (0.485, 0.456, 0.406) and config["std"] == (0.229, 0.224, 0.225)


def test_drop_path_schedule_is_the_official():
    rates = block_drop_path_rates((4, 4, 8, 2), 0.1)
    assert rates[0] == [0.0] * 4
    assert rates[1][0] == pytest.approx(0.1 * 4 / 17)
    assert rates[3][-1] == pytest.approx(0.1)
    model = create_model("volo_d1_224", drop_path_rate=0.1, **overrides("tiny_d1like_64", 64))
    # layers (2, 1, 2, 1): network.3.1 is global block 4 of 6.
    assert model.network[3][1].drop_path.keep_prob == pytest.approx(1 - 0.1 * 4 / 5)
    assert model.network[0][1].drop_path.keep_prob == 1.0 and model.network[0][1].mask_row is None
    assert not hasattr(model.post_network[0], "drop_path")
    # The step's mask rows: two per block under drop path (its two branches), in block order.
    blocks = [block for stage in (2, 3, 4) for block in model.network[stage]]
    assert [block.mask_row for block in blocks] == [0, 2, 4, 6]
    keep = [1 - 0.1 * i / 5 for i in (2, 3, 4, 5)]
    assert model.drop_path_keep_probs() == pytest.approx([k for k in keep for _ in range(2)])
    assert create_model("volo_d1_224", **overrides("tiny_d1like_64", 64)).drop_path_keep_probs() == ()


def test_drop_path_applies_the_fed_masks_by_hand(mode):
    """x + attn(norm1(x)) / keep * m1, then + mlp(norm2(.)) / keep * m2, per sample, with the masks fed."""
    from mindcv_volo.models.backend import resolve_backend
    from mindcv_volo.models.volo import Transformer

    ms.set_seed(0)
    block = Transformer(8, 2, drop_path_rate=0.4, backend=resolve_backend())
    block.mask_row = 1
    block.set_train(True)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((3, 2, 2, 8)).astype(np.float32))
    masks = np.array([[0, 0, 0], [1, 0, 1], [0, 1, 1]], np.float32)  # row 0 is another block's
    got = block(x, ms.Tensor(masks)).asnumpy()
    keep = 0.6
    y = x.asnumpy() + block.attn(block.norm1(x)).asnumpy() / keep * masks[1][:, None, None, None]
    y = y + block.mlp(block.norm2(ms.Tensor(y))).asnumpy() / keep * masks[2][:, None, None, None]
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-6)
    block.set_train(False)  # inference: no drop path, no masks needed
    y = x.asnumpy() + block.attn(block.norm1(x)).asnumpy()
    np.testing.assert_allclose(block(x).asnumpy(), y + block.mlp(block.norm2(ms.Tensor(y))).asnumpy(), rtol=1e-5,
                               atol=1e-6)


def test_no_weight_decay_names_exist():
    model = mindcv_volo.VOLO(**REFERENCE_CONFIGS["tiny_d1like_64"])
    names = {p.name for p in model.trainable_params()}
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} <= names


@pytest.mark.parametrize("out_indices, names", [((0, 1, 3), ["network.0", "network.2", "network.4"]),
                                                 ((3, 0), ["network.4", "network.0"])])
def test_stage_feature_maps(out_indices, names, mode):
    model = create_model("volo_d1_224", features_only=True, out_indices=out_indices,
                         **overrides("tiny_d1like_64", 64))
    model.set_train(False)
    maps = model(ms.Tensor(np.zeros((2, 3, 64, 64), np.float32)))
    shapes = {0: (2, 32, 8, 8), 1: (2, 64, 4, 4), 3: (2, 64, 4, 4)}
    assert [m.shape for m in maps] == [shapes[i] for i in out_indices]
    # MindCV's feature models' contract: out_channels, and feature_info, describe the maps given
    assert model.out_channels == [m.shape[1] for m in maps]
    assert [info["name"] for info in model.feature_info] == names
    assert [info["reduction"] for info in model.feature_info] == [64 // m.shape[-1] for m in maps]


def test_a_classifier_describes_every_stage_and_has_no_out_channels():
    model = create_model("volo_d1_224", **overrides("tiny_d1like_64", 64))
    assert [info["reduction"] for info in model.feature_info] == [8, 16, 16, 16]
    assert not hasattr(model, "out_channels")


def test_a_picture_of_another_size_is_one_line_naming_img_size(mode, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MindSpore writes its report of a failed compile in the working folder
    model = create_model("volo_d1_224", **overrides("tiny_d1like_64", 64))
    model.set_train(False)
    expected = ("VOLO input is 48x64 pixels, the model's img_size is 64: resize the pictures to 64x64, or build "
                "the model with another img_size")
    with pytest.raises(mindcv_volo.errors.UserError) as info:
        model(ms.Tensor(np.zeros((1, 3, 48, 64), np.float32)))
    assert str(info.value) == expected
    # inside another cell's graph the check runs while the graph compiles: a ValueError led by the same line
    with pytest.raises(ValueError) as info:
        AllOutputs(model)(ms.Tensor(np.zeros((1, 3, 48, 64), np.float32)))
    assert str(info.value).strip("'").startswith(expected)


@pytest.mark.parametrize("img_size", [32, 80])
def test_batch_of_one_at_any_size_divisible_by_16(img_size, mode):
    model = mindcv_volo.VOLO(**overrides("tiny_d1like_64", img_size))
    model.set_train(False)
    logits = model(ms.Tensor(np.random.default_rng(0).random((1, 3, img_size, img_size), np.float32)))
    assert logits.shape == (1, 10) and np.isfinite(logits.asnumpy()).all()


def test_size_not_divisible_by_16_is_refused():
    with pytest.raises(ValueError, match="divisible by 16, got 72"):
        mindcv_volo.VOLO(**overrides("tiny_d1like_64", 72))


def test_float16_follows_float32(converted):
    reference = np.load(FIXTURES / "tiny_d1like_64.io.npz")
    model = load_converted(converted, "d1like_safetensors")
    model = ms.amp.auto_mixed_precision(model, "O3")
    error = np.abs(model(ms.Tensor(reference["input"])).asnumpy() - reference["logits"]).max()
    # Non-zero: the graph really ran in float16; small: nothing overflowed or lost the signal.
    assert 1e-5 < error <= 0.02 * np.abs(reference["logits"]).max()
