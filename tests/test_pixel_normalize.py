"""Training images leave the host as uint8 pixels and the compiled step normalises and erases them
(engine.step.PixelNormalize): bit for bit the float32 images the host would have made (TrainAugmentation)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image

from mindcv_volo.engine.augment import TrainAugmentation
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.data import normalizes_on_device, pixel_mean_std, train_augmentation
from mindcv_volo.engine.step import PixelNormalize

from conftest import graph_mode

RECIPE = ["--image_resize", "32", "--scale", "0.3,1", "--hflip", "0.5", "--auto_augment", "randaug-m9-mstd0.5-inc1",
          "--re_prob", "0.5"]


def photos(count):
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)) for i in range(count)]


@pytest.mark.parametrize("erase_value", ["0", "1.5"])
@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_the_step_normalises_and_erases_as_the_host(erase_value, mode):
    aug = parse_config([*RECIPE, "--re_value", erase_value]).augmentation
    host = TrainAugmentation(aug, *pixel_mean_std(aug))
    assert normalizes_on_device(aug) and train_augmentation(aug).__func__ is TrainAugmentation.pixels
    images = photos(12)
    expected = np.stack([host(image, np.random.default_rng(seed))[0] for seed, image in enumerate(images)])
    shipped = np.stack([host.pixels(image, np.random.default_rng(seed))[0] for seed, image in enumerate(images)])
    assert shipped.dtype == np.uint8 and shipped.shape == (12, 32, 32, 4)
    erased = shipped[..., 3] > 0
    assert 0 < erased.any(axis=(1, 2)).sum() < 12  # some samples erased, some not
    normalize = PixelNormalize(*pixel_mean_std(aug), aug.re_value)
    if mode == "graph":
        with graph_mode():
            out = normalize(Tensor(shipped)).asnumpy()
    else:
        out = normalize(Tensor(shipped)).asnumpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert (out.transpose(0, 2, 3, 1)[erased] == np.float32(erase_value)).all()


def test_without_erasing_three_channels_go_and_floats_pass():
    aug = parse_config([*RECIPE, "--re_prob", "0"]).augmentation
    host = TrainAugmentation(aug, *pixel_mean_std(aug))
    image = photos(1)[0]
    shipped, geometry = host.pixels(image, np.random.default_rng(3))
    expected, same = host(image, np.random.default_rng(3))
    assert shipped.shape == (32, 32, 3) and geometry == same
    normalize = PixelNormalize(*pixel_mean_std(aug), aug.re_value)
    np.testing.assert_array_equal(normalize(Tensor(shipped[None])).asnumpy()[0], expected)
    floats = np.ones((2, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(normalize(Tensor(floats)).asnumpy(), floats)


@pytest.mark.parametrize("argv", [["--mixup", "0.8"], ["--cutmix", "1.0"], ["--re_value", "random"]])
def test_mixing_and_random_erasing_normalise_on_the_host(argv):
    """They need the float image on the host: the loader ships float32 CHW there."""
    aug = parse_config([*RECIPE, *argv]).augmentation
    assert not normalizes_on_device(aug) and isinstance(train_augmentation(aug), TrainAugmentation)
    array, _ = train_augmentation(aug)(photos(1)[0], np.random.default_rng(0))
    assert array.dtype == np.float32 and array.shape == (3, 32, 32)
