"""Resize VOLO's position embedding to another grid, exactly as the official PyTorch loader does.

The official code permutes pos_embed (1, H, W, C) to NCHW, calls
`F.interpolate(size=new_hw, mode="bicubic", align_corners=False)` and permutes back. Bicubic
interpolation is separable, so it is one (out x in) matrix per axis; we build those matrices with
PyTorch's rules and apply them with einsum, in float64.
"""
import numpy as np

# PyTorch's cubic convolution constant (Keys' kernel with a = -0.75, as in OpenCV).
_A = -0.75


def _cubic_weights(t):
    """Weights of the 4 taps at offsets -1, 0, +1, +2 for a fractional position t in [0, 1)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of torch's 1-D bicubic resize, align_corners=False."""
    dst = np.arange(out_size, dtype=np.float64)
    # Pixel centres map to pixel centres. For bicubic torch does NOT clamp a negative source
    # coordinate to 0 (unlike bilinear), so the first outputs extrapolate slightly.
    src = (dst + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)                                  # (out, 4)
    # Taps outside the input repeat the border pixel (torch's upsample_get_value_bounded).
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size))
    # add.at, not assignment: clamped taps at the border hit the same column and must add up.
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def resize_pos_embed(pos_embed: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Resize a channels-last position embedding (1, H, W, C) to (1, new_h, new_w, C).

    Matches torch bicubic interpolation (align_corners=False) to float rounding; computed in
    float64, returned in the input dtype. The same size returns an unchanged copy.
    """
    if pos_embed.ndim != 4 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, H, W, C), got {pos_embed.shape}")
    _, h, w, _ = pos_embed.shape
    new_h, new_w = (int(n) for n in new_hw)
    if (new_h, new_w) == (h, w):
        return pos_embed.copy()
    rows, cols = bicubic_matrix(h, new_h), bicubic_matrix(w, new_w)
    resized = np.einsum("yh,xw,bhwc->byxc", rows, cols, pos_embed.astype(np.float64))
    return resized.astype(pos_embed.dtype)
