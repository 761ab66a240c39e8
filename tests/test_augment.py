"""The training augmentation's decisions, replayed by hand from the generator they are drawn from."""
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from mindcv_volo.engine.augment import (RAND_AUGMENT_OPS, BatchMixer, RandAugment, TrainAugmentation, color_jitter,
                                        jitter_strengths, random_erase, resized_crop_box)
from mindcv_volo.engine.config import parse_config
from mindcv_volo.errors import UserError

FILL = (124, 116, 104)


def photo(seed=0, size=(40, 32)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(image):
    return np.asarray(image).astype(int)


def test_resized_crop_box_fallback_and_bounds():
    # scale 1 and ratio 1 on a 96 x 64 image: a 78 x 78 crop never fits, so after 10 tries the
    # fallback: the image is wider than ratio 1 allows, so height 64, width round(64 * 1), centred.
    assert resized_crop_box(96, 64, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0)) == (0, 16, 64, 64)
    rng = np.random.default_rng(1)
    for _ in range(200):
        top, left, h, w = resized_crop_box(100, 80, rng)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 100 and h > 0 and w > 0


def test_rand_augment_policy():
    policy = RandAugment("randaug-m9-mstd0.5-inc1")
    assert (policy.magnitude, policy.layers, policy.magnitude_std, policy.magnitude_max) == (9, 2, 0.5, 10)
    assert len(policy.ops) == 15 and "SolarizeIncreasing" in policy.ops and policy.weights is None
    plain = RandAugment("randaug-m7-n3-mstd101-mmax12-w0")
    assert (plain.magnitude, plain.layers, plain.magnitude_std, plain.magnitude_max) == (7, 3, math.inf, 12)
    assert "Solarize" in plain.ops and plain.weights.sum() == pytest.approx(1.0)
    assert plain.weights[plain.ops.index("Rotate")] == pytest.approx(0.3)  # timm's w0 weights (they sum to 1)
    assert RandAugment("randaug").magnitude_std == 0.5  # MindCV's default noise
    for bad, why in (("autoaug", "only RandAugment"), ("randaug-q4", "unknown section 'q4'"),
                     ("randaug-inc2", "inc takes 0 or 1")):
        with pytest.raises(UserError, match=why):
            RandAugment(bad)


def test_rand_augment_decisions_replay_from_the_generator():
    """n ops drawn with replacement; each applied with probability 1/2 at N(m, mstd) clipped to [0, 10]; signed
    arguments negated with probability 1/2; the result is the op applied to the image by hand."""
    policy = RandAugment("randaug-m9-mstd0.5-inc1", FILL, Image.BICUBIC)
    image = photo()
    applied = set()
    for seed in range(30):
        out, affines = policy(image, np.random.default_rng(seed))
        ref = np.random.default_rng(seed)
        expected, expected_affines = image, []
        for index in ref.choice(15, 2, replace=True):
            if ref.random() > 0.5:
                continue
            name = policy.ops[index]
            magnitude = min(max(ref.normal(9, 0.5), 0.0), 10.0)
            expected, coefficients = by_hand(name, expected, magnitude, ref)
            applied.add(name)
            if coefficients is not None:
                expected_affines.append(coefficients)
        np.testing.assert_array_equal(pixels(out), pixels(expected))
        assert affines == tuple(expected_affines)
    assert len(applied) >= 10


def by_hand(name, image, magnitude, rng):
    """timm's rules for the inc1 ops, written out (PIL's own rotate for Rotate)."""
    level = magnitude / 10
    signed = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
    if name in signed:
        value = level * signed[name]
        value = -value if rng.random() > 0.5 else value
        if name == "Rotate":
            out = image.rotate(value, resample=Image.BICUBIC, fillcolor=FILL)
            return out, RAND_AUGMENT_OPS[name][1](image, value, FILL, Image.BICUBIC)[1]
        coefficients = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
                        "TranslateXRel": (1, 0, value * image.width, 0, 1, 0),
                        "TranslateYRel": (1, 0, 0, 0, 1, value * image.height)}[name]
        return image.transform(image.size, Image.AFFINE, coefficients, Image.BICUBIC, fillcolor=FILL), coefficients
    if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = level * 0.9
        factor = max(0.1, 1.0 + (-factor if rng.random() > 0.5 else factor))
        return getattr(ImageEnhance, name[:-10])(image).enhance(factor), None
    table = {"PosterizeIncreasing": lambda: image.point(lambda v: v & ~(2 ** (8 - (4 - int(level * 4))) - 1)),
             "SolarizeIncreasing": lambda: image.point(lambda v: 255 - v if v >= 256 - int(level * 256) else v),
             "SolarizeAdd": lambda: image.point(lambda v: min(255, v + int(level * 110)) if v < 128 else v),
             "AutoContrast": lambda: RAND_AUGMENT_OPS["AutoContrast"][1](image, None, FILL, None)[0],
             "Equalize": lambda: RAND_AUGMENT_OPS["Equalize"][1](image, None, FILL, None)[0],
             "Invert": lambda: image.point(lambda v: 255 - v)}
    return table[name](), None


def test_posterize_keeps_the_high_bits_down_to_none():
    image = photo(3)
    for magnitude, bits in ((0.0, 4), (5.0, 2), (10.0, 0)):  # PosterizeIncreasing: 4 - int(m / 10 * 4) bits kept
        out, _ = RandAugment("randaug-inc1").apply("PosterizeIncreasing", image, magnitude, None)
        np.testing.assert_array_equal(pixels(out), pixels(image) & (0xFF << (8 - bits) & 0xFF))


def test_rotation_turns_counter_clockwise_about_the_centre():
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (24, 14, 32, 18))  # a bar at the right edge, centred vertically
    out, coefficients = RAND_AUGMENT_OPS["Rotate"][1](image, 90.0, (0, 0, 0), Image.NEAREST)
    np.testing.assert_allclose(coefficients, (0, -1, 32, 1, 0, 0), atol=1e-12)  # (x, y) shows (32 - y, x)
    assert pixels(out)[:8, 14:18].min() == 255 and pixels(out)[24:, :].max() == 0  # the bar is now at the top


def test_translation_moves_the_content_by_the_fraction():
    image = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (32, 1))[..., None].repeat(3, -1))
    out, _ = RAND_AUGMENT_OPS["TranslateXRel"][1](image, 0.25, FILL, Image.NEAREST)
    np.testing.assert_array_equal(pixels(out)[:, :30], pixels(image)[:, 10:])  # shows x + 10
    assert (pixels(out)[:, 30:] == FILL).all()


def test_random_erase_replays_from_the_generator():
    for seed, value in ((0, 0.0), (3, "random")):
        array = np.ones((3, 20, 24), np.float32)
        random_erase(array, np.random.default_rng(seed), 1.0, (0.1, 0.3), (0.5, 2.0), value, 10)
        ref = np.random.default_rng(seed)
        assert ref.random() < 1.0
        area, aspect = 480 * ref.uniform(0.1, 0.3), math.exp(ref.uniform(math.log(0.5), math.log(2.0)))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        top, left = int(ref.integers(0, 20 - h + 1)), int(ref.integers(0, 24 - w + 1))
        expected = np.ones((3, 20, 24), np.float32)
        expected[:, top:top + h, left:left + w] = ref.standard_normal((3, h, w)) if value == "random" else value
        np.testing.assert_array_equal(array, expected)
    untouched = np.ones((3, 20, 24), np.float32)
    random_erase(untouched, np.random.default_rng(0), 0.0, (0.1, 0.3), (0.5, 2.0), 0.0, 10)
    assert (untouched == 1).all()


def test_color_jitter_replays_from_the_generator():
    assert jitter_strengths(0.4) == (0.4, 0.4, 0.4, 0.0)
    assert jitter_strengths([0.1, 0.2, 0.3]) == (0.1, 0.2, 0.3, 0.0)
    image = photo(1)
    out = color_jitter(image, np.random.default_rng(5), (0.4, 0.3, 0.2, 0.0))
    ref = np.random.default_rng(5)
    order = ref.permutation(4)
    factors = [ref.uniform(0.6, 1.4), ref.uniform(0.7, 1.3), ref.uniform(0.8, 1.2)]
    expected = image
    for index in order:
        if index < 3:
            expected = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[index](expected) \
                .enhance(factors[index])
    np.testing.assert_array_equal(pixels(out), pixels(expected))


def mixer(**options):
    argv = [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    return BatchMixer(parse_config(argv).augmentation, 3, 7, rank=1)


def test_mixup_blends_with_the_flipped_batch():
    images = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    labels = np.array([0, 1, 2, 1], np.int32)
    mixed, targets = mixer(mixup=0.8, cutmix_prob=1.0)(images, labels, 2, 5)
    ref = np.random.default_rng([4, 7, 2, 5, 1])  # the mixup stream at (seed 7, epoch 2, step 5, rank 1)
    assert ref.random() < 1.0
    lam = ref.beta(0.8, 0.8)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-6)
    one_hot = np.eye(3)[labels]
    np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], rtol=1e-6)
    assert targets.dtype == np.float32 and mixed.dtype == np.float32


def test_cutmix_pastes_a_box_and_weighs_by_its_area():
    images = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    labels = np.array([2, 0, 1, 1], np.int32)
    mixed, targets = mixer(cutmix=1.0, mixup=0.8, mixup_switch_prob=1.0)(images, labels, 0, 3)
    ref = np.random.default_rng([4, 7, 0, 3, 1])
    assert ref.random() < 1.0 and ref.random() < 1.0  # applied; cutmix chosen
    lam = ref.beta(1.0, 1.0)
    side = math.sqrt(1 - lam)
    cy, cx = ref.integers(0, 16), ref.integers(0, 16)
    top, bottom = np.clip([cy - int(16 * side) // 2, cy + int(16 * side) // 2], 0, 16)
    left, right = np.clip([cx - int(16 * side) // 2, cx + int(16 * side) // 2], 0, 16)
    expected = images.copy()
    expected[:, :, top:bottom, left:right] = images[::-1, :, top:bottom, left:right]
    np.testing.assert_array_equal(mixed, expected)
    area_lam = 1 - (bottom - top) * (right - left) / 256
    np.testing.assert_allclose(targets, area_lam * np.eye(3)[labels] + (1 - area_lam) * np.eye(3)[labels[::-1]],
                               rtol=1e-6)


def test_an_unmixed_batch_still_has_one_hot_targets():
    images = np.zeros((2, 3, 4, 4), np.float32)
    mixed, targets = mixer(mixup=0.8, cutmix_prob=0.0)(images, np.array([2, 0]), 0, 0)
    assert mixed is images and (targets == np.eye(3)[[2, 0]]).all()


def test_a_sample_depends_on_its_generator_alone():
    aug = TrainAugmentation(parse_config(["--image_resize", "32", "--auto_augment", "randaug-m9-mstd0.5-inc1",
                                          "--re_prob", "0.5", "--vflip", "0.5"]).augmentation,
                            (124.0, 116.0, 104.0), (58.0, 57.0, 57.0))
    image = photo(2, (50, 40))
    first, geometry = aug(image, np.random.default_rng(11))
    for seed in range(5):  # whatever came before
        aug(image, np.random.default_rng(seed))
    again, same = aug(image, np.random.default_rng(11))
    np.testing.assert_array_equal(first, again)
    assert geometry == same and first.shape == (3, 32, 32) and first.dtype == np.float32
    assert not np.array_equal(first, aug(image, np.random.default_rng(12))[0])
