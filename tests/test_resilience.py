"""A bad file mid-epoch loses nothing, a killed run loses minutes: an unreadable training image stops the run
with a checkpoint of its last update and the command to continue (which then ends as a run that never met
it), or with skip_unreadable_images is replaced by the next readable image of the epoch's order, the same in a
resumed run; ckpt_every_steps writes resumable checkpoints mid-epoch. (msrun: tests/test_msrun.py.)"""
import glob
import itertools
import os
import shlex
import shutil

import numpy as np
import pytest

from conftest import ROOT, last_json, make_image_folder, max_difference, read_ckpt, run_tool, tiny_config
from mindcv_volo.engine.checkpoints import PeriodicCheckpoints
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.data import (SplitInfo, TrainSamples, create_train_loader, epoch_order, read_image,
                                     train_augmentation)
from mindcv_volo.engine.loop import DataFailure, whole_updates
from mindcv_volo.engine.randomness import sample_generator
from mindcv_volo.engine.runtime import Runtime
from mindcv_volo.engine.stopping import StopRequests
from mindcv_volo.errors import UserError
from mindcv_volo.token_labeling.label_maps import (find_label_map, label_map_columns, label_map_path,
                                                   read_label_map, write_label_map)
from mindcv_volo.token_labeling.training import TrainSamplesWithMaps

SEED = 7  # tiny_config's
AUGMENTATION = ["--image_resize", "32", "--scale", "0.3,1", "--hflip", "0.5", "--vflip", "0.5", "--re_prob", "0.5",
                "--auto_augment", "randaug-m9-mstd0.5-inc1"]


def corrupt(path):
    with open(path, "wb") as f:
        f.write(b"not an image" * 20)


@pytest.fixture
def twelve(tmp_path):
    """12 training images (4 per class), as a split."""
    return SplitInfo(make_image_folder(tmp_path / "data", {"train": 4}), "train")


def test_an_unreadable_image_takes_the_next_readable_one_with_its_own_position_s_augmentation(twelve, tmp_path):
    config = parse_config(AUGMENTATION)
    augmentation = train_augmentation(config.augmentation)
    order = epoch_order(twelve.count, 4, 3, SEED, 1)
    samples = TrainSamples(twelve, order, augmentation, SEED, 1)
    position = 6
    for index in order[position:position + 2]:  # two in a row: both positions take the third
        corrupt(os.path.join(twelve.folder, twelve.items[index][0]))
    replacement, label = twelve.items[order[position + 2]]
    for at in (position, position + 1):
        image, got_label, unreadable = samples.flagged(at)
        expected, _ = augmentation(read_image(os.path.join(twelve.folder, replacement)), sample_generator(SEED, 1, at))
        np.testing.assert_array_equal(image, expected)
        assert (got_label, unreadable) == (label, order[at])
    assert samples.flagged(position + 2)[2] == -1 and samples.flagged(0)[2] == -1
    assert len(samples[position]) == 2  # as a source of its own, the columns alone
    np.testing.assert_array_equal(samples[position + 2][0], augmentation(
        read_image(os.path.join(twelve.folder, replacement)), sample_generator(SEED, 1, position + 2))[0])

    # With label maps, the replacement brings its own map, moved as the image was.
    maps = str(tmp_path / "maps")
    for index, (relpath, _) in enumerate(twelve.items):  # each map a class of its own: index % 3
        write_label_map(label_map_path(maps, relpath), np.full((2, 2, 1), index % 3), np.ones((2, 2, 1)), 3)
    with_maps = TrainSamplesWithMaps(twelve, order, augmentation, SEED, 1, maps, 3, 2)
    columns = with_maps.flagged(position)
    _, geometry = augmentation(read_image(os.path.join(twelve.folder, replacement)),
                               sample_generator(SEED, 1, position))
    expected = label_map_columns(*read_label_map(find_label_map(maps, replacement)), geometry, 2)
    assert len(columns) == 7 and columns[-1] == order[position]
    for got, want in zip(columns[2:6], expected):
        np.testing.assert_array_equal(got, want)
    assert order[position] % 3 != order[position + 2] % 3  # the bad image's own map would have said otherwise


def loader(split, workers=1, skip=False, epoch=0, first_step=0):
    config = parse_config(["--batch_size", "2", "--num_parallel_workers", str(workers), "--skip_unreadable_images",
                           str(skip), *AUGMENTATION])
    return create_train_loader(split, epoch, 6, config.data, config.augmentation, 3, SEED,
                               Runtime("CPU", 0, rank=0, world=1, threads=2), first_step)


def messages(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "mindcv_volo"]


def test_an_unreadable_image_stops_at_its_batch_or_is_named_once_and_counted(twelve, caplog):
    order = epoch_order(twelve.count, 2, 6, SEED, 0)
    bad = os.path.join(twelve.folder, twelve.items[order[7]][0])  # step 3's second sample
    corrupt(bad)
    batches = loader(twelve)
    assert len([next(batches) for _ in range(3)]) == 3
    with pytest.raises(UserError) as info:
        next(batches)
    assert str(info.value) == f"cannot read image {bad}: corrupt or not an image; remove or replace it"

    caplog.set_level("INFO", logger="mindcv_volo")
    skipping = list(loader(twelve, skip=True))
    assert len(skipping) == 6 and [len(batch) for batch in skipping] == [2] * 6  # the flag column is dropped
    assert messages(caplog) == [
        f"warning: skipping unreadable image {bad} (skip_unreadable_images): its samples take the next readable "
        "image of the epoch's order",
        "warning: epoch 1 steps 1-6: 1 of rank 0's samples replaced an unreadable image (skip_unreadable_images)"]
    caplog.clear()
    # Worker processes give the same batches; the file is named once per process, counted every epoch.
    for got, expected in zip(loader(twelve, workers=2, skip=True), skipping):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    resumed = list(loader(twelve, skip=True, first_step=3))
    np.testing.assert_array_equal(resumed[0][0], skipping[3][0])
    assert messages(caplog) == [
        "warning: epoch 1 steps 1-6: 1 of rank 0's samples replaced an unreadable image (skip_unreadable_images)",
        "warning: epoch 1 steps 4-6: 1 of rank 0's samples replaced an unreadable image (skip_unreadable_images)"]


def test_a_batch_that_cannot_be_read_stops_the_run_before_its_update():
    def batches():
        yield from ("a", "b", "c")
        raise UserError("cannot read image x")

    read = []
    with pytest.raises(DataFailure) as info:
        read.extend(whole_updates(batches(), 2))
    assert read == ["a", "b"]  # "c" belongs to the update whose second batch failed
    assert str(info.value.error) == "cannot read image x"
    assert list(whole_updates(iter("abcd"), 2)) == list("abcd")


def test_periodic_checkpoints_fall_on_the_same_updates_in_every_run():
    every_5 = PeriodicCheckpoints(5, 0, steps_per_epoch=6, accumulation=2)
    # The loop asks after each update but an epoch's last (the epoch's end saves): steps 5, 10, 15 of the
    # run are passed at the updates ending global steps 6 (an epoch's end), 10 and 16.
    asked = [(epoch, step) for epoch, step in itertools.product(range(3), range(1, 5, 2))]
    assert [at for at in asked if every_5.steps_due(*at)] == [(1, 3), (2, 3)]
    off = PeriodicCheckpoints(0, 0, 6, 2)
    assert not any(off.steps_due(*at) for at in asked) and not off.clock_due()
    # One process: its clock is rank 0's.
    requests = StopRequests(world=1)
    assert requests.agreed_with_clock(True) == (0, True) and requests.agreed_with_clock(False) == (0, False)


def test_the_clock_counts_from_the_last_checkpoint(monkeypatch):
    from mindcv_volo.engine import checkpoints

    now = [1000.0]  # a clock the test sets: seconds
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: now[0])
    every_minute = PeriodicCheckpoints(0, 1, steps_per_epoch=6, accumulation=1)
    due = []
    for now[0] in (1030.0, 1060.0, 1061.0, 1120.0):
        due.append(every_minute.clock_due())
        if due[-1]:
            every_minute.saved()
    assert due == [False, True, False, True]
    assert not any(every_minute.steps_due(0, step) for step in range(6))  # steps off


def test_periodic_options_are_checked():
    for option in ("ckpt_every_steps", "ckpt_every_minutes"):
        with pytest.raises(UserError) as info:
            parse_config([f"--{option}", "-1"])
        assert str(info.value) == f"{option} must be 0 (off) or more, got {-1 if option.endswith('steps') else -1.0}"
    config = parse_config(["--ckpt_every_minutes", "30"])
    assert (config.checkpoint.ckpt_every_minutes, config.checkpoint.ckpt_every_steps) == (30.0, 0)
    assert config.data.skip_unreadable_images is False


def test_the_ascend_recipes_save_mid_epoch():
    recipes = glob.glob(os.path.join(ROOT, "configs", "*ascend*.yaml"))
    assert len(recipes) == 11
    for recipe in recipes:
        assert parse_config(["-c", recipe]).checkpoint.ckpt_every_minutes == 30, recipe


# --- whole runs ----------------------------------------------------------------------------------------------

STEPS = 6  # 24 images / batch 4
RECIPE = dict(batch_size=4, epoch_size=2, gradient_accumulation_steps=2, ema=True, ema_decay=0.9,
              auto_augment="randaug-m9-mstd0.5-inc1", scale=[0.5, 1.0], hflip=0.5, log_interval=2)
FINAL = f"volo_d1_224-2_{STEPS}.ckpt"


def bad_image(split):
    """The image at position 10 of epoch 1 (step 3 of 6: the update of steps 2-3 never happens; the
    checkpoint is after step 2) that comes after step 2 in epoch 2 too (a resume from there meets it)."""
    first, second = (list(epoch_order(split.count, 4, STEPS, SEED, epoch)) for epoch in (0, 1))
    index = first[10]
    assert second.index(index) >= 8
    return index


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data (24 training images) and one uninterrupted run of RECIPE on it: (root, data, its ckpt dir,
    the run's compile cache)."""
    root = tmp_path_factory.mktemp("resilience")
    data = make_image_folder(root / "data", {"train": 8, "val": 2})
    cache = root / "compile_cache"  # one graph for every run here
    config = tiny_config(root / "whole.yaml", data, root / "whole", **RECIPE)
    whole = run_tool("train.py", "-c", config, cache=cache)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    return root, data, root / "whole", cache


def with_bad_image(runs, name):
    """A copy of the data with one image unreadable; (its folder, the image's path, its original bytes)."""
    root, data, _, _ = runs
    copy = root / name
    shutil.copytree(data, copy)
    split = SplitInfo(str(copy), "train")
    bad = os.path.join(split.folder, split.items[bad_image(split)][0])
    original = open(bad, "rb").read()
    corrupt(bad)
    return str(copy), bad, original


@pytest.mark.slow
def test_an_unreadable_image_saves_the_last_update_and_the_printed_command_continues_exactly(runs, tmp_path):
    _, _, whole, cache = runs
    data, bad, original = with_bad_image(runs, "broken")
    config = tiny_config(tmp_path / "recipe.yaml", data, tmp_path / "ckpt", **RECIPE)
    stopped = run_tool("train.py", "-c", config, cache=cache)
    assert stopped.returncode == 2, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    saved = tmp_path / "ckpt" / "volo_d1_224-1_2.ckpt"
    command = f"python train.py -c {config} --resume True"
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: cannot read image {bad}: corrupt or not an image; remove or replace it; saved {saved} after epoch 1 "
        f"step 2/{STEPS}; to continue, run: {command}")
    state = read_ckpt(saved)
    assert (int(state["train_state.epoch"]), int(state["train_state.epoch_step"])) == (0, 2)
    assert int(state["train_state.global_step"]) == 1

    with open(bad, "wb") as f:
        f.write(original)
    resumed = run_tool(*shlex.split(command)[1:], cache=cache)  # the command as printed, with this python
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {saved}: 0 of 2 epochs done, epoch 1 at step 2/{STEPS}" in resumed.stdout
    assert max_difference(read_ckpt(tmp_path / "ckpt" / FINAL), read_ckpt(whole / FINAL)) <= 1e-5


@pytest.mark.slow
def test_skipping_unreadable_images_is_the_same_in_a_resumed_run(runs, tmp_path):
    _, _, whole, cache = runs
    data, bad, _ = with_bad_image(runs, "skipping")
    # Periodic checkpoints every 4 steps, 3 kept: 1_4, 1_6 (epoch 1's end), 2_2, 2_6 (the end) were written.
    config = tiny_config(tmp_path / "recipe.yaml", data, tmp_path / "ckpt", skip_unreadable_images=True,
                         ckpt_every_steps=4, keep_checkpoint_max=3, **RECIPE)
    skipping = run_tool("train.py", "-c", config, cache=cache)
    assert skipping.returncode == 0, skipping.stdout[-3000:] + skipping.stderr[-3000:]
    assert skipping.stdout.count(f"skipping unreadable image {bad} ") == 1
    for epoch in (1, 2):
        assert (f"warning: epoch {epoch} steps 1-{STEPS}: 1 of rank 0's samples replaced an unreadable image "
                "(skip_unreadable_images)") in skipping.stdout
    assert "saved " + str(tmp_path / "ckpt" / "volo_d1_224-1_4.ckpt") in skipping.stdout
    assert sorted(f for f in os.listdir(tmp_path / "ckpt") if f.endswith(".ckpt")) == [
        f"volo_d1_224-1_{STEPS}.ckpt", "volo_d1_224-2_2.ckpt", FINAL]
    assert max_difference(read_ckpt(tmp_path / "ckpt" / FINAL), read_ckpt(whole / FINAL)) > 0  # trained on another

    # From the periodic checkpoint after step 2 of epoch 2, with two data workers: the same replacement.
    resume_dir = tmp_path / "resumed"
    resume_dir.mkdir()
    shutil.copy(tmp_path / "ckpt" / "volo_d1_224-2_2.ckpt", resume_dir)
    resumed = run_tool("train.py", "-c", config, "--ckpt_save_dir", resume_dir, "--num_parallel_workers", "2",
                       "--resume", "True", cache=cache)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"epoch 2 at step 2/{STEPS}" in resumed.stdout and "epoch 1/" not in resumed.stdout
    assert f"skipping unreadable image {bad} " in resumed.stdout
    assert (f"warning: epoch 2 steps 3-{STEPS}: 1 of rank 0's samples replaced an unreadable image "
            "(skip_unreadable_images)") in resumed.stdout
    assert max_difference(read_ckpt(resume_dir / FINAL), read_ckpt(tmp_path / "ckpt" / FINAL)) <= 1e-5
    assert last_json(resumed.stdout)["top1"] == last_json(skipping.stdout)["top1"]
