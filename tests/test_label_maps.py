"""Label maps: the sampling by hand (RoIAlign for a crop), the map following every geometric operation of its
image exactly, the file format."""
import os

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from mindcv_volo.engine.augment import GEOMETRIC_OPS, RAND_AUGMENT_OPS, Geometry, TrainAugmentation, resized_crop_box
from mindcv_volo.engine.config import parse_config
from mindcv_volo.engine.data import SplitInfo
from mindcv_volo.errors import UserError
from mindcv_volo.token_labeling.label_maps import (find_label_map, follow_image, label_map_columns, label_map_path,
                                                   missing_label_maps, read_label_map, sampling_weights,
                                                   write_label_map)
from mindcv_volo.token_labeling.training import TrainSamplesWithMaps
from conftest import p_tensor, write_checkpoint

CELL = 16  # pixels per map cell in the synthetic images


def augmentation(size, *argv):
    return TrainAugmentation(parse_config(["--image_resize", str(size), "--interpolation", "bilinear", *argv])
                             .augmentation, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def cell_image(rows, cols):
    """Image whose map cell (r, c) is one colour: red 40 r + 10, green 40 c + 10."""
    r, c = np.meshgrid(np.arange(rows * CELL) // CELL, np.arange(cols * CELL) // CELL, indexing="ij")
    return Image.fromarray(np.stack([40 * r + 10, 40 * c + 10, np.zeros_like(r)], -1).astype(np.uint8))


def cell_ids_of(image, cols):
    """The cell id 6 r + c that each 16 x 16 block of an image shows (blocks must be uniform)."""
    image = np.asarray(image)
    blocks = image.reshape(image.shape[0] // CELL, CELL, image.shape[1] // CELL, CELL, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "a token block mixes cells"
    red, green = blocks[:, 0, :, 0, 0].astype(int), blocks[:, 0, :, 0, 1].astype(int)
    return (red - 10) // 40 * cols + (green - 10) // 40


def cell_map(rows, cols):
    """Map whose cell (r, c) says: class 6 r + c (logit 10), then the next id (logit 1)."""
    ids = np.arange(rows * cols).reshape(rows, cols)
    return (np.stack([ids, (ids + 1) % (rows * cols)], -1).astype(np.int32),
            np.broadcast_to(np.float32([10.0, 1.0]), (rows, cols, 2)).copy())


def crop(box, source=(64, 64), size=32, hflip=False, vflip=False):
    return Geometry(source, box, size, hflip, vflip)


# --- sampling by hand: a crop is RoIAlign -----------------------------------------------------------

# RoIAlign along one axis of a 4-cell map (cell i spans [i, i + 1)), by hand:
CELLS_1_3_ONTO_2 = [[0, 1, 0, 0], [0, 0, 1, 0]]  # 1 sample per bin, at the centres of cells 1 and 2
CELLS_1_3_ONTO_4 = [[0.25, 0.75, 0, 0], [0, 0.75, 0.25, 0], [0, 0.25, 0.75, 0], [0, 0, 0.75, 0.25]]  # 0.75, 1.25, ...
CELLS_0_4_ONTO_1 = [[0.25] * 4]  # ceil(4 / 1) = 4 samples, at every cell centre: the mean
CELLS_0_1_ONTO_2 = [[1, 0, 0, 0], [0.75, 0.25, 0, 0]]  # -0.25 clamps to cell 0; 0.25 is 3/4 cell 0, 1/4 cell 1


@pytest.mark.parametrize("box, out, rows, cols", [
    ((16, 16, 32, 32), (2, 2), CELLS_1_3_ONTO_2, CELLS_1_3_ONTO_2),
    ((16, 16, 32, 32), (4, 4), CELLS_1_3_ONTO_4, CELLS_1_3_ONTO_4),
    ((0, 0, 64, 64), (1, 1), CELLS_0_4_ONTO_1, CELLS_0_4_ONTO_1),
    ((0, 0, 16, 16), (2, 2), CELLS_0_1_ONTO_2, CELLS_0_1_ONTO_2),
    ((16, 0, 32, 64), (2, 1), CELLS_1_3_ONTO_2, CELLS_0_4_ONTO_1),  # rows and columns each their own
])
def test_a_crop_samples_as_roi_align_by_hand(box, out, rows, cols):
    # 64 px source, 4 x 4 map: 16 px a cell. A crop is separable: the row weights times the column weights.
    np.testing.assert_allclose(sampling_weights(crop(box), (4, 4), out), np.kron(rows, cols), atol=1e-12)


def test_resampling_a_linear_map_gives_the_bin_centres():
    # Logit 0.5 r + 0.25 c + 3 of one class on an 8 x 8 map over an 80 x 80 image (10 px a cell).
    r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    scores = (0.5 * r + 0.25 * c + 3.0)[..., None]
    box = (13, 27, 38, 30)  # rows 1.3 -> 5.1 cells, columns 2.7 -> 5.7 cells
    indices, out = follow_image(np.zeros((8, 8, 1), np.int32), scores, crop(box, (80, 80)), (3, 2))
    # Bilinear is exact on a linear map, and the bin's samples average to the bin centre
    # (cell-centre coordinates: box start - 0.5 + (p + 0.5) * bin length).
    rows = 0.8 + (np.arange(3) + 0.5) * 3.8 / 3
    cols = 2.2 + (np.arange(2) + 0.5) * 3.0 / 2
    expected = 0.5 * rows[:, None] + 0.25 * cols[None, :] + 3.0
    assert indices.shape == out.shape == (3, 2, 1) and (indices == 0).all()
    np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)
    _, flipped = follow_image(np.zeros((8, 8, 1), np.int32), scores, crop(box, (80, 80), hflip=True), (3, 2))
    np.testing.assert_allclose(flipped[..., 0], expected[:, ::-1], atol=1e-6)
    _, flipped = follow_image(np.zeros((8, 8, 1), np.int32), scores, crop(box, (80, 80), vflip=True), (3, 2))
    np.testing.assert_allclose(flipped[..., 0], expected[::-1], atol=1e-6)


# --- the map follows its image ---------------------------------------------------------------------

@pytest.mark.parametrize("hflip, vflip", [(False, False), (True, False), (False, True), (True, True)])
def test_crop_and_flips_line_up_with_the_image_exactly(hflip, vflip):
    image = cell_image(6, 6)  # 96 x 96, 6 x 6 cells
    indices, scores = cell_map(6, 6)
    box = (16, 32, 64, 64)  # cells rows 1-4, columns 2-5: top != left catches swapped axes
    out_image = augmentation(64).crop_and_flip(image, box, hflip, vflip)  # token grid 64 / 16 = 4: a cell each
    geometry = Geometry((96, 96), box, 64, hflip, vflip)
    cls_idx, cls_val, tok_idx, tok_val = label_map_columns(indices, scores, geometry, 4, topk=2)

    shown = cell_ids_of(out_image, 6)  # what the image shows at each token
    expected = np.arange(36).reshape(6, 6)[1:5, 2:6]
    expected = expected[::-1] if vflip else expected
    np.testing.assert_array_equal(shown, expected[:, ::-1] if hflip else expected)
    assert tok_idx.shape == tok_val.shape == (16, 2) and tok_idx.dtype == np.int32 and tok_val.dtype == np.float32
    np.testing.assert_array_equal(tok_idx.reshape(4, 4, 2)[..., 0], shown)             # token label = image
    np.testing.assert_array_equal(tok_idx.reshape(4, 4, 2)[..., 1], (shown + 1) % 36)
    np.testing.assert_allclose(tok_val, np.tile([10.0, 1.0], (16, 1)), atol=1e-6)

    # Class level: the mean over the 16 cells of the crop; flipping does not change it.
    all_idx, all_val = follow_image(indices, scores, geometry, (1, 1), topk=36)
    by_hand = np.zeros(36)
    for cell in expected.ravel():
        by_hand[cell] += 10 / 16
        by_hand[(cell + 1) % 36] += 1 / 16
    np.testing.assert_allclose(by_hand[all_idx.ravel()], all_val.ravel(), atol=1e-6)
    np.testing.assert_array_equal(cls_idx, all_idx.ravel()[:2])
    np.testing.assert_allclose(cls_val, all_val.ravel()[:2], atol=1e-6)


def test_non_square_crop_lines_up_with_the_image():
    image = np.asarray(cell_image(6, 6))
    indices, scores = cell_map(6, 6)
    box = (32, 16, 48, 64)  # 3 x 4 cells from row 2, column 1
    part = image[32:80, 16:80]
    tok_idx, _ = follow_image(indices, scores, crop(box, (96, 96), 64), (3, 4))
    np.testing.assert_array_equal(tok_idx[..., 0], cell_ids_of(part, 6))
    tok_idx, _ = follow_image(indices, scores, crop(box, (96, 96), 64, hflip=True), (3, 4))
    np.testing.assert_array_equal(tok_idx[..., 0], cell_ids_of(part[:, ::-1], 6))


def test_downscaled_crop_averages_whole_blocks():
    # 2 x 2 blocks of cells share a class; a 4 x 4-cell crop onto 2 x 2 tokens: one block a token.
    r, c = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    indices = np.stack([(r // 2) * 3 + c // 2, np.full((6, 6), 9)], -1).astype(np.int32)
    scores = np.broadcast_to(np.float32([10.0, 1.0]), (6, 6, 2))
    tok_idx, tok_val = follow_image(indices, scores, crop((32, 0, 64, 64), (96, 96), 32), (2, 2))
    np.testing.assert_array_equal(tok_idx[..., 0], [[3, 4], [6, 7]])
    np.testing.assert_array_equal(tok_idx[..., 1], 9)
    np.testing.assert_allclose(tok_val, np.broadcast_to([10.0, 1.0], (2, 2, 2)), atol=1e-6)


def test_few_classes_are_padded_with_zero_logits():
    indices = np.zeros((2, 2, 1), np.int32) + 4
    tok_idx, tok_val = follow_image(indices, np.full((2, 2, 1), 2.0, np.float32), crop((0, 0, 8, 8), (8, 8), 8),
                                    (1, 1), topk=3)
    np.testing.assert_array_equal(tok_idx.ravel(), [4, 4, 4])
    np.testing.assert_allclose(tok_val.ravel(), [2.0, 0.0, 0.0])


# A 128 px picture: grey, with a white 48 px square (map cells rows 2-4, columns 4-6 of 8 x 8) labelled 1;
# every other cell is labelled 0. The training image is 128 px too: 8 x 8 tokens of 16 px.
GREY, WHITE, FILL = (60, 60, 60), (250, 250, 250), (0, 0, 255)
MARK = (slice(32, 80), slice(64, 112))


def marked_picture():
    pixels = np.full((128, 128, 3), GREY, np.uint8)
    pixels[MARK] = WHITE
    inside = np.zeros((8, 8), bool)
    inside[2:5, 4:7] = True
    indices = np.where(inside[..., None], [1, 0], [0, 1]).astype(np.int32)
    return Image.fromarray(pixels), indices, np.broadcast_to(np.float32([10.0, 1.0]), (8, 8, 2)).copy()


def token_labels(indices, scores, geometry):
    return follow_image(indices, scores, geometry, (8, 8))[0][..., 0]  # each token's best class


def assert_map_follows(image, labels):
    """Tokens all white in the image are labelled 1, tokens all grey 0; some of each exist."""
    blocks = np.asarray(image).astype(int).reshape(8, 16, 8, 16, 3)
    white = ((blocks[..., 0] > 200) & (blocks[..., 2] > 200)).all(axis=(1, 3))
    grey = ((abs(blocks[..., 0] - 60) < 20) & (blocks[..., 2] < 80)).all(axis=(1, 3))
    assert white.any() and grey.any()
    np.testing.assert_array_equal(labels[white], 1)
    np.testing.assert_array_equal(labels[grey], 0)


def affine(name, argument):
    return lambda image: RAND_AUGMENT_OPS[name][1](image, argument, FILL, Image.BILINEAR)


WHOLE = (0, 0, 128, 128)


@pytest.mark.parametrize("box, hflip, vflip, operations", [
    ((16, 32, 96, 80), False, False, []),  # random-resized crop (2/3 of the height, 5/8 of the width)
    (WHOLE, True, False, []),
    (WHOLE, False, True, []),
    (WHOLE, False, False, [affine("Rotate", 20.0)]),
    (WHOLE, False, False, [affine("Rotate", -20.0)]),
    (WHOLE, False, False, [affine("ShearX", 0.3)]),
    (WHOLE, False, False, [affine("ShearX", -0.3)]),
    (WHOLE, False, False, [affine("ShearY", 0.3)]),
    (WHOLE, False, False, [affine("ShearY", -0.3)]),
    (WHOLE, False, False, [affine("TranslateXRel", 0.25)]),
    (WHOLE, False, False, [affine("TranslateXRel", -0.25)]),
    (WHOLE, False, False, [affine("TranslateYRel", 0.25)]),
    (WHOLE, False, False, [affine("TranslateYRel", -0.25)]),
    ((8, 24, 112, 100), True, True, [affine("Rotate", 15.0), affine("ShearY", 0.2), affine("TranslateXRel", -0.2)]),
])
def test_label_map_follows_every_geometric_operation(box, hflip, vflip, operations):
    picture, indices, scores = marked_picture()
    image = augmentation(128).crop_and_flip(picture, box, hflip, vflip)
    affines = []
    for operation in operations:
        image, coefficients = operation(image)
        affines.append(coefficients)
    geometry = Geometry((128, 128), box, 128, hflip, vflip, tuple(affines))
    assert_map_follows(image, token_labels(indices, scores, geometry))


def test_colour_operations_leave_the_map_as_it_is():
    picture, indices, scores = marked_picture()
    plain = token_labels(indices, scores, Geometry((128, 128), WHOLE, 128))
    for name, (level, operation) in RAND_AUGMENT_OPS.items():
        argument = level(9.0, np.random.default_rng(0)) if level is not None else None
        image, coefficients = operation(picture, argument, FILL, Image.BILINEAR)
        assert (coefficients is not None) == (name in GEOMETRIC_OPS), name
        if coefficients is None:
            assert image.size == picture.size
    assert_map_follows(picture, plain)


def test_the_training_pipeline_moves_the_map_as_it_moves_the_image():
    """TrainAugmentation (crop, flips, RandAugment, any colour ops) on the marked picture, 40 samples: the
    Geometry it returns says where every pixel came from (mark pixels stay one colour, background another),
    and the map moved by it labels the mark's tokens 1."""
    picture, indices, scores = marked_picture()
    aug = augmentation(128, "--scale", "0.5,1", "--hflip", "0.5", "--vflip", "0.5",
                       "--auto_augment", "randaug-m9-mstd0.5-inc1")
    mark = np.zeros((128, 128), bool)
    mark[MARK] = True
    moved = 0
    for seed in range(40):
        array, geometry = aug(picture, np.random.default_rng(seed))
        image = np.rint(array.transpose(1, 2, 0)).astype(int)
        moved += bool(geometry.affines)
        # Where each pixel centre of the training image comes from, and whether that is well inside the mark
        # or well inside the background (3 px from any edge: resampling blends the edges).
        y, x = np.mgrid[:128, :128] + 0.5
        in_mark, in_background = np.ones((128, 128), bool), np.ones((128, 128), bool)
        for dy in (-3, 0, 3):
            for dx in (-3, 0, 3):
                sx, sy, shown = geometry.to_source(x + dx, y + dy)
                col, row = np.floor(sx).astype(int), np.floor(sy).astype(int)
                inside = shown & (row >= 0) & (row < 128) & (col >= 0) & (col < 128)
                hit = mark[row.clip(0, 127), col.clip(0, 127)]
                in_mark &= inside & hit
                in_background &= inside & ~hit
        colours = [np.unique(image[region].reshape(-1, 3), axis=0) for region in (in_mark, in_background)]
        if len(colours[0]) == 1 and len(colours[1]) == 1 and (colours[0] != colours[1]).any():
            labels = token_labels(indices, scores, geometry)
            tokens = in_mark.reshape(8, 16, 8, 16).all(axis=(1, 3))
            np.testing.assert_array_equal(labels[tokens], 1)
            np.testing.assert_array_equal(labels[in_background.reshape(8, 16, 8, 16).all(axis=(1, 3))], 0)
        else:  # only posterize to 0 bits may merge the two colours; any other outcome is a mismatch
            assert len(colours[0]) <= 1 and len(colours[1]) <= 1, (seed, geometry)
    assert moved >= 10  # RandAugment rotated, sheared or shifted a good share of them


# --- the resampling against a plain reference -----------------------------------------------------

def reference_follow_image(indices, scores, geometry, out_size, topk):
    """follow_image written plainly (np.add.at per corner and per cell, then a full sort): the same sums in the
    same order, so the results must agree to the bit."""
    grid_h, grid_w, k = indices.shape
    out_h, out_w = out_size
    source_h, source_w = geometry.source_size
    n_y = max(-(-geometry.box[2] * grid_h // (source_h * out_h)), 1)
    n_x = max(-(-geometry.box[3] * grid_w // (source_w * out_w)), 1)
    ys = (np.arange(out_h)[:, None] + (np.arange(n_y) + 0.5) / n_y) * (geometry.size / out_h)
    xs = (np.arange(out_w)[:, None] + (np.arange(n_x) + 0.5) / n_x) * (geometry.size / out_w)
    shape = (out_h, n_y, out_w, n_x)
    x, y, shown = geometry.to_source(np.broadcast_to(xs[None, None], shape),
                                     np.broadcast_to(ys[:, :, None, None], shape))
    axes = []
    for coordinate, size in ((y / source_h * grid_h - 0.5, grid_h), (x / source_w * grid_w - 0.5, grid_w)):
        inside = (coordinate >= -1.0) & (coordinate <= size)
        low = np.minimum(np.floor(np.maximum(coordinate, 0.0)).astype(np.int64), size - 1)
        high = np.minimum(low + 1, size - 1)
        frac = np.where(low == size - 1, 0.0, np.maximum(coordinate, 0.0) - low)
        axes.append(((low, 1.0 - frac), (high, frac), inside))
    token = np.broadcast_to(np.arange(out_h)[:, None, None, None] * out_w + np.arange(out_w)[:, None], shape)
    inside = (axes[0][2] & axes[1][2] & shown) / (n_y * n_x)
    weights = np.zeros((out_h * out_w, grid_h * grid_w))
    for row, row_weight in axes[0][:2]:
        for col, col_weight in axes[1][:2]:
            np.add.at(weights, (token.ravel(), (row * grid_w + col).ravel()),
                      (row_weight * col_weight * inside).ravel())
    classes, slot = np.unique(indices, return_inverse=True)
    dense = np.zeros((grid_h * grid_w, classes.size))
    np.add.at(dense, (np.repeat(np.arange(grid_h * grid_w), k), slot.reshape(-1)), scores.reshape(-1))
    with threadpool_limits(1, user_api="blas"):  # as the implementation: OpenBLAS's threads change the last bits
        product = weights @ dense
    out = np.concatenate([product, np.zeros((out_h * out_w, max(topk - classes.size, 0)))], axis=-1)
    classes = np.concatenate([classes, np.full(max(topk - classes.size, 0), classes[0])])
    order = np.argsort(-out, axis=-1, kind="stable")[:, :topk]
    return (classes[order].astype(np.int32).reshape(out_h, out_w, topk),
            np.take_along_axis(out, order, -1).astype(np.float32).reshape(out_h, out_w, topk))


def random_geometry(rng):
    """A random-resized crop of a random source, random flips, and 0-3 of RandAugment's geometric operations."""
    source_w, source_h = (int(v) for v in rng.integers(20, 700, 2))
    size = int(rng.choice([32, 64, 112, 224]))
    image = Image.new("RGB", (size, size))
    affines = []
    for name in rng.choice(GEOMETRIC_OPS, int(rng.integers(0, 4))):
        level, operation = RAND_AUGMENT_OPS[name]
        affines.append(operation(image, level(rng.uniform(0, 10), rng), FILL, Image.NEAREST)[1])
    return Geometry((source_h, source_w), resized_crop_box(source_w, source_h, rng), size, bool(rng.random() < 0.5),
                    bool(rng.random() < 0.5), tuple(affines))


def test_resampling_agrees_with_the_plain_reference_to_the_bit():
    rng = np.random.default_rng(11)
    for _ in range(300):
        geometry = random_geometry(rng)
        (grid_h, grid_w), k = (int(v) for v in rng.integers(1, 16, 2)), int(rng.integers(1, 7))
        # few classes (ties, padding), or many; logits of both signs, as float16 stores them
        indices = rng.integers(0, int(rng.choice([3, 40, 1000])), (grid_h, grid_w, k)).astype(np.int32)
        scores = rng.normal(1.0, 4.0, (grid_h, grid_w, k)).astype(np.float16).astype(np.float32)
        topk = int(rng.integers(1, 8))
        grid = int(rng.integers(1, 15))
        expected = [reference_follow_image(indices, scores, geometry, out, topk) for out in ((1, 1), (grid, grid))]
        got = label_map_columns(indices, scores, geometry, grid, topk)
        for column, want in zip(got, (part for pair in expected for part in pair)):
            assert column.dtype == want.dtype and column.tobytes() == want.tobytes(), geometry
        got_idx, got_val = follow_image(indices, scores, geometry, (grid, grid), topk)
        assert got_idx.tobytes() == expected[1][0].tobytes() and got_val.tobytes() == expected[1][1].tobytes()


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


def test_training_samples_carry_their_maps(tmp_path):
    for name, label in (("a", 0), ("b", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 30, 3), 40 * label, np.uint8)).save(tmp_path / "train" / name / "x.png")
        write_label_map(label_map_path(str(tmp_path / "maps"), f"{name}/x.png"), np.full((2, 2, 1), 3 + label),
                        np.ones((2, 2, 1)), num_classes=5)
    split = SplitInfo(str(tmp_path), "train")
    aug = augmentation(32)
    source = TrainSamplesWithMaps(split, np.array([1, 0]), aug, 7, 0, str(tmp_path / "maps"), 5, 2)
    image, label, cls_idx, cls_val, tok_idx, tok_val = source[0]  # position 0: image 1 of the order
    assert len(source) == 2 and image.shape == (3, 32, 32) and image.dtype == np.float32 and label == 1
    assert (cls_idx == 4).all() and cls_val == pytest.approx([1.0]) and tok_idx.shape == tok_val.shape == (4, 1)
    assert (tok_idx == 4).all()
    with pytest.raises(UserError, match="num_classes is 4"):
        TrainSamplesWithMaps(split, np.array([1, 0]), aug, 7, 0, str(tmp_path / "maps"), 4, 2)[0]
    # The check before a run: names only, ours (.npz) or the official (.pt, the name up to its first dot).
    (tmp_path / "train" / "b" / "y.v2.png").write_bytes(b"")
    (tmp_path / "train" / "b" / "z.png").write_bytes(b"")
    (tmp_path / "maps" / "b" / "y.pt").write_bytes(b"")
    assert missing_label_maps(str(tmp_path / "maps"), SplitInfo(str(tmp_path), "train").items) == ["b/z.png"]
