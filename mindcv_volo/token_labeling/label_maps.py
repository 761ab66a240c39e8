"""Dense token-label maps: the on-disk format, the reader, and the map following its image's geometry.

On-disk format (version 1), written by `python -m mindcv_volo.relabel`:

    MAP_DIR/labelmaps.json             {"format": "mindcv_volo.label_maps/1", "teacher", "num_classes",
                                        "top_k", "grid": [G_h, G_w], "image_size", ...}; informative
    MAP_DIR/<class>/<stem>.npz         one file per image: data_dir/<split>/<class>/<stem>.<ext>
        indices  int16 (G_h, G_w, k)   the teacher's top-k classes per cell, best first (int32 if K > 32767)
        scores   float16 (G_h, G_w, k) the teacher's logits (before softmax) of those classes
        num_classes  int32 ()           the teacher's class count K

Cell (r, c) is the teacher's token r rows down, c columns right, over the *whole* image (resized to
the teacher's input size without cropping, so the map covers exactly the image the training crop is
taken from). The official TokenLabeling maps (`<class>/<name up to the first dot>.pt`, torch.save of a
half tensor (2, k, H, W): logits then class indices) are read too, without torch (safe zip reader).

Target semantics (as TokenLabeling's get_featuremaps + get_label, RoIAlign with aligned=False on the
box - 0.5 and an adaptive sampling grid): the top-k logits are placed in a zero map of all K classes,
the map is resampled to the token grid with RoIAlign's bilinear averaging over the part of the source
image each token shows, then softmax over the K classes (`token_label.topk_target`). Every geometric
operation the training image went through moves its map with the same parameters (`engine.augment.Geometry`:
the random-resized crop, the flips, and RandAugment's rotate, shear and translate, as the official applies
them to its label map); colour operations and random erasing leave the map as it is. Where the image shows
the fill of a rotation or shift, the map reads 0 (logits 0: no class preferred). The class-level target is
the same with a 1 x 1 output: the average over what the image shows. Deliberate differences from the official:
  * the official passes the crop box to roi_align as (top, left, bottom, right) where roi_align wants
    (x1, y1, x2, y2), i.e. it crops the transposed box unless the crop is square and on the diagonal;
    here rows follow rows, so the token labels line up with the image (tested exactly);
  * a crop less than one map cell long is not stretched to one cell as RoIAlign's box is: the samples
    are taken where the image's pixels come from;
  * after resampling, each token keeps its `topk` largest logits (a fixed width for the pipeline,
    default k); the rest count as 0, where the official keeps the whole resampled map;
  * label smoothing gives t * (1 - eps) + eps / K (sums to 1); the official adds eps / K to
    t * (1 - eps + eps / K), which sums to 1 + eps / K.
"""
import json
import os
import zipfile

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import UserError
from ..files import atomic_path, write_text
from ..weights.torch_zip import read_torch_checkpoint

FORMAT = "mindcv_volo.label_maps/1"
# numpy's BLAS, held to one thread for the resampling's small product: OpenBLAS's helper thread spins on a core
# the other data workers need (measured: a token-label sample's CPU time 7.6 ms with it, 3.9 ms without).
_BLAS = ThreadpoolController()
META_FILE = "labelmaps.json"


# --- files --------------------------------------------------------------------------------------

def label_map_path(map_dir, image_relpath):
    """MAP_DIR/<class>/<stem>.npz for the image <class>/<stem>.<ext> (path relative to the split)."""
    return os.path.join(map_dir, os.path.splitext(image_relpath)[0] + ".npz")


def official_map_path(map_dir, image_relpath):
    """Where TokenLabeling's generate_label.py puts an image's map: the name up to its first dot, .pt."""
    folder, name = os.path.split(image_relpath)
    return os.path.join(map_dir, folder, name.split(".")[0] + ".pt")


def write_label_map(path, indices, scores, num_classes):
    """Write one map atomically (temporary file, then rename): a kill never leaves half a file."""
    indices, scores = np.asarray(indices), np.asarray(scores)
    if indices.shape != scores.shape or indices.ndim != 3:
        raise ValueError(f"indices {indices.shape} and scores {scores.shape} must both be (G_h, G_w, k)")
    index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, indices=indices.astype(index_dtype), scores=scores.astype(np.float16),
                 num_classes=np.int32(num_classes))


def write_meta(map_dir, **fields):
    """MAP_DIR/labelmaps.json, atomically; ranks writing the same content concurrently is harmless."""
    write_text(os.path.join(map_dir, META_FILE), json.dumps({"format": FORMAT, **fields}, indent=1))


def read_label_map(path):
    """(indices int32 (G_h, G_w, k), scores float32 (G_h, G_w, k)) from a .npz of ours or an official .pt."""
    path = os.fspath(path)
    if path.endswith(".pt"):
        return _read_official(path)
    try:
        with np.load(path) as data:
            indices, scores = data["indices"].astype(np.int32), data["scores"].astype(np.float32)
    except FileNotFoundError:
        raise UserError(f"label map not found: {path}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{path}: not a readable label map ({type(err).__name__}: {err})") from None
    if indices.ndim != 3 or indices.shape != scores.shape:
        raise UserError(f"{path}: indices {indices.shape} and scores {scores.shape} are not both (G_h, G_w, k)")
    return indices, scores


def _read_official(path):
    tensor = read_torch_checkpoint(path)
    if not isinstance(tensor, np.ndarray) or tensor.ndim != 4 or tensor.shape[0] != 2:
        shape = getattr(tensor, "shape", type(tensor).__name__)
        raise UserError(f"{path}: not a TokenLabeling map (expected a tensor (2, k, H, W), got {shape})")
    scores, indices = tensor.astype(np.float32)  # indices are stored as float16: exact below 2048
    return np.rint(indices).astype(np.int32).transpose(1, 2, 0), scores.transpose(1, 2, 0)


def find_label_map(map_dir, image_relpath):
    """Path of an image's map: ours (.npz) first, else the official .pt; a UserError if neither exists."""
    for path in (label_map_path(map_dir, image_relpath), official_map_path(map_dir, image_relpath)):
        if os.path.isfile(path):
            return path
    raise UserError(f"no label map for {image_relpath} in {map_dir} (expected "
                    f"{label_map_path(map_dir, image_relpath)}); make the maps with `python -m mindcv_volo.relabel`")


# --- alignment: the map follows its image ---------------------------------------------------------

def _bilinear(coordinate, size):
    """torchvision's roi_align sampling along one axis, for cell-centre coordinates (an array):
    (low cell, high cell, weight of the high cell, inside). A sample more than one cell outside the map
    reads 0 (inside False); nearer ones are clamped to the edge cell."""
    inside = (coordinate >= -1.0) & (coordinate <= size)
    coordinate = np.maximum(coordinate, 0.0)
    low = np.floor(coordinate).astype(np.int64)
    at_edge = low >= size - 1
    low = np.where(at_edge, size - 1, low)
    high = np.where(at_edge, size - 1, low + 1)
    return low, high, np.where(at_edge, 0.0, coordinate - low), inside


def sampling_weights(geometry, grid, out_size):
    """(out_h * out_w, G_h * G_w): the target of output token t is row t times the map's cells (row-major).

    A token averages n_y x n_x bilinear samples of the map, taken on an even sub-grid of the token's area in
    the training image and carried back to the source image by `geometry` (crop, flips and RandAugment's
    rotate, shear and translate, exactly as the image's pixels): n = ceil(map cells a token spans along the
    axis), cell-centre coordinates, torchvision's border rules. For a crop and a flip alone this is
    TokenLabeling's RoIAlign of the crop box (aligned=False on box - 0.5), the weights of a separable grid.
    """
    grid_h, grid_w = grid
    out_h, out_w = out_size
    source_h, source_w = geometry.source_size
    box_h, box_w = geometry.box[2:]
    # ceil(box / source * grid / out) in integers: a float ratio of exactly 4 may come out as 4.000000000000001
    n_y = max(-(-box_h * grid_h // (source_h * out_h)), 1)
    n_x = max(-(-box_w * grid_w // (source_w * out_w)), 1)
    size = geometry.size
    ys = (np.arange(out_h)[:, None] + (np.arange(n_y) + 0.5) / n_y) * (size / out_h)
    xs = (np.arange(out_w)[:, None] + (np.arange(n_x) + 0.5) / n_x) * (size / out_w)
    shape = (out_h, n_y, out_w, n_x)
    x, y, shown = geometry.to_source(np.broadcast_to(xs[None, None], shape),
                                     np.broadcast_to(ys[:, :, None, None], shape))
    row_low, row_high, row_frac, row_in = _bilinear(y / source_h * grid_h - 0.5, grid_h)
    col_low, col_high, col_frac, col_in = _bilinear(x / source_w * grid_w - 0.5, grid_w)
    token = np.broadcast_to((np.arange(out_h)[:, None, None, None] * out_w + np.arange(out_w)[:, None]), shape)
    inside = (row_in & col_in & shown) / (n_y * n_x)  # the fill a rotation or shift brings in reads 0
    corners = [(token * (grid_h * grid_w) + row * grid_w + col, row_weight * col_weight * inside)
               for row, row_weight in ((row_low, 1.0 - row_frac), (row_high, row_frac))
               for col, col_weight in ((col_low, 1.0 - col_frac), (col_high, col_frac))]
    return _sum_into(corners, (out_h * out_w, grid_h * grid_w))


def _sum_into(parts, shape):
    """A zero float64 array of `shape` with each part's values (flat index array, value array) added at its
    indices: the additions of np.add.at, in the same order (so the same sums to the bit), without its cost."""
    flat = np.concatenate([index.ravel() for index, _ in parts])
    values = np.concatenate([np.ravel(value) for _, value in parts])
    return np.bincount(flat, values, minlength=int(np.prod(shape))).reshape(shape)


def follow_image(indices, scores, geometry, out_size, topk=None):
    """A top-k map moved as its image was (`geometry`) and resampled to `out_size` tokens.

    indices/scores (G_h, G_w, k): a map covering the whole source image. Returns (indices int32, scores
    float32), both (out_h, out_w, topk): per token the `topk` (default k) largest resampled logits of the
    classes the map mentions, best first (the others count as 0; if fewer classes than topk are mentioned,
    the rest is padding with score 0).
    """
    return _resample(_dense_logits(indices, scores), geometry, out_size, topk or indices.shape[-1])


def _dense_logits(indices, scores):
    """(classes the map mentions (C,), (G_h, G_w), logits (G_h * G_w, C)): absent classes are 0 and stay 0."""
    grid_h, grid_w, k = indices.shape
    classes, slot = np.unique(indices, return_inverse=True)
    flat = np.repeat(np.arange(grid_h * grid_w), k) * classes.size + slot.reshape(-1)
    return classes, (grid_h, grid_w), _sum_into([(flat, scores)], (grid_h * grid_w, classes.size))


def _resample(dense_map, geometry, out_size, topk):
    """follow_image from a map's `_dense_logits`."""
    classes, grid, dense = dense_map
    out_h, out_w = out_size
    weights = sampling_weights(geometry, grid, out_size)
    with _BLAS.limit(limits=1, user_api="blas"):
        out = (weights @ dense).reshape(out_h, out_w, classes.size)
    if classes.size < topk:  # too few classes: pad with zero logits (they add nothing in topk_target)
        out = np.concatenate([out, np.zeros((out_h, out_w, topk - classes.size))], axis=-1)
        classes = np.concatenate([classes, np.full(topk - classes.size, classes[0])])
    order = np.argsort(-out, axis=-1, kind="stable")[..., :topk]
    return classes[order].astype(np.int32), np.take_along_axis(out, order, -1).astype(np.float32)


def label_map_columns(indices, scores, geometry, grid, topk=None):
    """The targets of one training sample from its image's map and geometry:
        cls_indices  int32 (topk,)           the teacher's label of what the image shows (1 x 1)
        cls_scores   float32 (topk,)
        token_indices  int32 (G * G, topk)   per token, row-major as VOLO's aux logits (G = grid)
        token_scores   float32 (G * G, topk)
    """
    k = topk or indices.shape[-1]
    dense_map = _dense_logits(indices, scores)  # one for both resamplings
    cls_indices, cls_scores = _resample(dense_map, geometry, (1, 1), k)
    token_indices, token_scores = _resample(dense_map, geometry, (grid, grid), k)
    return cls_indices.reshape(k), cls_scores.reshape(k), token_indices.reshape(-1, k), token_scores.reshape(-1, k)


def missing_label_maps(map_dir, items):
    """The relative paths of the images in `items` ((relative path, label) pairs) that have no map in
    `map_dir`, ours or the official; one directory listing per class folder, no map is read."""
    listed = {}
    missing = []
    for relpath, _ in items:
        folder, name = os.path.split(relpath)
        if folder not in listed:
            path = os.path.join(map_dir, folder)
            listed[folder] = set(os.listdir(path)) if os.path.isdir(path) else set()
        if (os.path.splitext(name)[0] + ".npz" not in listed[folder]
                and name.split(".")[0] + ".pt" not in listed[folder]):
            missing.append(relpath)
    return missing
