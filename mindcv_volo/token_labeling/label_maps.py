"""Dense token-label maps: the on-disk format, the reader, and the alignment with random-resized-crop/flip.

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
the map is cropped by the image's crop box and resampled to the token grid with RoIAlign's bilinear
averaging, then softmax over the K classes (`token_label.topk_target`). The class-level target is the
same with a 1 x 1 output: the average over the crop. Two deliberate differences from the official:
  * the official passes the crop box to roi_align as (top, left, bottom, right) where roi_align wants
    (x1, y1, x2, y2), i.e. it crops the transposed box unless the crop is square and on the diagonal;
    here rows follow rows, so the token labels line up with the image (tested exactly);
  * after resampling, each token keeps its `topk` largest logits (a fixed width for the pipeline,
    default k); the rest count as 0, where the official keeps the whole resampled map;
  * label smoothing gives t * (1 - eps) + eps / K (sums to 1); the official adds eps / K to
    t * (1 - eps + eps / K), which sums to 1 + eps / K.
RandAugment's geometric ops are not applied to the map (the official applies them to its label map).
"""
import json
import math
import os
import zipfile

import numpy as np
from PIL import Image

from ..errors import UserError
from ..files import atomic_path, write_text
from ..weights.torch_zip import read_torch_checkpoint

FORMAT = "mindcv_volo.label_maps/1"
META_FILE = "labelmaps.json"


# --- files --------------------------------------------------------------------------------------

def list_images(folder):
    """(relative path, class index) of every file of an ImageFolder split: classes and files sorted."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder not found: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    items = [(f"{name}/{f.name}", label) for label, name in enumerate(classes)
             for f in sorted(os.scandir(os.path.join(folder, name)), key=lambda e: e.name) if f.is_file()]
    if not items:
        raise UserError(f"{folder} holds no images (expected one sub-folder per class)")
    return items


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


# --- alignment: crop, resample, flip --------------------------------------------------------------

def roi_align_weights(lo, hi, out_size, map_size):
    """(out_size, map_size) matrix of RoIAlign along one axis, as the official call of torchvision's roi_align.

    The box [lo, hi] is in map cells (cell i spans [i, i + 1)); official: aligned=False on box - 0.5,
    i.e. samples in cell-centre coordinates, the box at least 1 cell long, ceil(length / out) samples
    per output bin, each bilinear with torchvision's border rules (clamped inside [-1, size], zero outside).
    """
    start, length = lo - 0.5, max(hi - lo, 1.0)
    bin_size = length / out_size
    grid = max(int(math.ceil(length / out_size)), 1)
    weights = np.zeros((out_size, map_size))
    for p in range(out_size):
        for s in range(grid):
            y = start + p * bin_size + (s + 0.5) * bin_size / grid
            if y < -1.0 or y > map_size:
                continue  # the sample reads 0
            y = max(y, 0.0)
            low = int(y)
            if low >= map_size - 1:
                low = high = map_size - 1
                y = float(low)
            else:
                high = low + 1
            weights[p, low] += (1.0 - (y - low)) / grid
            weights[p, high] += (y - low) / grid
    return weights


def crop_label_map(indices, scores, box, image_size, out_size, flip=False, topk=None):
    """Crop a top-k map by an image crop box, resample it to `out_size` tokens, mirror it if flipped.

    indices/scores (G_h, G_w, k): a map covering the whole image. box (top, left, height, width) in
    pixels of the image of size image_size (height, width). out_size (out_h, out_w). Returns
    (indices int32, scores float32), both (out_h, out_w, topk): per token the `topk` (default k)
    largest resampled logits of the classes the map mentions, best first (the others count as 0;
    if fewer classes than topk are mentioned, the rest is padding with score 0).
    """
    grid_h, grid_w, k = indices.shape
    topk = topk or k
    top, left, height, width = box
    img_h, img_w = image_size
    out_h, out_w = out_size
    rows = roi_align_weights(top / img_h * grid_h, (top + height) / img_h * grid_h, out_h, grid_h)
    cols = roi_align_weights(left / img_w * grid_w, (left + width) / img_w * grid_w, out_w, grid_w)
    # Dense logits over the classes the map mentions (absent classes are 0 and stay 0).
    classes, slot = np.unique(indices, return_inverse=True)
    dense = np.zeros((grid_h, grid_w, classes.size))
    r, c = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    np.add.at(dense, (r[..., None], c[..., None], slot.reshape(indices.shape)), scores)
    out = np.einsum("ar,bc,rcu->abu", rows, cols, dense)
    if flip:
        out = out[:, ::-1]
    if classes.size < topk:  # too few classes: pad with zero logits (they add nothing in topk_target)
        out = np.concatenate([out, np.zeros((out_h, out_w, topk - classes.size))], axis=-1)
        classes = np.concatenate([classes, np.full(topk - classes.size, classes[0])])
    order = np.argsort(-out, axis=-1, kind="stable")[..., :topk]
    return classes[order].astype(np.int32), np.take_along_axis(out, order, -1).astype(np.float32)


def resized_crop_params(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's / MindSpore's RandomResizedCrop box (top, left, height, width): 10 tries, then centre."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class RandomResizedCropWithMap:
    """Random-resized-crop + horizontal flip of an image and its label map, with one box and one flip.

    Replaces RandomResizedCrop + RandomHorizontalFlip at the head of the training transforms; the other
    image transforms (RandAugment, normalisation, random erasing) follow on the image alone.
    __call__(image, map_indices, map_scores) with image HWC uint8 (numpy or PIL) returns
        image          uint8 (size, size, 3)
        cls_indices    int32 (topk,)        teacher's label of the whole crop (1 x 1 RoIAlign)
        cls_scores     float32 (topk,)
        token_indices  int32 (grid * grid, topk)   tokens in row-major order, as VOLO's aux logits
        token_scores   float32 (grid * grid, topk)
    grid is size // 16 by default (VOLO's token grid). The random state is `rng` (a numpy Generator):
    give each data-pipeline worker its own, e.g. np.random.default_rng([seed, epoch, worker]).
    """

    def __init__(self, size, grid=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                 hflip=0.5, topk=None, rng=None):
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        self.size = size
        self.grid = grid or size // 16
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.resample = _RESAMPLE[interpolation]
        self.hflip = hflip
        self.topk = topk
        self.rng = rng if rng is not None else np.random.default_rng()

    def sample(self, width, height):
        """(box, flip) for an image of this size: the crop box first, then the flip, from self.rng."""
        box = resized_crop_params(width, height, self.rng, self.scale, self.ratio)
        return box, bool(self.rng.random() < self.hflip)

    def apply(self, image, map_indices, map_scores, box, flip):
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
        top, left, height, width = box
        crop = image.crop((left, top, left + width, top + height)).resize((self.size, self.size), self.resample)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        image_size = (image.height, image.width)
        cls_indices, cls_scores = crop_label_map(map_indices, map_scores, box, image_size, (1, 1), flip, self.topk)
        token_indices, token_scores = crop_label_map(map_indices, map_scores, box, image_size,
                                                     (self.grid, self.grid), flip, self.topk)
        k = token_indices.shape[-1]
        return (np.asarray(crop.convert("RGB"), np.uint8), cls_indices.reshape(k), cls_scores.reshape(k),
                token_indices.reshape(-1, k), token_scores.reshape(-1, k))

    def __call__(self, image, map_indices, map_scores):
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        box, flip = self.sample(width, height)
        return self.apply(image, map_indices, map_scores, box, flip)


class ImageFolderWithMaps:
    """Random-access source for mindspore.dataset.GeneratorDataset: an ImageFolder split with its maps.

    Item i: (image uint8 HWC, label int32, map_indices int32 (G_h, G_w, k), map_scores float32), in
    `list_images` order (classes, then files, sorted). Maps are looked up by path (find_label_map).
    """

    columns = ["image", "label", "map_indices", "map_scores"]

    def __init__(self, folder, map_dir, num_classes=None):
        self.folder, self.map_dir, self.num_classes = folder, map_dir, num_classes
        self.items = list_images(folder)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        relpath, label = self.items[index]
        path = os.path.join(self.folder, relpath)
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"), np.uint8)
        except OSError as err:
            raise UserError(f"cannot read image {path}: {err}") from None
        indices, scores = read_label_map(find_label_map(self.map_dir, relpath))
        if self.num_classes is not None and indices.max() >= self.num_classes:
            raise UserError(f"label map of {relpath} has class {indices.max()} but num_classes is "
                            f"{self.num_classes}: the teacher's classes differ from the model's")
        return image, np.int32(label), indices, scores
