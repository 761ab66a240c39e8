"""Read PyTorch checkpoints without torch, and without running code from the file.

`torch.save` (torch >= 1.6) writes a zip archive:

    <prefix>/data.pkl        the pickled object; each tensor storage is a persistent id
                             ('storage', storage_type, key, location, numel)
    <prefix>/data/<key>      the raw bytes of storage <key>
    <prefix>/byteorder       'little' or 'big' (absent in old files: little)
    <prefix>/version, ...    bookkeeping we do not need

Tensors are pickled as calls to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

A pickle can call any importable function, so `pickle.load` on a downloaded checkpoint can run
arbitrary code. Our unpickler resolves globals only from a small allow-list: exactly what a tensor
checkpoint needs, each mapped to a harmless stand-in written here. Anything else is refused
before it is ever imported, let alone called.

A zip archive can also be a bomb: an entry of a few MB deflated to GBs, or entries nested in each other's
bytes. torch.save stores every entry uncompressed, side by side, and each storage entry holds exactly its
elements, so a compressed entry, overlapping entries or a storage entry of another size is refused from
the zip's headers, before the entry is read: reading takes memory in proportion to the file's size.

Public functions:
    read_torch_checkpoint(path)  -> the unpickled object, tensors as numpy arrays
    load_state_dict_file(path)   -> {name: numpy array} from a .pth/.pth.tar/.ckpt or .safetensors file
"""
import collections
import io
import os
import pickle
import struct
import types
import zipfile

import numpy as np

from ..errors import UserError

# Storage class name (as torch pickles it) -> numpy dtype of its elements.
# bfloat16 has no numpy dtype: its raw 16-bit words are kept as uint16 and widened to float32 later.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,  # a bare byte storage (torch >= 2.0); a tensor never refers to one
}

# Magic number that opens the legacy (pre-1.6, non-zip) torch.save format: the pickle starts with
# PROTO n, then LONG1 of 10 bytes holding 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _StorageType(collections.namedtuple("_StorageType", "name dtype")):
    """Stand-in for a torch.*Storage class: it only names the element type."""


class _Storage(collections.namedtuple("_Storage", "data bfloat16")):
    """A storage read from the archive: a flat array (a tuple, so a pickle cannot mutate it)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a view of the storage, copied into its own array."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor is built from something that is not a storage")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    data = storage.data
    # Bounds check before as_strided, which would otherwise read past the buffer.
    if 0 not in size:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:
            raise pickle.UnpicklingError(f"tensor of size {size} reads past the end of its storage "
                                         f"({data.size} elements)")
    strides = tuple(s * data.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(data[storage_offset:], shape=size, strides=strides, writeable=False)
    array = np.array(view, order="C")  # own contiguous copy: tensors sharing a storage do not alias
    if storage.bfloat16:
        # bfloat16 is the upper half of a float32: shift the 16 bits into place.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: a Parameter is just its tensor here."""
    return data


class _Namespace(types.SimpleNamespace):
    """Stand-in for argparse.Namespace (training scripts save their arguments): plain attributes."""


# (module, name) -> object the pickle gets instead. Nothing outside this table is ever imported.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("argparse", "Namespace"): _Namespace,
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()
                         if name != "UntypedStorage"})


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and reads storages from the zip archive."""

    def __init__(self, data, path, archive, prefix, byteorder):
        super().__init__(io.BytesIO(data))
        self._path, self._archive, self._prefix, self._byteorder = path, archive, prefix, byteorder
        self._storages = {}  # key -> _Storage; several tensors may share one storage

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f"{self._path}: refused to load: the pickle asks for '{module}.{name}', which a "
                            f"tensor checkpoint never needs (the file may be malicious)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            name = f"{self._prefix}/data/{key}"
            try:
                declared = self._archive.getinfo(name).file_size
            except KeyError:
                raise pickle.UnpicklingError(f"storage '{key}' is missing from the archive") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder("<" if self._byteorder == "little" else ">")
            if declared != numel * dtype.itemsize:
                raise UserError(f"{self._path}: refused to load: storage '{key}' declares {declared} bytes where "
                                f"its {numel} elements take {numel * dtype.itemsize} (the file may be malicious)")
            data = np.frombuffer(self._archive.read(name), dtype=dtype, count=numel).astype(dtype.newbyteorder("="))
            self._storages[key] = _Storage(data, storage_type.name == "BFloat16Storage")
        return self._storages[key]


def _not_a_checkpoint(path, reason):
    return UserError(f"{path} is not a PyTorch checkpoint (zip) or safetensors file: {reason}")


def _read_head(path, n=64):
    """First bytes of the file; a missing or unreadable file is a UserError."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None


def _looks_like_safetensors(head):
    # 8-byte little-endian header length, then a JSON object.
    return len(head) > 8 and head[8:9] == b"{"


_LOCAL_HEADER = struct.Struct("<26xHH")  # a zip entry's local header: ..., name length, extra field length


def _check_entries(path, archive):
    """Refuse, from the zip's headers alone, entries torch.save never writes: compressed ones (a few MB may
    inflate to GBs), and overlapping ones (an entry holding others: reading each takes the same bytes again)."""
    spans = []  # (first byte, end, what): each entry's local header and data
    with open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserError(f"{path}: refused to load: zip entry '{info.filename}' is compressed "
                                f"({info.file_size} bytes inflated), which torch.save never writes (the file may be "
                                "malicious)")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size:
                raise _not_a_checkpoint(path, f"damaged or truncated zip archive (entry '{info.filename}')")
            name_length, extra_length = _LOCAL_HEADER.unpack(header)
            end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
            spans.append((info.header_offset, end, f"zip entry '{info.filename}'"))
    spans.sort()
    followers = spans[1:] + [(archive.start_dir, 0, "the zip directory")]
    for (_, end, what), (next_start, _, next_what) in zip(spans, followers):
        if end > next_start:
            raise UserError(f"{path}: refused to load: {what} overlaps {next_what} (the file may be malicious)")


def read_torch_checkpoint(path):
    """Unpickle a torch.save zip file; tensors become numpy arrays, storages' sharing is not kept.

    float16 stays float16, bfloat16 becomes float32 (numpy has no bfloat16), other dtypes are kept.
    Raises UserError for a missing, damaged, legacy-format or not-allow-listed file.
    """
    path = os.fspath(path)
    head = _read_head(path)
    if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
        raise UserError(f"{path} uses the legacy (pre-1.6) torch.save format, which is not supported: "
                        f"re-save it with torch>=1.6 (zipfile format, the default): "
                        f"torch.save(torch.load(old), new)")
    if not head.startswith(b"PK"):
        if _looks_like_safetensors(head):
            raise UserError(f"{path} is a safetensors file, not a PyTorch checkpoint: use load_state_dict_file")
        raise _not_a_checkpoint(path, "no zip header" if head else "the file is empty")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(path, archive)
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise _not_a_checkpoint(path, f"a zip archive with {len(pickles)} '<name>/data.pkl' entries, not 1")
            prefix = pickles[0].rsplit("/", 1)[0]
            try:
                byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
            except KeyError:
                byteorder = "little"  # written since torch 1.9; older files are little-endian
            if byteorder not in ("little", "big"):
                raise _not_a_checkpoint(path, f"unknown byteorder {byteorder!r}")
            return _SafeUnpickler(archive.read(pickles[0]), path, archive, prefix, byteorder).load()
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise _not_a_checkpoint(path, f"damaged or truncated zip archive ({err})") from None
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        # AttributeError etc.: a malformed pickle calling our stand-ins with the wrong arguments.
        raise UserError(f"{path}: damaged PyTorch checkpoint: {type(err).__name__}: {err}") from None


def _load_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError as err:  # numpy cannot represent the dtype, e.g. bfloat16
        raise UserError(f"{path}: cannot load safetensors file with numpy ({err}); save it as float32") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: damaged safetensors file: {err}") from None


# Where training scripts put the weights, in order of preference: the plain weights first
# (`state_dict`: timm/DeiT/VOLO training scripts; `model`: DeiT-style releases), the EMA copy last.
EMA_KEY = "state_dict_ema"  # the official training scripts (timm) save the EMA weights under it
_STATE_DICT_KEYS = ("state_dict", "model", EMA_KEY)


def load_state_dict_file(path, ema=False):
    """Load a state dict {name: numpy array} from a .safetensors or a torch.save checkpoint file.

    A checkpoint may be a bare state dict or a dict holding it under one of `_STATE_DICT_KEYS`
    (first one present wins); with `ema`, the EMA weights (`state_dict_ema`) are taken, and a file without
    them is an error. A `module.` prefix shared by every key (DistributedDataParallel) is removed. All
    entries are kept, including BatchNorm `num_batches_tracked`.
    """
    path = os.fspath(path)
    head = _read_head(path)  # a missing file is reported here, the same way for both formats
    if path.endswith(".safetensors") or _looks_like_safetensors(head):
        state = _load_safetensors(path)
    else:
        state = read_torch_checkpoint(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a dict of weights (state dict)")
    if ema:
        if not isinstance(state.get(EMA_KEY), dict):
            raise UserError(f"{path}: holds no EMA weights ({EMA_KEY}); convert without --ema")
        state = state[EMA_KEY]
    for key in _STATE_DICT_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state:
        raise UserError(f"{path}: the state dict is empty")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise UserError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor: not a state dict "
                            f"(looked for the weights under {', '.join(_STATE_DICT_KEYS)} or at the top level)")
    if all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: value for name, value in state.items()}
    return dict(state)
