"""Tests of mindcv_volo.weights.torch_zip: reading torch.save checkpoints without torch, safely.

Small checkpoints are built here by hand (zipfile + pickle opcodes) because torch is not available;
the fixtures in tests/fixtures were written by real torch.save (see the reference README).
"""
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindcv_volo.errors import UserError
from mindcv_volo.weights.torch_zip import load_state_dict_file, read_torch_checkpoint
from conftest import p_dict, p_global, p_int, p_str, p_tensor, p_tuple, write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
NOT_A_CHECKPOINT = "is not a PyTorch checkpoint (zip) or safetensors file: "


def fp32_tensor(key="0", values=(1.0, 2.0)):
    return p_tensor("FloatStorage", key, len(values), 0, (len(values),), (1,)), {key: np.float32(values).tobytes()}


# --- real torch.save files ----------------------------------------------------------------------

def test_three_formats_give_identical_state_dicts():
    truth = load_file(FIXTURES / "tiny_d1like_64.safetensors")
    for name in ("tiny_d1like_64.safetensors", "tiny_d1like_64.pth", "tiny_d1like_64.pth.tar"):
        state = load_state_dict_file(FIXTURES / name)
        assert state.keys() == truth.keys(), name  # same names (safetensors stores them sorted)
        for key, ref in truth.items():
            got = state[key]
            assert got.dtype == ref.dtype and got.shape == ref.shape, (name, key)
            assert got.tobytes() == ref.tobytes(), (name, key)  # bit-identical
    assert any(k.endswith("num_batches_tracked") for k in truth)  # kept, not filtered out


def test_training_checkpoint_top_level():
    ckpt = read_torch_checkpoint(FIXTURES / "tiny_d1like_64.pth.tar")
    assert ckpt["epoch"] == 299 and ckpt["arch"] == "volo"
    assert all(k.startswith("module.") for k in ckpt["state_dict"])


# --- dtypes, geometry, allowed globals ----------------------------------------------------------

def test_strides_offset_and_dtypes(tmp_path):
    base = np.arange(12, dtype=np.float32)
    bf16_values = np.float32([1.0, -2.5, 3.140625])               # exactly representable in bfloat16
    bf16_raw = (bf16_values.view(np.uint32) >> 16).astype("<u2").tobytes()
    body = p_dict([
        # offset 1, size (2, 3), stride (1, 4): element [i, j] is base[1 + i + 4 j] (a transposed view)
        (p_str("strided"), p_tensor("FloatStorage", "f", 12, 1, (2, 3), (1, 4))),
        (p_str("shared"), p_tensor("FloatStorage", "f", 12, 10, (2,), (1,))),   # same storage again
        (p_str("scalar"), p_tensor("FloatStorage", "f", 12, 5, (), ())),
        (p_str("half"), p_tensor("HalfStorage", "h", 2, 0, (2,), (1,))),
        (p_str("bf16"), p_tensor("BFloat16Storage", "b", 3, 0, (3,), (1,))),
        (p_str("int32"), p_tensor("IntStorage", "i", 2, 0, (2,), (1,))),
        (p_str("uint8"), p_tensor("ByteStorage", "u", 3, 0, (3,), (1,))),
        (p_str("bool"), p_tensor("BoolStorage", "q", 2, 0, (2,), (1,))),
        (p_str("param"), p_global("torch._utils", "_rebuild_parameter")
         + p_tuple(p_tensor("LongStorage", "l", 2, 0, (2,), (1,)), b"\x88",
                   p_global("collections", "OrderedDict") + b")R") + b"R"),
        (p_str("args"), p_global("argparse", "Namespace") + b")\x81" + p_dict([(p_str("lr"), p_int(3))]) + b"b"),
    ])
    storages = {"f": base.tobytes(), "h": np.float16([0.5, -1.25]).tobytes(), "b": bf16_raw,
                "i": np.int32([-7, 2**31 - 1]).tobytes(), "u": bytes([0, 128, 255]), "q": b"\x01\x00",
                "l": np.int64([-(2**40), 5]).tobytes()}
    ckpt = read_torch_checkpoint(write_checkpoint(tmp_path / "x.pth", body, storages))

    expected = np.array([[base[1 + i + 4 * j] for j in range(3)] for i in range(2)])
    np.testing.assert_array_equal(ckpt["strided"], expected)
    assert ckpt["strided"].dtype == np.float32 and ckpt["strided"].flags.c_contiguous
    np.testing.assert_array_equal(ckpt["shared"], [10.0, 11.0])
    assert ckpt["scalar"].shape == () and ckpt["scalar"] == 5.0
    assert ckpt["half"].dtype == np.float16 and ckpt["half"].tolist() == [0.5, -1.25]
    assert ckpt["bf16"].dtype == np.float32 and ckpt["bf16"].tolist() == bf16_values.tolist()
    assert ckpt["int32"].dtype == np.int32 and ckpt["int32"].tolist() == [-7, 2**31 - 1]
    assert ckpt["uint8"].dtype == np.uint8 and ckpt["uint8"].tolist() == [0, 128, 255]
    assert ckpt["bool"].dtype == np.bool_ and ckpt["bool"].tolist() == [True, False]
    assert ckpt["param"].dtype == np.int64 and ckpt["param"].tolist() == [-(2**40), 5]
    assert ckpt["args"].lr == 3


def test_big_endian_storage(tmp_path):
    body = p_dict([(p_str("w"), p_tensor("FloatStorage", "0", 2, 0, (2,), (1,)))])
    path = write_checkpoint(tmp_path / "be.pth", body, {"0": np.float32([1.5, -3.0]).astype(">f4").tobytes()}, "big")
    w = read_torch_checkpoint(path)["w"]
    assert w.dtype == np.float32 and w.tolist() == [1.5, -3.0]


def test_tensor_reading_past_its_storage_is_refused(tmp_path):
    body = p_tensor("FloatStorage", "0", 2, 1, (2,), (1,))           # needs elements 1 and 2 of 2
    path = write_checkpoint(tmp_path / "oob.pth", body, {"0": np.float32([1, 2]).tobytes()})
    with pytest.raises(UserError, match="reads past the end of its storage"):
        read_torch_checkpoint(path)


def test_storage_entry_of_another_size_is_refused(tmp_path):
    body = p_tensor("FloatStorage", "0", 2, 0, (2,), (1,))
    for values in ([1, 2, 3], [1]):                                 # more, and fewer, bytes than 2 floats
        path = write_checkpoint(tmp_path / f"size{len(values)}.pth", body, {"0": np.float32(values).tobytes()})
        assert _one_line_error(read_torch_checkpoint, path) == (
            f"{path}: refused to load: storage '0' declares {4 * len(values)} bytes where its 2 elements take 8 "
            "(the file may be malicious)")


def test_compressed_entry_is_refused(tmp_path):
    tensor, storages = fp32_tensor()
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + tensor + b".")
        archive.writestr("archive/data/0", storages["0"])
    assert _one_line_error(read_torch_checkpoint, path) == (
        f"{path}: refused to load: zip entry 'archive/data.pkl' is compressed ({len(tensor) + 3} bytes inflated), "
        "which torch.save never writes (the file may be malicious)")


def test_overlapping_entries_are_refused(tmp_path):
    """Entry 0's stored bytes hold entry 1 whole (its local header and data): each read of an entry would take
    bytes of the file again, so nested entries multiply a file's size."""
    storage = np.float32([1, 2]).tobytes()
    inner_name = "archive/data/1"
    inner = local_header(inner_name, zipfile.ZIP_STORED, len(storage), len(storage), zlib.crc32(storage)) + storage
    body = p_dict([(p_str("a"), p_tensor("FloatStorage", "0", len(inner) // 4, 0, (1,), (1,))),
                   (p_str("b"), p_tensor("FloatStorage", "1", 2, 0, (2,), (1,)))])
    pickled = b"\x80\x02" + body + b"."
    path = write_zip(tmp_path / "nested.pth", [("archive/data.pkl", zipfile.ZIP_STORED, pickled, None),
                                               ("archive/data/0", zipfile.ZIP_STORED, inner, None)],
                     inner={inner_name: ("archive/data/0", storage)})
    assert _one_line_error(read_torch_checkpoint, path) == (
        f"{path}: refused to load: zip entry 'archive/data/0' overlaps zip entry '{inner_name}' (the file may be "
        "malicious)")


BOMB_BYTES = 3 * 10**9                                             # 3 GB of zeros, deflated to about 3 MB
BOMB_CHUNK = 1 << 24


def local_header(name, method, stored, size, crc):
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, stored, size, len(name),
                       0) + name.encode()


def write_zip(path, entries, inner=None):
    """A zip archive written by hand, so an entry can hold deflated bytes made elsewhere: `entries` are
    (name, method, bytes as stored, (inflated size, crc32) or None for stored bytes). `inner` lists entries
    stored inside another one's bytes, {name: (outer entry's name, data)}: directory records only."""
    local, records = b"", []
    for name, method, data, inflated in entries:
        size, crc = inflated or (len(data), zlib.crc32(data))
        records.append((name, len(local), method, crc, len(data), size))
        local += local_header(name, method, len(data), size, crc) + data
    for name, (outer, data) in (inner or {}).items():
        outer_offset = next(record[1] for record in records if record[0] == outer)
        records.append((name, outer_offset + 30 + len(outer), zipfile.ZIP_STORED, zlib.crc32(data), len(data),
                        len(data)))
    directory = b"".join(
        struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, stored, size, len(name), 0,
                    0, 0, 0, 0, offset) + name.encode()
        for name, offset, method, crc, stored, size in records)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(directory), len(local), 0)
    Path(path).write_bytes(local + directory + end)
    return path


def write_bomb(path):
    """A torch-style checkpoint whose one storage entry inflates to BOMB_BYTES of zeros (the sizes it declares
    fit its tensor, its crc is right). Each chunk ends with a full flush, so every chunk deflates to the same
    bytes: deflated once, repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, rest = bytes(BOMB_CHUNK), bytes(BOMB_BYTES % BOMB_CHUNK)
    deflated_chunk = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    deflated = deflated_chunk * (BOMB_BYTES // BOMB_CHUNK) + compressor.compress(rest) + compressor.flush()
    crc = 0
    for _ in range(BOMB_BYTES // BOMB_CHUNK):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(rest, crc)
    numel = BOMB_BYTES // 4
    body = p_dict([(p_str("w"), p_tensor("FloatStorage", "0", numel, 0, (numel,), (1,)))])
    return write_zip(path, [("archive/data.pkl", zipfile.ZIP_STORED, b"\x80\x02" + body + b".", None),
                            ("archive/data/0", zipfile.ZIP_DEFLATED, deflated, (BOMB_BYTES, crc))])


# Peak memory the reading may add to the interpreter's: the file itself, and a margin for Python's own work.
MEMORY_MARGIN = 64 * 2**20


def test_zip_bomb_is_refused_without_inflating_it(tmp_path):
    path = write_bomb(tmp_path / "bomb.pth")
    size = path.stat().st_size
    assert size < 4 * 2**20
    with zipfile.ZipFile(path) as archive:                           # a well-formed archive, as zipfile sees it
        assert archive.getinfo("archive/data/0").file_size == BOMB_BYTES
    # In a fresh interpreter: its peak resident memory before and after the read (ru_maxrss, KiB on Linux).
    script = (
        "import resource, sys\n"
        "from mindcv_volo.errors import UserError\n"
        "from mindcv_volo.weights.torch_zip import load_state_dict_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_state_dict_file(sys.argv[1])\n"
        "except UserError as err:\n"
        "    print(err)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    message, grown_kib = result.stdout.strip().splitlines()[-2:]
    assert message == (f"{path}: refused to load: zip entry 'archive/data/0' is compressed ({BOMB_BYTES} bytes "
                       "inflated), which torch.save never writes (the file may be malicious)")
    assert int(grown_kib) * 1024 <= size + MEMORY_MARGIN


# --- malicious pickles --------------------------------------------------------------------------

def _attacks(marker):
    shell = p_str(f"touch {marker}")
    python = p_str(f"open({str(marker)!r}, 'w').close()")
    return {
        "os.system": p_global("os", "system") + p_tuple(shell) + b"R",
        "posix.system": p_global("posix", "system") + p_tuple(shell) + b"R",
        "builtins.eval": p_global("builtins", "eval") + p_tuple(python) + b"R",
        # protocol-4 STACK_GLOBAL, hidden inside an otherwise valid state dict after a real tensor
        "builtins.exec": p_dict([(p_str("w"), fp32_tensor()[0]),
                                 (p_str("x"), p_str("builtins") + p_str("exec") + b"\x93" + p_tuple(python) + b"R")]),
    }


@pytest.mark.parametrize("refused", ["os.system", "posix.system", "builtins.eval", "builtins.exec"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, refused):
    marker = tmp_path / "pwned"
    path = write_checkpoint(tmp_path / "evil.pth", _attacks(marker)[refused], fp32_tensor()[1])
    for load in (read_torch_checkpoint, load_state_dict_file):
        with pytest.raises(UserError) as info:
            load(path)
        assert str(info.value) == (f"{path}: refused to load: the pickle asks for '{refused}', which a tensor "
                                   f"checkpoint never needs (the file may be malicious)")
    assert not marker.exists()


# --- files that are not checkpoints -------------------------------------------------------------

def _one_line_error(load, path):
    with pytest.raises(UserError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("load", [read_torch_checkpoint, load_state_dict_file])
def test_truncated_random_and_empty_files(tmp_path, load):
    data = (FIXTURES / "tiny_d1like_64.pth").read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "random.pth": np.random.default_rng(0).bytes(4096),
        "empty.pth": b"",
        "other.zip": None,                                           # a zip, but not from torch.save
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is None:
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("readme.txt", "hello")
        else:
            path.write_bytes(content)
        assert _one_line_error(load, path).startswith(f"{path} {NOT_A_CHECKPOINT}"), name


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = (FIXTURES / "tiny_d1like_64.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _one_line_error(load_state_dict_file, path).startswith(f"{path}: damaged safetensors file")


def test_legacy_format_is_refused_with_advice(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".")
    assert "re-save it with torch>=1.6" in _one_line_error(read_torch_checkpoint, path)


def test_missing_file(tmp_path):
    for load in (read_torch_checkpoint, load_state_dict_file):
        assert "no such file" in _one_line_error(load, tmp_path / "nope.pth")
    assert "no such file" in _one_line_error(load_state_dict_file, tmp_path / "nope.safetensors")


# --- unwrapping the state dict ------------------------------------------------------------------

def test_non_dict_top_level(tmp_path):
    tensor, storages = fp32_tensor()
    path = write_checkpoint(tmp_path / "list.pth", b"]" + b"(" + tensor + b"e", storages)   # [tensor]
    assert "holds a list, not a dict of weights" in _one_line_error(load_state_dict_file, path)


def test_dict_with_non_tensor_entries_is_not_a_state_dict(tmp_path):
    tensor, storages = fp32_tensor()
    path = write_checkpoint(tmp_path / "odd.pth", p_dict([(p_str("w"), tensor), (p_str("epoch"), p_int(3))]), storages)
    assert "entry 'epoch' is a int, not a tensor" in _one_line_error(load_state_dict_file, path)


def test_unwrap_order_and_module_prefix(tmp_path):
    def weights(prefix, value):
        return p_dict([(p_str(prefix + "w"), p_tensor("FloatStorage", str(value), 1, 0, (1,), (1,)))])

    storages = {str(v): np.float32([v]).tobytes() for v in (1, 2, 3)}
    both = p_dict([(p_str("state_dict_ema"), weights("module.", 3)), (p_str("model"), weights("", 2)),
                   (p_str("state_dict"), weights("module.", 1)), (p_str("epoch"), p_int(9))])
    assert load_state_dict_file(write_checkpoint(tmp_path / "a.pth", both, storages)) == {"w": np.float32([1])}
    no_plain = p_dict([(p_str("state_dict_ema"), weights("", 3)), (p_str("model"), weights("", 2))])
    assert load_state_dict_file(write_checkpoint(tmp_path / "b.pth", no_plain, storages))["w"][0] == 2
    ema_only = p_dict([(p_str("state_dict_ema"), weights("", 3))])
    assert load_state_dict_file(write_checkpoint(tmp_path / "c.pth", ema_only, storages))["w"][0] == 3

    # the prefix is removed only when every key has it
    mixed = p_dict([(p_str("module.a"), p_tensor("FloatStorage", "1", 1, 0, (1,), (1,))),
                    (p_str("b"), p_tensor("FloatStorage", "2", 1, 0, (1,), (1,)))])
    assert list(load_state_dict_file(write_checkpoint(tmp_path / "d.pth", mixed, storages))) == ["module.a", "b"]
