"""The converter's and the strict loader's answers to files that do not fit."""
import pickle
import zipfile

import mindspore as ms
import numpy as np
import pytest
from mindcv.models import create_model
from safetensors.numpy import load_file, save_file

import mindcv_volo
from mindcv_volo.weights.convert import convert_into
from mindcv_volo.errors import UserError
from conftest import FIXTURES, REFERENCE_CONFIGS, reference_options, run_tool

REFERENCE = REFERENCE_CONFIGS["tiny_d1like_64"]
OFFICIAL = FIXTURES / "tiny_d1like_64.safetensors"


def convert(src, dst, *extra):
    return run_tool("-m", "mindcv_volo.convert", "--src", src, "--dst", dst, "--model", "volo_d1_224",
                    *reference_options("tiny_d1like_64"), *extra)


def assert_one_line_error(result, expected):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {expected}"], result.stderr


def test_missing_unexpected_and_misshaped_keys_are_named_and_nothing_is_written(tmp_path):
    state = load_file(OFFICIAL)
    del state["network.0.0.attn.v.weight"]
    state["network.9.extra.weight"] = np.zeros(3, np.float32)
    state["norm.weight"] = np.zeros(7, np.float32)
    src, dst = tmp_path / "broken.safetensors", tmp_path / "out.ckpt"
    save_file(state, str(src))
    result = convert(src, dst)
    assert_one_line_error(result, (
        f"{src} does not fit the model (3 problems): missing network.0.0.attn.v.weight (32, 32); "
        "unexpected network.9.extra.weight; mis-shaped norm.gamma: file (7,), model (64,)"))
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    src = tmp_path / "evil.pth"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"state_dict": Payload()}, protocol=2))
        archive.writestr("evil/version", "3\n")
    result = convert(src, tmp_path / "out.ckpt")
    assert result.returncode == 2 and "refused to load" in result.stderr and "system" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_another_class_count_drops_the_heads_with_a_warning(tmp_path):
    dst = tmp_path / "five.ckpt"
    result = convert(OFFICIAL, dst, "--num-classes", "5")
    assert result.returncode == 0, result.stderr
    assert "class count differs" in result.stderr
    state = mindcv_volo.weights.read_checkpoint(str(dst))
    assert state["head.weight"].shape == (5, 64) and state["aux_head.bias"].shape == (5,)
    np.testing.assert_array_equal(state["norm.gamma"], load_file(OFFICIAL)["norm.weight"])


def test_unknown_model_and_bad_overrides_are_one_line_errors(tmp_path):
    result = run_tool("-m", "mindcv_volo.convert", "--src", OFFICIAL, "--dst", tmp_path / "x.ckpt",
                      "--model", "volo_d9")
    assert result.returncode == 2 and "error: unknown model 'volo_d9'; choose one of: volo_d1," in result.stderr
    result = convert(OFFICIAL, tmp_path / "x.ckpt", "--arch-overrides", "[1, 2]")
    assert_one_line_error(result, "--arch_overrides on the command line must be a mapping of names to values, "
                                  "e.g. '{a: 1, b: [2, 3]}', got '[1, 2]'")


def test_create_model_fails_loudly_on_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(UserError, match=f"^checkpoint not found: {missing}$"):
        create_model("volo_d1_224", checkpoint_path=str(missing), **REFERENCE)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    convert_into(mindcv_volo.VOLO(**REFERENCE), str(OFFICIAL), str(path))
    return path


def test_create_model_refuses_a_checkpoint_of_another_class_count(tiny_ckpt):
    with pytest.raises(UserError) as err:
        create_model("volo_d1_224", checkpoint_path=str(tiny_ckpt), **{**REFERENCE, "num_classes": 4})
    assert str(err.value) == (
        f"{tiny_ckpt} does not fit the model (4 problems): mis-shaped head.weight: file (10, 64), model (4, 64); "
        "mis-shaped head.bias: file (10,), model (4,); mis-shaped aux_head.weight: file (10, 64), model (4, 64); "
        "mis-shaped aux_head.bias: file (10,), model (4,)")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_checkpoints_are_one_line_errors(tiny_ckpt, tmp_path, damage):
    data = tiny_ckpt.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match=f"^{bad} is not a readable MindSpore checkpoint"):
        mindcv_volo.load_checkpoint_into(mindcv_volo.VOLO(**REFERENCE), str(bad))


def test_ema_weights_are_selectable(tiny_ckpt, tmp_path):
    state = mindcv_volo.weights.read_checkpoint(str(tiny_ckpt))
    with_ema = {**state, **{f"ema.{k}": v + 1 for k, v in state.items()}, "optimizer.step": np.zeros(1)}
    path = tmp_path / "train.ckpt"
    mindcv_volo.weights.save_checkpoint(with_ema, str(path))
    plain = mindcv_volo.load_checkpoint_into(mindcv_volo.VOLO(**REFERENCE), str(path))
    ema = mindcv_volo.load_checkpoint_into(mindcv_volo.VOLO(**REFERENCE), str(path), ema=True)
    np.testing.assert_array_equal(plain.pos_embed.asnumpy(), state["pos_embed"])
    np.testing.assert_array_equal(ema.pos_embed.asnumpy(), state["pos_embed"] + 1)
    with pytest.raises(UserError, match="holds no EMA weights"):
        mindcv_volo.load_checkpoint_into(mindcv_volo.VOLO(**REFERENCE), str(tiny_ckpt), ema=True)


@pytest.mark.slow  # an export, a load and two compiles
def test_export_mindir_round_trips(tiny_ckpt, tmp_path):
    out = tmp_path / "tiny.mindir"
    result = run_tool("-m", "mindcv_volo.export", "--model", "volo_d1_224", "--ckpt", tiny_ckpt, "--out", out,
                      "--batch-size", "2", *reference_options("tiny_d1like_64"))
    assert result.returncode == 0, result.stderr
    reference = np.load(FIXTURES / "tiny_d1like_64.io.npz")
    graph = ms.nn.GraphCell(ms.load(str(out)))
    assert np.abs(graph(ms.Tensor(reference["input"])).asnumpy() - reference["logits"]).max() <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.mindir"]
    # built with MindSpore's own ops: a graph with the fused CPU kernels would name this machine's library
    assert b"cpu_kernels" not in out.read_bytes()


def test_export_refuses_a_dynamic_batch_mindir(tiny_ckpt, tmp_path):
    # ONNX export itself is tested in test_onnx.py
    out = tmp_path / "tiny.mindir"
    result = run_tool("-m", "mindcv_volo.export", "--model", "volo_d1_224", "--ckpt", tiny_ckpt, "--out", out,
                      "--dynamic_batch", *reference_options("tiny_d1like_64"))
    assert_one_line_error(result, "--dynamic_batch is for --file_format ONNX; a MindIR has the fixed --batch_size")
    assert not out.exists()
