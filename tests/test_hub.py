"""pretrained=True and `convert --src hub`: the official weights from timm's Hugging Face hub repositories,
offline, through huggingface_hub's own download code and a cache written here in its real layout; the
registry's pretrained configs."""
import hashlib
import json
import logging
import os
import shutil

import huggingface_hub.constants
import mindcv.models.helpers
import mindcv.utils.download
import mindspore as ms
import numpy as np
import pytest
from mindcv.models import get_pretrained_cfg, is_model_pretrained, list_models
from safetensors.numpy import load_file

from mindcv_volo import create
from mindcv_volo.relabel import main as relabel_main
from mindcv_volo.errors import UserError
from conftest import (FIXTURES, REFERENCE_CONFIGS, AllOutputs, make_image_folder, overrides, read_ckpt,
                      reference_options, run_tool, tiny_config)

HUB_TAG = "volo_d1_224.sail_in1k"
REPO_ID = f"timm/{HUB_TAG}"
REVISION = "4f6e0c1a2b3d5e7f8091a2b3c4d5e6f708192a3b"  # a commit hash, as refs/main holds one
WEIGHTS = FIXTURES / "tiny_d1like_64.safetensors"  # stands in for the repository's model.safetensors
REFERENCE = FIXTURES / "tiny_d1like_64.io.npz"


def write_hub_cache(hf_home, tag, weights):
    """`weights` as huggingface_hub keeps a downloaded model.safetensors: the file under blobs/<sha256>, linked
    from snapshots/<revision>/, and refs/main naming the revision."""
    repo = hf_home / "hub" / f"models--timm--{tag}"
    blob = repo / "blobs" / hashlib.sha256(weights.read_bytes()).hexdigest()
    snapshot = repo / "snapshots" / REVISION
    for folder in (blob.parent, snapshot, repo / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, blob)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline machine whose Hugging Face cache is tmp_path/hf (empty) and whose MindCV download folder is
    tmp_path/mindspore; returns (HF_HOME, MindCV's folder of converted weights)."""
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))  # for the commands run in a subprocess
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, when imported: the same settings for this process
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(mindcv.utils.download, "_DEFAULT_DOWNLOAD_ROOT", str(tmp_path / "mindspore"))
    return hf_home, tmp_path / "mindspore" / "models"


def tiny_pretrained(**kwargs):
    """volo_d1_224 with pretrained=True, in the architecture of the weights standing in for the official."""
    model = create("volo_d1_224", pretrained=True, **{**overrides("tiny_d1like_64", 64), **kwargs})
    model.set_train(False)
    return model


def assert_reference_outputs(model):
    reference = np.load(REFERENCE)
    outputs = AllOutputs(model)(ms.Tensor(reference["input"]))
    for name, value in zip(("logits", "tokens", "cls_logits", "aux_logits"), outputs):
        assert np.abs(value.asnumpy() - reference[name]).max() <= 1e-4, name


def test_pretrained_loads_the_hub_weights_and_keeps_them_converted(hub, monkeypatch):
    hf_home, converted = hub
    write_hub_cache(hf_home, HUB_TAG, WEIGHTS)

    def mindcv_loader(*args, **kwargs):
        raise AssertionError("MindCV's load_pretrained is not this project's path")

    monkeypatch.setattr(mindcv.models.helpers, "load_pretrained", mindcv_loader)
    assert_reference_outputs(tiny_pretrained())
    assert sorted(os.listdir(converted)) == [f"timm--{HUB_TAG}.ckpt"]
    # the converted file serves later calls: the hub's cache is no longer needed
    shutil.rmtree(hf_home)
    assert_reference_outputs(tiny_pretrained())


def test_another_class_count_gets_fresh_heads(hub, caplog):
    write_hub_cache(hub[0], HUB_TAG, WEIGHTS)
    official = load_file(WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="mindcv_volo"):
        model = tiny_pretrained(num_classes=5)
    assert "class count differs from the model's" in caplog.text
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    np.testing.assert_array_equal(params["pos_embed"], official["pos_embed"])
    np.testing.assert_array_equal(params["network.0.0.norm1.gamma"], official["network.0.0.norm1.weight"])
    for head in ("head", "aux_head"):
        assert params[f"{head}.weight"].shape == (5, 64)
        np.testing.assert_array_equal(params[f"{head}.bias"], np.zeros(5, np.float32))  # as freshly built
        assert np.abs(official[f"{head}.bias"]).max() > 0


def test_no_weights_file_is_one_line_naming_it_its_source_and_ckpt_path(hub):
    expected = (f"model.safetensors of {REPO_ID} is not in the Hugging Face cache ({hub[0] / 'hub'}) and cannot be "
                "downloaded (HF_HUB_OFFLINE is set); fetch it where the hub is reachable, or convert the official "
                "weights with `python -m mindcv_volo.convert` and pass --ckpt_path FILE.ckpt (checkpoint_path= in "
                "create_model)")
    with pytest.raises(UserError) as info:
        tiny_pretrained()
    assert str(info.value) == expected
    assert not hub[1].exists()  # nothing converted, nothing cached
    result = run_tool("-m", "mindcv_volo.convert", "--src", "hub", "--model", "volo_d1_224", "--dst",
                      hub[0] / "x.ckpt", *reference_options("tiny_d1like_64"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {expected}"


def test_convert_src_hub_writes_the_official_weights(hub, tmp_path):
    write_hub_cache(hub[0], HUB_TAG, WEIGHTS)
    dst = tmp_path / "volo.ckpt"
    result = run_tool("-m", "mindcv_volo.convert", "--src", "hub", "--model", "volo_d1_224", "--dst", dst,
                      *reference_options("tiny_d1like_64"))
    assert result.returncode == 0, result.stderr
    model = create("volo_d1_224", checkpoint_path=str(dst), **overrides("tiny_d1like_64", 64))
    model.set_train(False)
    assert_reference_outputs(model)


def test_train_starts_from_the_official_weights(hub, tmp_path):
    """A run at learning rate 0 keeps its start point: the official weights, with fresh heads for 3 classes."""
    write_hub_cache(hub[0], HUB_TAG, WEIGHTS)
    arch = {key: value for key, value in REFERENCE_CONFIGS["tiny_d1like_64"].items() if key != "num_classes"}
    data = make_image_folder(tmp_path / "data", {"train": 3})
    recipe = tiny_config(tmp_path / "recipe.yaml", data, tmp_path / "ckpt", arch_overrides=arch, image_resize=64,
                         epoch_size=1, batch_size=3, lr=0.0, min_lr=0.0, warmup_epochs=0, warmup_lr=0.0,
                         pretrained=True)
    # MindCV's download folder is ~/.mindspore: a home of the test's own (the compiled CPU kernels stay where they are)
    home = tmp_path / "home"
    kernels = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    result = run_tool("train.py", "-c", recipe, env={"HOME": str(home), "XDG_CACHE_HOME": kernels})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (home / ".mindspore" / "models" / f"timm--{HUB_TAG}.ckpt").is_file()
    (saved,) = (tmp_path / "ckpt").glob("volo_d1_224-1_*.ckpt")
    state, official = read_ckpt(saved), load_file(WEIGHTS)
    np.testing.assert_array_equal(state["pos_embed"], official["pos_embed"])
    np.testing.assert_array_equal(state["network.2.0.mlp.fc1.weight"], official["network.2.0.mlp.fc1.weight"])
    assert state["head.weight"].shape == (3, 64) and not state["head.bias"].any()


def test_relabel_with_the_official_weights_as_teacher(hub, tmp_path):
    write_hub_cache(hub[0], HUB_TAG, WEIGHTS)
    previous = ms.get_context("mode")
    data = make_image_folder(tmp_path / "data", {"train": 1})
    arch = {key: value for key, value in REFERENCE_CONFIGS["tiny_d1like_64"].items() if key != "num_classes"}
    try:
        relabel_main(["--model", "volo_d1_224", "--pretrained", "True", "--num_classes", "10", "--arch_overrides",
                      json.dumps(arch), "--data_dir", data, "--out", str(tmp_path / "maps"), "--batch_size", "3",
                      "--mode", "pynative"])
    finally:
        ms.set_context(mode=previous)
    meta = json.loads((tmp_path / "maps" / "labelmaps.json").read_text())
    assert (meta["checkpoint"], meta["num_classes"], meta["grid"]) == (f"hf-hub:{REPO_ID}", 10, [4, 4])


def test_the_registry_names_the_hub_repository_of_every_variant():
    names = list_models("volo*")
    assert len(names) == 16 and list_models("volo*", pretrained=True) == names
    assert all(is_model_pretrained(name) for name in names)
    for name, url in [("volo_d1", "hf-hub:timm/volo_d1_224.sail_in1k"),
                      ("volo_d4_448", "hf-hub:timm/volo_d4_448.sail_in1k"),
                      ("volo_d5_512", "hf-hub:timm/volo_d5_512.sail_in1k")]:
        config = get_pretrained_cfg(name)
        assert (config["url"], config["num_classes"]) == (url, 1000)
    assert all(get_pretrained_cfg(name)["num_classes"] == 1000 for name in names)


def test_the_official_weights_name_imagenets_classes():
    """--pretrained in infer.py, validate.py and export labels the 1000 outputs as the converter does."""
    from mindcv_volo.engine.config import parse_config
    from mindcv_volo.engine.model_spec import official_spec

    spec = official_spec(parse_config(["--pretrained", "True", "--model", "volo_d1_224"], "infer").model)
    assert len(spec.class_names) == 1000 and spec.class_names[:2] == ("tench", "goldfish")
    other = official_spec(parse_config(["--pretrained", "True", "--model", "volo_d1_224", "--num_classes", "7"],
                                       "infer").model)
    assert other.class_names is None  # fresh heads: nothing to name
