"""Label maps: RoIAlign weights by hand, exact crop/flip alignment with the image, the file format."""
import os

import numpy as np
import pytest
from PIL import Image

from mindcv_volo.errors import UserError
from mindcv_volo.token_labeling.label_maps import (ImageFolderWithMaps, RandomResizedCropWithMap, crop_label_map, find_label_map,
                                    label_map_path, read_label_map, resized_crop_params, roi_align_weights,
                                    write_label_map)
from test_torch_zip import p_tensor, write_checkpoint

CELL = 16  # pixels per map cell in the synthetic image


def cell_image(rows, cols):
    """Image whose map cell (r, c) is one colour: red 40 r + 10, green 40 c + 10."""
    r, c = np.meshgrid(np.arange(rows * CELL) // CELL, np.arange(cols * CELL) // CELL, indexing="ij")
    return np.stack([40 * r + 10, 40 * c + 10, np.zeros_like(r)], -1).astype(np.uint8)


def cell_ids_of(image, cols):
    """The cell id 6 r + c that each 16 x 16 block of an image shows (blocks must be uniform)."""
    blocks = image.reshape(image.shape[0] // CELL, CELL, image.shape[1] // CELL, CELL, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "a token block mixes cells"
    red, green = blocks[:, 0, :, 0, 0].astype(int), blocks[:, 0, :, 0, 1].astype(int)
    return (red - 10) // 40 * cols + (green - 10) // 40


def cell_map(rows, cols):
    """Map whose cell (r, c) says: class 6 r + c (logit 10), then the next id (logit 1)."""
    ids = np.arange(rows * cols).reshape(rows, cols)
    return (np.stack([ids, (ids + 1) % (rows * cols)], -1).astype(np.int32),
            np.broadcast_to(np.float32([10.0, 1.0]), (rows, cols, 2)).copy())


# --- RoIAlign weights ------------------------------------------------------------------------------

def test_roi_align_weights_by_hand():
    # Box [1, 3] of 4 cells onto 2 outputs: 1 sample per bin, at the centres of cells 1 and 2.
    np.testing.assert_allclose(roi_align_weights(1, 3, 2, 4), [[0, 1, 0, 0], [0, 0, 1, 0]])
    # Onto 4 outputs: samples at 0.75, 1.25, 1.75, 2.25 (cell-centre coordinates), bilinear.
    np.testing.assert_allclose(roi_align_weights(1, 3, 4, 4), [[0.25, 0.75, 0, 0], [0, 0.75, 0.25, 0],
                                                               [0, 0.25, 0.75, 0], [0, 0, 0.75, 0.25]])
    # The whole axis onto 1 output: ceil(4 / 1) = 4 samples, at every cell centre: the mean.
    np.testing.assert_allclose(roi_align_weights(0, 4, 1, 4), [[0.25] * 4])
    # Border: the sample at -0.25 is clamped to cell 0; at 0.25 it is 3/4 cell 0, 1/4 cell 1.
    np.testing.assert_allclose(roi_align_weights(0, 1, 2, 4), [[1, 0, 0, 0], [0.75, 0.25, 0, 0]])


def test_resampling_a_linear_map_gives_the_bin_centres():
    # Logit 0.5 r + 0.25 c + 3 of one class on an 8 x 8 map over an 80 x 80 image (10 px a cell).
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    scores = (0.5 * r + 0.25 * c + 3.0)[..., None]
    box = (13, 27, 38, 30)  # rows 1.3 -> 5.1 cells, columns 2.7 -> 5.7 cells
    indices, out = crop_label_map(np.zeros((8, 8, 1), np.int32), scores, box, (80, 80), (3, 2))
    # Bilinear is exact on a linear map, and the bin's samples average to the bin centre
    # (cell-centre coordinates: box start - 0.5 + (p + 0.5) * bin length).
    rows = 0.8 + (np.arange(3) + 0.5) * 3.8 / 3
    cols = 2.2 + (np.arange(2) + 0.5) * 3.0 / 2
    expected = 0.5 * rows[:, None] + 0.25 * cols[None, :] + 3.0
    assert indices.shape == out.shape == (3, 2, 1) and (indices == 0).all()
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)
    _, flipped = crop_label_map(np.zeros((8, 8, 1), np.int32), scores, box, (80, 80), (3, 2), flip=True)
    np.testing.assert_allclose(flipped[..., 0], expected[:, ::-1], atol=1e-6)


# --- alignment with the image --------------------------------------------------------------------

@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_line_up_with_the_image_exactly(flip):
    image = cell_image(6, 6)  # 96 x 96, 6 x 6 cells
    indices, scores = cell_map(6, 6)
    transform = RandomResizedCropWithMap(size=64, topk=2)  # token grid 64 / 16 = 4: one token a cell
    box = (16, 32, 64, 64)  # cells rows 1-4, columns 2-5: top != left catches swapped axes
    out_image, cls_idx, cls_val, tok_idx, tok_val = transform.apply(image, indices, scores, box, flip)

    shown = cell_ids_of(out_image, 6)  # what the image shows at each token
    expected = np.arange(36).reshape(6, 6)[1:5, 2:6]
    np.testing.assert_array_equal(shown, expected[:, ::-1] if flip else expected)
    assert tok_idx.shape == tok_val.shape == (16, 2) and tok_idx.dtype == np.int32 and tok_val.dtype == np.float32
    np.testing.assert_array_equal(tok_idx.reshape(4, 4, 2)[..., 0], shown)             # token label = image
    np.testing.assert_array_equal(tok_idx.reshape(4, 4, 2)[..., 1], (shown + 1) % 36)
    np.testing.assert_allclose(tok_val, np.tile([10.0, 1.0], (16, 1)), atol=1e-6)

    # Class level: the mean over the 16 cells of the crop; flipping does not change it.
    _, all_val = crop_label_map(indices, scores, box, (96, 96), (1, 1), flip, topk=36)
    all_idx, _ = crop_label_map(indices, scores, box, (96, 96), (1, 1), flip, topk=36)
    by_hand = np.zeros(36)
    for cell in expected.ravel():
        by_hand[cell] += 10 / 16
        by_hand[(cell + 1) % 36] += 1 / 16
    np.testing.assert_allclose(by_hand[all_idx.ravel()], all_val.ravel(), atol=1e-6)
    np.testing.assert_array_equal(cls_idx, all_idx.ravel()[:2])
    np.testing.assert_allclose(cls_val, all_val.ravel()[:2], atol=1e-6)


def test_non_square_crop_lines_up_with_the_image():
    image = cell_image(6, 6)
    indices, scores = cell_map(6, 6)
    box = (32, 16, 48, 64)  # 3 x 4 cells from row 2, column 1
    crop = image[32:80, 16:80]
    tok_idx, _ = crop_label_map(indices, scores, box, (96, 96), (3, 4))
    np.testing.assert_array_equal(tok_idx[..., 0], cell_ids_of(crop, 6))
    tok_idx, _ = crop_label_map(indices, scores, box, (96, 96), (3, 4), flip=True)
    np.testing.assert_array_equal(tok_idx[..., 0], cell_ids_of(crop[:, ::-1], 6))


def test_downscaled_crop_averages_whole_blocks():
    # 2 x 2 blocks of cells share a class; a 4 x 4-cell crop onto 2 x 2 tokens: one block a token.
    r, c = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    indices = np.stack([(r // 2) * 3 + c // 2, np.full((6, 6), 9)], -1).astype(np.int32)
    scores = np.broadcast_to(np.float32([10.0, 1.0]), (6, 6, 2))
    tok_idx, tok_val = crop_label_map(indices, scores, (32, 0, 64, 64), (96, 96), (2, 2))
    np.testing.assert_array_equal(tok_idx[..., 0], [[3, 4], [6, 7]])
    np.testing.assert_array_equal(tok_idx[..., 1], 9)
    np.testing.assert_allclose(tok_val, np.broadcast_to([10.0, 1.0], (2, 2, 2)), atol=1e-6)


def test_few_classes_are_padded_with_zero_logits():
    indices = np.zeros((2, 2, 1), np.int32) + 4
    tok_idx, tok_val = crop_label_map(indices, np.full((2, 2, 1), 2.0, np.float32), (0, 0, 8, 8), (8, 8), (1, 1),
                                      topk=3)
    np.testing.assert_array_equal(tok_idx.ravel(), [4, 4, 4])
    np.testing.assert_allclose(tok_val.ravel(), [2.0, 0.0, 0.0])


# --- random-resized-crop sampling ---------------------------------------------------------------

def test_resized_crop_params_fallback_and_bounds():
    # scale 1 and ratio 1 on a 96 x 64 image: a 78 x 78 crop never fits, so after 10 tries the
    # fallback: the image is wider than ratio 1 allows, so height 64, width round(64 * 1), centred.
    assert resized_crop_params(96, 64, np.random.default_rng(0), (1.0, 1.0), (1.0, 1.0)) == (0, 16, 64, 64)
    rng = np.random.default_rng(1)
    for _ in range(200):
        top, left, h, w = resized_crop_params(100, 80, rng)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 100 and h > 0 and w > 0


def test_transform_call_is_reproducible_with_its_rng():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    indices = rng.integers(0, 10, (4, 4, 3)).astype(np.int32)
    scores = rng.normal(size=(4, 4, 3)).astype(np.float32)
    outs = [RandomResizedCropWithMap(32, rng=np.random.default_rng(9))(image, indices, scores) for _ in range(2)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    shapes = [(32, 32, 3), (3,), (3,), (4, 3), (4, 3)]
    assert [o.shape for o in outs[0]] == shapes and outs[0][0].dtype == np.uint8


# --- files ---------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    indices, scores = cell_map(3, 4)
    scores = scores * np.float32(1.3)  # 13.0 and 1.3: 1.3 is not exact in float16
    path = label_map_path(str(tmp_path), "cls/img.v1.png")
    assert path == os.path.join(str(tmp_path), "cls", "img.v1.npz")
    write_label_map(path, indices, scores, num_classes=12)
    assert os.listdir(tmp_path / "cls") == ["img.v1.npz"]  # no temporary file left
    with np.load(path) as raw:
        assert raw["indices"].dtype == np.int16 and raw["scores"].dtype == np.float16 and raw["num_classes"] == 12
    got_idx, got_val = read_label_map(path)
    np.testing.assert_array_equal(got_idx, indices)
    np.testing.assert_allclose(got_val, scores, rtol=1e-3)
    assert got_idx.dtype == np.int32 and got_val.dtype == np.float32
    assert find_label_map(str(tmp_path), "cls/img.v1.png") == path


def test_reads_official_tokenlabeling_file(tmp_path):
    # generate_label.py: torch.save(stack([values.half(), indices.half()]).permute(0, 3, 1, 2)), (2, k, H, W).
    rng = np.random.default_rng(2)
    values = rng.normal(size=(2, 3, 3)).astype(np.float16)       # (k, H, W)
    classes = rng.integers(0, 1000, (2, 3, 3)).astype(np.float16)
    raw = np.stack([values, classes]).astype("<f2").tobytes()
    (tmp_path / "cls").mkdir()
    write_checkpoint(tmp_path / "cls" / "img.pt", p_tensor("HalfStorage", "0", 36, 0, (2, 2, 3, 3), (18, 9, 3, 1)),
                     {"0": raw})
    path = find_label_map(str(tmp_path), "cls/img.v1.JPEG")  # the official name stops at the first dot
    indices, scores = read_label_map(path)
    np.testing.assert_array_equal(indices, classes.astype(np.int32).transpose(1, 2, 0))
    np.testing.assert_array_equal(scores, values.astype(np.float32).transpose(1, 2, 0))


def test_missing_or_bad_maps_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no label map for cls/x.png .*mindcv_volo.relabel"):
        find_label_map(str(tmp_path), "cls/x.png")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable label map"):
        read_label_map(bad)


def test_image_folder_with_maps(tmp_path):
    for name, label in (("a", 0), ("b", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 30, 3), 40 * label, np.uint8)).save(tmp_path / "train" / name / "x.png")
        write_label_map(label_map_path(str(tmp_path / "maps"), f"{name}/x.png"), np.full((2, 2, 1), 3 + label),
                        np.ones((2, 2, 1)), num_classes=5)
    source = ImageFolderWithMaps(str(tmp_path / "train"), str(tmp_path / "maps"), num_classes=5)
    image, label, indices, scores = source[1]
    assert len(source) == 2 and image.shape == (20, 30, 3) and image[0, 0, 0] == 40 and label == 1
    assert indices.shape == scores.shape == (2, 2, 1) and (indices == 4).all()
    with pytest.raises(UserError, match="num_classes is 4"):
        ImageFolderWithMaps(str(tmp_path / "train"), str(tmp_path / "maps"), num_classes=4)[1]
