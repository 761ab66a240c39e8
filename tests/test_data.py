"""The data side: split checks, the (seed, epoch)-keyed order and its sharding, per-sample augmentation that
depends on nothing but the sample's position, eval preprocessing, digits."""
import os

import numpy as np
import pytest

from conftest import CLASSES, make_image_folder
from mindcv_volo.digits import stratified_split, write_digits
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.data import (Preprocessing, SplitInfo, create_eval_loader, create_train_loader, epoch_order,
                                     iterate, pipeline_error, rank_slice, train_steps)
from mindcv_volo.engine.runtime import Runtime
from mindcv_volo.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("shapes"), {"train": 8, "val": 3})


def test_order_is_a_function_of_seed_and_epoch():
    first = epoch_order(50, 8, 6, seed=3, epoch=0)
    assert np.array_equal(first, epoch_order(50, 8, 6, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_order(50, 8, 6, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_order(50, 8, 6, seed=4, epoch=0))
    assert len(first) == 48 and len(set(first)) == 48  # drop_remainder: 6 whole batches, no repeats
    assert np.array_equal(epoch_order(5, 2, 3, 0, 0, shuffle=False), [0, 1, 2, 3, 4, 0])  # wraps when short


def test_ranks_split_each_global_batch():
    order = epoch_order(40, 8, 5, seed=1, epoch=2)
    shards = [rank_slice(order, 4, rank, 2) for rank in range(2)]
    for step in range(5):  # step s of rank 0 and rank 1 together = global batch s of one process
        together = np.concatenate([shard[step * 4:(step + 1) * 4] for shard in shards])
        assert np.array_equal(together, order[step * 8:(step + 1) * 8])


def test_train_steps():
    assert train_steps(100, 8, 1, drop_remainder=True) == 12
    assert train_steps(100, 8, 1, drop_remainder=False) == 13
    assert train_steps(100, 8, 5, drop_remainder=True) == 10  # whole accumulation groups only


def test_split_checks(tmp_path, folder, caplog):
    split = SplitInfo(folder, "train")
    assert split.classes == sorted(CLASSES) and split.count == 24
    split.check_same_classes(SplitInfo(folder, "val"))
    with pytest.raises(UserError, match="has 3 classes but num_classes is 2; set --num_classes 3"):
        split.check_num_classes(2)
    split.check_num_classes(3)
    assert not caplog.records
    split.check_num_classes(10)  # more outputs than folders: trains, and says so once
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: num_classes is 10 but {split.folder} has 3 class folders: 7 of the model's outputs are never "
        "trained (set num_classes 3, or null to follow the folders)"]
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError) as info:
        SplitInfo(str(tmp_path), "train")
    assert str(info.value) == (f"split {tmp_path}/train is empty: it needs one sub-folder per class holding "
                               "the images")


def test_train_loader_follows_the_order(folder):
    config = parse_config(["--data_dir", folder, "--batch_size", "4", "--image_resize", "32", "--hflip", "0",
                           "--color_jitter", "null", "--scale", "1,1", "--ratio", "1,1", "--num_parallel_workers", "1"])
    split = SplitInfo(folder, "train")
    rank_1_of_2 = Runtime("CPU", 0, rank=1, world=2, threads=2)
    batches = list(create_train_loader(split, 1, 3, config.data, config.augmentation, 3, 42, rank_1_of_2))
    assert len(batches) == 3 and batches[0][0].shape == (4, 32, 32, 3) and batches[0][0].dtype == np.uint8
    expected = rank_slice(epoch_order(24, 8, 3, 42, 1), 4, 1, 2) // 8  # images are sorted by class
    assert np.array_equal(np.concatenate([labels for _, labels in batches]), expected)


RANDOM = ["--image_resize", "32", "--scale", "0.3,1", "--hflip", "0.5", "--vflip", "0.5", "--re_prob", "0.5",
          "--auto_augment", "randaug-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0"]


def batches_of(folder, rank, world, workers=1, first_step=0, batch_size=4, steps=3):
    config = parse_config(["--data_dir", folder, "--batch_size", str(batch_size), "--num_parallel_workers",
                           str(workers), *RANDOM])
    runtime = Runtime("CPU", 0, rank=rank, world=world, threads=2)
    return list(create_train_loader(SplitInfo(folder, "train"), 2, steps, config.data, config.augmentation, 3, 42,
                                    runtime, first_step))


def test_augmented_samples_depend_on_their_position_alone(folder):
    """Per-sample decisions (crop, flips, RandAugment, erasing) come from (seed, epoch, position): any number of
    workers gives the same batches, two ranks' halves are the one-process batch, and a run resumed at step 2
    sees the rest of the epoch unchanged."""
    one = batches_of(folder, 0, 1, workers=1, batch_size=8, first_step=0)
    assert len(one) == 3 and one[0][1].shape == (8, 3)  # mixup/cutmix: soft targets
    two_workers = batches_of(folder, 0, 1, workers=2, batch_size=8)
    for (images, targets), (images2, targets2) in zip(one, two_workers):
        np.testing.assert_array_equal(images, images2)
        np.testing.assert_array_equal(targets, targets2)
    assert [len(b) for b in batches_of(folder, 0, 1, batch_size=8, first_step=2)] == [2]
    np.testing.assert_array_equal(batches_of(folder, 0, 1, batch_size=8, first_step=2)[0][0], one[2][0])
    # Without mixing (a batch-level decision drawn per rank), the ranks' halves are the global batch.
    plain = [arg for arg in RANDOM if arg not in ("--mixup", "0.8", "--cutmix", "1.0")]
    config = parse_config(["--data_dir", folder, "--batch_size", "4", "--num_parallel_workers", "1", *plain])
    halves = [list(create_train_loader(SplitInfo(folder, "train"), 2, 3, config.data, config.augmentation, 3, 42,
                                       Runtime("CPU", 0, rank=rank, world=2, threads=2))) for rank in range(2)]
    whole = parse_config(["--data_dir", folder, "--batch_size", "8", "--num_parallel_workers", "1", *plain])
    single = list(create_train_loader(SplitInfo(folder, "train"), 2, 3, whole.data, whole.augmentation, 3, 42,
                                      Runtime("CPU", 0, rank=0, world=1, threads=2)))
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][step][0], halves[1][step][0]]), single[step][0])


IMAGENET = Preprocessing(32, 0.8, "bicubic", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def by_hand(image, crop_pct=0.8):
    """The official evaluation on a PIL image: PIL's bicubic resize of the shorter side to floor(32 / crop_pct),
    the centre 32 x 32, ImageNet mean/std, CHW."""
    from PIL import Image

    short = int(32 / crop_pct)
    width, height = image.size
    size = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    resized = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), np.float64)
    top, left = (int(round((side - 32) / 2)) for side in resized.shape[:2])
    crop = resized[top:top + 32, left:left + 32]
    return ((crop - IMAGENET.mean) / IMAGENET.std).transpose(2, 0, 1)


def test_eval_preprocessing(folder, tmp_path):
    # 32 px at crop_pct 0.8: resize to 40, center crop 32; ImageNet mean/std on the 0-255 scale.
    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    np.testing.assert_allclose(IMAGENET.load(str(tmp_path / "photo.png")), by_hand(photo), atol=1e-4)
    loader = create_eval_loader(SplitInfo(folder, "val"), 4, IMAGENET, rank=0, world=1, workers=1)
    batches = list(iterate(loader))
    assert [len(labels) for _, labels in batches] == [4, 4, 1]  # every image once, the last batch short
    assert np.array_equal(np.concatenate([labels for _, labels in batches]), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert -2.2 < batches[0][0].min() < 0 < batches[0][0].max() < 2.7


def test_pipeline_error_names_the_file():
    text = ("Exception thrown from dataset pipeline. Refer to 'Dataset Pipeline Error Message'. \n\n[ERROR] map "
            "operation: [Decode] failed. The corresponding data file is: /d/val/a/x.png. Decode: image decode "
            "failed.\n\n")
    expected = "cannot read image /d/val/a/x.png: corrupt or not an image; remove or replace it"
    assert str(pipeline_error(RuntimeError(text))) == expected
    pil = ("map operation: [PyFunc] failed. The corresponding data file is: /d/val/a/x.png. Error description:\n"
           "ValueError: Traceback (most recent call last):\n")
    assert str(pipeline_error(RuntimeError(pil))) == expected
    assert pipeline_error(RuntimeError("something else")) is None
    # Our own sources raise UserError (training images, label maps); MindSpore quotes it in its message.
    for name in ("UserError", "mindcv_volo.errors.UserError"):
        raised = (f"Exception thrown from user defined Python function in dataset.\n  File x, line 1\n{name}: cannot "
                  "read image /d/train/a/x.png: corrupt or not an image; remove or replace it\n\n- Dataset Pipeline")
        assert str(pipeline_error(RuntimeError(raised))) == "cannot read image /d/train/a/x.png: corrupt or not an " \
                                                              "image; remove or replace it"


def test_digits_split_is_stratified_and_fixed(tmp_path):
    labels = np.repeat(np.arange(10), 20)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert len(val) == 40 and np.array_equal(np.bincount(labels[val]), [4] * 10)
    assert not set(train) & set(val)
    assert np.array_equal(val, stratified_split(labels, 0.2, seed=0)[1])
    counts = write_digits(str(tmp_path), size=16)
    assert counts == {"train": 1438, "val": 359}
    assert sorted(os.listdir(tmp_path)) == ["train", "val"]  # no temporary folder left
    assert SplitInfo(str(tmp_path), "val").count == 359
    from PIL import Image

    image = Image.open(next((tmp_path / "val" / "3").iterdir()))
    assert image.size == (16, 16) and image.mode == "RGB"
