"""Tests of mindcv_volo.weights.pos_embed.resize_pos_embed against torch's bicubic interpolation."""
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mindcv_volo.weights.pos_embed import bicubic_matrix, resize_pos_embed

FIXTURES = Path(__file__).parent / "fixtures"


def test_matches_torch_bicubic_4_to_6():
    pos_embed = load_file(FIXTURES / "tiny_d1like_64.safetensors")["pos_embed"]       # (1, 4, 4, 64)
    expected = np.load(FIXTURES / "tiny_d1like_64_at_96.io.npz")["pos_embed"]          # torch, (1, 6, 6, 64)
    resized = resize_pos_embed(pos_embed, (6, 6))
    assert resized.shape == expected.shape == (1, 6, 6, 64) and resized.dtype == np.float32
    assert np.abs(resized - expected).max() <= 1e-5                                  # ~1e-7 in practice


def test_same_size_is_an_unchanged_copy():
    pos_embed = np.random.default_rng(0).standard_normal((1, 3, 5, 8)).astype(np.float32)
    same = resize_pos_embed(pos_embed, (3, 5))
    assert same is not pos_embed and same.dtype == pos_embed.dtype
    np.testing.assert_array_equal(same, pos_embed)


def test_constant_stays_constant():
    # The 4 cubic weights sum to one (border taps clamped, weights added), so constants are kept,
    # also along one axis while the other axis varies.
    for n_in, n_out in [(2, 4), (4, 6), (7, 3), (1, 5)]:
        np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)
    ramp = np.broadcast_to(np.arange(5.0)[None, :, None, None], (1, 5, 4, 2))        # varies along H only
    resized = resize_pos_embed(ramp, (8, 7))
    np.testing.assert_allclose(resized, resized[:, :, :1, :].repeat(7, axis=2), atol=1e-12)
    np.testing.assert_allclose(resize_pos_embed(np.full((1, 3, 3, 4), 2.5), (5, 6)), 2.5, atol=1e-12)


def test_hand_computed_2x2_to_4x4():
    # x[h, w] = 2 h + w = [[0, 1], [2, 3]], one channel, upsampled to 4x4.
    # Output 0 of an axis: source = (0 + 0.5) * 2/4 - 0.5 = -0.25 (not clamped), floor -1, t = 0.75.
    # Cubic kernel, a = -0.75:  near(x) = (1.25 x - 2.25) x^2 + 1,  far(x) = ((-0.75 x + 3.75) x - 6) x + 3
    #   taps -2, -1, 0, 1 -> clamped to 0, 0, 0, 1 with weights
    #   far(1.75) = -0.03515625, near(0.75) = 0.26171875, near(0.25) = 0.87890625, far(1.25) = -0.10546875
    #   so pixel 0 gets 1.10546875 and pixel 1 gets -0.10546875.
    # Output 1: source = 1.5 * 0.5 - 0.5 = 0.25, floor 0, t = 0.25: taps -1, 0, 1, 2 -> 0, 0, 1, 1,
    #   weights -0.10546875, 0.87890625, 0.26171875, -0.03515625: pixel 0 gets 0.7734375, pixel 1 0.2265625.
    # The input is linear, so out[i, j] = 2 * (row weight of pixel 1) + (column weight of pixel 1):
    #   out[0, 0] = 2 * -0.10546875 + -0.10546875 = -0.31640625   (overshoot below the minimum 0)
    #   out[0, 1] = 2 * -0.10546875 +  0.2265625  =  0.015625     (transposing H and W would give 0.34765625)
    np.testing.assert_allclose(bicubic_matrix(2, 4)[:2], [[1.10546875, -0.10546875], [0.7734375, 0.2265625]])
    x = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32).reshape(1, 2, 2, 1)
    out = resize_pos_embed(x, (4, 4))[0, :, :, 0]
    assert out[0, 0] == -0.31640625 and out[0, 1] == 0.015625                          # exact in binary
    # x + x flipped in both axes is 3 everywhere; the resize is symmetric, so the same holds for out.
    np.testing.assert_allclose(out + out[::-1, ::-1], 3.0, atol=1e-6)
