"""Mistakes of the user: one `error: ...` line on stderr, exit code 2, no traceback, nothing written.

Every case runs train.py or validate.py as a user would; the cases start together (a few at a time) in
one fixture, since most of each run is MindSpore's import.
"""
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_image_folder, read_ckpt, run_tool, tiny_config, tiny_volo
from mindcv_volo.token_labeling.label_maps import label_map_path, write_label_map
from mindcv_volo.weights import save_checkpoint

MODEL_NAMES = ("volo_d1, volo_d1_224, volo_d1_384, volo_d2, volo_d2_224, volo_d2_384, volo_d3, volo_d3_224, "
               "volo_d3_448, volo_d4, volo_d4_224, volo_d4_448, volo_d5, volo_d5_224, volo_d5_448, volo_d5_512")


def tiny_weights(path, num_classes=3, **arch):
    """Weights of a tiny VOLO in a checkpoint that does not describe its model (as one written elsewhere)."""
    model = tiny_volo(num_classes, **arch)
    save_checkpoint({p.name: p.asnumpy() for p in model.get_parameters()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{case: (CompletedProcess, expected stderr message, folder that must stay unwritten or None)}."""
    root = tmp_path_factory.mktemp("bad")
    data = make_image_folder(root / "data", {"train": 4, "val": 2})  # 12 train images, 6 val
    config = tiny_config(root / "recipe.yaml", data, root / "unused", batch_size=4)

    only_val = make_image_folder(root / "only_val", {"val": 1})
    empty = root / "empty"
    (empty / "train" / "circle").mkdir(parents=True)
    shutil.copytree(os.path.join(data, "val"), empty / "val")
    other_classes = make_image_folder(root / "other", {"train": 2}, classes=("circle", "square", "stripes"))
    make_image_folder(root / "other", {"val": 2}, classes=("circle", "square", "triangle"))
    broken = root / "broken"
    shutil.copytree(data, broken)
    (broken / "val" / "square" / "001.png").write_bytes(np.random.default_rng(0).bytes(300))
    weights = tiny_weights(root / "tiny.ckpt")
    five_classes = tiny_weights(root / "five.ckpt", num_classes=5)
    more_heads = tiny_weights(root / "heads.ckpt", num_heads=[2, 2, 2, 2])
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(open(weights, "rb").read()[:5000])
    random_bytes = root / "random.ckpt"
    random_bytes.write_bytes(np.random.default_rng(1).bytes(5000))
    missing_config = root / "nope.yaml"
    maps = root / "maps"  # a label map for one training image of twelve
    write_label_map(label_map_path(str(maps), "circle/000.png"), np.zeros((2, 2, 1)), np.ones((2, 2, 1)), 3)

    def problem(name, file_shape, model_shape):
        return f"mis-shaped {name}: file {file_shape}, model {model_shape}"

    hint = ("the checkpoint does not describe its model: pass the --model, --num_classes and --arch_overrides it "
            "was trained with (train.py saves them in config.yaml beside it: -c that file)")

    table = {
        "missing data_dir": (("train.py", "-c", config, "--data_dir", root / "nowhere"),
                             f"data_dir not found: {root / 'nowhere'}"),
        "missing split": (("train.py", "-c", config, "--data_dir", only_val),
                          f"split folder not found: {only_val}/train (folders in {only_val}: val)"),
        "empty split": (("train.py", "-c", config, "--data_dir", empty),
                        f"split {empty}/train is empty: it needs one sub-folder per class holding the images"),
        "different classes": (("train.py", "-c", config, "--data_dir", other_classes),
                              f"{other_classes}/train and {other_classes}/val have different classes (only in "
                              f"{other_classes}/train: stripes; only in {other_classes}/val: triangle)"),
        "unreadable image": (("validate.py", "-c", config, "--data_dir", broken, "--ckpt_path", weights),
                             f"cannot read image {broken}/val/square/001.png: corrupt or not an image; remove "
                             "or replace it"),
        "unknown model": (("train.py", "-c", config, "--model", "volo_d9_224"),
                          f"unknown model 'volo_d9_224'; choose one of: {MODEL_NAMES}"),
        "other class count": (("validate.py", "-c", config, "--ckpt_path", five_classes),
                              f"{five_classes} does not fit the model (4 problems): "
                              + "; ".join([problem("head.weight", "(5, 32)", "(3, 32)"),
                                           problem("head.bias", "(5,)", "(3,)"),
                                           problem("aux_head.weight", "(5, 32)", "(3, 32)"),
                                           problem("aux_head.bias", "(5,)", "(3,)"), hint])),
        "other variant": (("validate.py", "-c", config, "--ckpt_path", more_heads),
                          f"{more_heads} does not fit the model (2 problems): "
                          + "; ".join([problem("network.0.0.attn.attn.weight", "(162, 16)", "(81, 16)"),
                                       problem("network.0.0.attn.attn.bias", "(162,)", "(81,)"), hint])),
        "truncated checkpoint": (("validate.py", "-c", config, "--ckpt_path", truncated),
                                 f"{truncated} is not a readable MindSpore checkpoint (truncated, or another format: "
                                 "convert PyTorch files with `python -m mindcv_volo.convert`)"),
        "random checkpoint": (("validate.py", "-c", config, "--ckpt_path", random_bytes),
                              f"{random_bytes} is not a readable MindSpore checkpoint (truncated, or another format: "
                              "convert PyTorch files with `python -m mindcv_volo.convert`)"),
        "missing checkpoint": (("validate.py", "-c", config, "--ckpt_path", root / "none.ckpt"),
                               f"checkpoint not found: {root / 'none.ckpt'}"),
        "no checkpoint given": (("validate.py", "-c", config),
                                "ckpt_path is not set; pass --ckpt_path FILE.ckpt (from train.py or mindcv_volo.convert), "
                                "or --pretrained True and --model NAME for the official weights"),
        "missing config": (("train.py", "-c", missing_config), f"config file not found: {missing_config}"),
        "batch larger than data": (("train.py", "-c", config, "--batch_size", "16"),
                                   f"batch_size 16 x 1 device(s) x 1 accumulation step(s) = 16 images per update is "
                                   f"more than the 12 images an epoch of {data}/train has; lower batch_size"),
        "resume from weights only": (("train.py", "-c", config, "--resume", "True", "--ckpt_path", weights),
                                     f"{weights} holds no training state (train_state.*): it is a weights-only "
                                     "checkpoint; start from its weights with --ckpt_path and without --resume"),
        "arch_overrides key": (("train.py", "-c", config, "--arch_overrides", "{depth: 3}"),
                               "arch_overrides: unknown key depth; valid keys: layers, embed_dims, num_heads, "
                               "mlp_ratio, stem_hidden_dim, img_size, qkv_bias, attn_drop_rate"),
        "image_resize mismatch": (("train.py", "-c", config, "--image_resize", "64"),
                                  "image_resize 64 differs from the model's img_size 32; set image_resize to 32 "
                                  "(or img_size in arch_overrides)"),
        "missing label maps": (("train.py", "-c", config, "--loss", "token_label", "--token_label_dir", maps),
                               f"token_label_dir {maps} has no label map for circle/001.png (expected "
                               f"{maps}/circle/001.npz); 11 of the 12 images of {data}/train have none; make them "
                               "with `python -m mindcv_volo.relabel`"),
        "no label map folder": (("train.py", "-c", config, "--loss", "token_label", "--token_label_dir",
                                 root / "nomaps"),
                                f"token_label_dir not found: {root / 'nomaps'}; make the maps with "
                                "`python -m mindcv_volo.relabel`"),
    }
    outs = {name: root / f"out{index}" for index, name in enumerate(table)}  # where each case would write
    # A folder holding an earlier run's checkpoint: a fresh run refuses to touch it.
    earlier = root / "earlier"
    earlier.mkdir()
    (earlier / "volo_d1_224-2_3.ckpt").write_bytes(b"an earlier run's")
    table["earlier checkpoints"] = (("train.py", "-c", config),
                                    f"{earlier} holds 1 checkpoint(s) of an earlier run of volo_d1_224 (latest "
                                    "volo_d1_224-2_3.ckpt); continue that run with --resume True, write this one "
                                    "elsewhere with --ckpt_save_dir DIR, or replace them with --overwrite True")
    outs["earlier checkpoints"] = earlier
    # Two runs that train (and compile) start first, beside the quick ones.
    nan = tiny_config(root / "nan.yaml", data, root / "nan_out", batch_size=4, epoch_size=2, warmup_epochs=0,
                      lr=1e30, ckpt_save_interval=2)
    # A scale of 3e38 overflows the float32 gradients: steps are skipped while it halves, then it trains.
    # ... and, told to overwrite an earlier run's checkpoint, removes it (the run itself is the dynamic case).
    dynamic = tiny_config(root / "dynamic.yaml", data, root / "dynamic_out", batch_size=2, epoch_size=2,
                          warmup_epochs=0, loss_scale_type="dynamic", loss_scale=3e38, log_interval=1,
                          val_split="no_val", overwrite=True)
    (root / "dynamic_out").mkdir()
    (root / "dynamic_out" / "volo_d1_224-9_6.ckpt").write_bytes(b"an earlier run's")
    with ThreadPoolExecutor(max_workers=3) as pool:
        trains = {"nan": pool.submit(run_tool, "train.py", "-c", nan),
                  "dynamic": pool.submit(run_tool, "train.py", "-c", dynamic)}
        runs = {name: pool.submit(run_tool, *argv, "--ckpt_save_dir", outs[name]) for name, (argv, _) in table.items()}
        results = {name: (runs[name].result(), table[name][1], outs[name]) for name in table}
        results.update({name: (run.result(), None, root / f"{name}_out") for name, run in trains.items()})
        return results


CASES = ["missing data_dir", "missing split", "empty split", "different classes", "unreadable image",
         "unknown model", "other class count", "other variant", "truncated checkpoint", "random checkpoint",
         "missing checkpoint", "no checkpoint given", "missing config", "batch larger than data",
         "resume from weights only", "arch_overrides key", "image_resize mismatch", "missing label maps",
         "no label map folder", "earlier checkpoints"]


@pytest.mark.parametrize("case", CASES)
def test_one_line_error(cases, case):
    proc, message, out = cases[case]
    assert proc.stderr == f"error: {message}\n", proc.stderr[-3000:]
    assert proc.returncode == 2
    if case == "earlier checkpoints":  # the earlier run's file is left as it was, and nothing added
        assert os.listdir(out) == ["volo_d1_224-2_3.ckpt"]
        assert (out / "volo_d1_224-2_3.ckpt").read_bytes() == b"an earlier run's"
    elif case != "resume from weights only":  # resume checks its checkpoint after the log file is opened
        assert not out.exists(), os.listdir(out)  # nothing written


def test_non_finite_loss_stops_the_run(cases):
    proc, _, out = cases["nan"]
    # Step 1 moves every weight by ~lr (AdamW); step 2's loss is then nan. lr: the cosine's second value.
    assert proc.stderr == ("error: training stopped: non-finite loss (nan) at epoch 1 step 2 (lr 9.33e+29, "
                           "loss scale 1024); the update was not applied and nothing was saved for this "
                           "epoch; lower lr, turn on clip_grad, or use loss_scale_type dynamic\n")
    assert proc.returncode == 2
    assert not [f for f in os.listdir(out) if f.endswith(".ckpt")]


def test_dynamic_loss_scale_skips_overflowing_steps(cases):
    proc, _, out = cases["dynamic"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Which steps overflow depends on the batches and the weights, not on this test: some step of epoch 1 does.
    assert re.search(r"epoch 1 step \d: non-finite gradients at loss scale 3e\+38: update skipped", proc.stdout)
    assert "step(s) skipped" in proc.stdout.split("epoch 1/2 done")[1].splitlines()[0]
    # Each skipped step halves the scale.
    scales = [float(s) for s in re.findall(r"non-finite gradients at loss scale (\S+): update skipped", proc.stdout)]
    halvings = len(scales)
    assert scales == pytest.approx([3e38 / 2 ** k for k in range(halvings)], rel=1e-3)
    assert 1 <= halvings < 12  # some steps were skipped, others updated
    state = read_ckpt(out / "volo_d1_224-2_6.ckpt")
    # overwrite on: the earlier run's checkpoint went before the run wrote its own
    assert sorted(f for f in os.listdir(out) if f.endswith(".ckpt")) == ["volo_d1_224-1_6.ckpt", "volo_d1_224-2_6.ckpt"]
    assert "removed " + str(out / "volo_d1_224-9_6.ckpt") + " of an earlier run (overwrite is on)" in proc.stdout
    assert float(state["train_state.loss_scale"]) == pytest.approx(3e38 / 2 ** halvings, rel=1e-6)
    assert int(state["optimizer.global_step"].reshape(-1)[0]) == 12 - halvings  # skipped steps did not update
