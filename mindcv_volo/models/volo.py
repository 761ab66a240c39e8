"""Vision Outlooker (VOLO, Yuan et al. 2021, arXiv 2106.13112) as MindSpore cells.

The cell tree mirrors the official PyTorch module tree (`network.0` outlookers, `network.1` downsample,
`network.2..4` transformers, `post_network` class blocks), so a parameter's MindSpore name is its
official name with the LayerNorm/BatchNorm suffixes renamed (see `mindcv_volo.convert`).
Activations are channels-last (B, H, W, C) between blocks, as in the official code.
A model is built for one backend (`backend.Backend`: "portable", "cpu", "cpu_unfused", "onnx"), passed down to
every block, which builds the cells of that formulation; `model.backend` says which.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer
from mindspore.ops import constexpr

from mindcv.models.model_factory import create_model
from mindcv.models.registry import register_model

from ..errors import UserError
from ..weights.hub import HUB_URL_PREFIX, load_hub_weights
from . import cpu_kernels
from .backend import Backend, resolve_backend
from .layers import (DropPath, FusedBatchNormRelu, batch_matmul, batch_norm, batch_norm_relu_channels_last, dense,
                     dense_plus_residual, layer_norm, mlp, softmax, split_class_token, swap_axes_kernel, transpose)
from .windows import ChannelsLastFold, ChannelsLastUnfold, conv2d, output_size

PATCH_SIZE = 8  # stem + projection stride; the outlooker works on the img/8 grid
POOLING_SCALE = 2  # the downsample to the img/16 grid of the transformers
TOKEN_STRIDE = PATCH_SIZE * POOLING_SCALE
NUM_STAGES = 4  # the outlookers, then three transformer stages


class OutlookCore(nn.Cell):
    """The window step of outlook attention: softmax(scale * logits) weighs the values of each k x k window, per
    head, and the weighted windows are folded back by overlap-add; and the stride x stride average of the tokens
    the logits come from. By `ops.unfold` / `ops.fold` on NCHW maps (the "portable" backend). No parameters.

    Args:
        num_heads: attention heads.
        head_dim: channels per head.
        kernel_size, padding, stride: the windows.
        attn_drop: dropout rate on the attention maps.
        backend: the formulation of the softmax.
    """

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int, padding: int, stride: int, attn_drop: float,
                 backend: Backend):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = head_dim ** -0.5
        self.softmax = softmax(backend)
        self.attn_drop = nn.Dropout(p=attn_drop)

    def pool(self, x):
        """(B, H, W, C) -> the stride x stride averages (B, H / stride, W / stride, C) (ceil mode: H, W are even
        here)."""
        batch, height, width, dim = x.shape
        return x.reshape(batch, height // self.stride, self.stride, width // self.stride, self.stride,
                         dim).mean(axis=(2, 4))

    def construct(self, v, logits):
        """Values v (B, H, W, C), logits (B, H / stride, W / stride, heads * k^4) -> (B, H, W, C)."""
        batch, height, width, dim = v.shape
        kk = self.kernel_size * self.kernel_size
        num_windows = logits.shape[1] * logits.shape[2]
        attn = logits.reshape(batch, num_windows, self.num_heads, kk, kk)
        # Unfold keeps torch's channel order: (C, k*k) along axis 1.
        v = ops.unfold(v.transpose(0, 3, 1, 2), self.kernel_size, padding=self.padding, stride=self.stride)
        v = v.reshape(batch, self.num_heads, self.head_dim, kk, num_windows).transpose(0, 1, 4, 3, 2)
        attn = self.attn_drop(self.softmax(attn.transpose(0, 2, 1, 3, 4) * self.scale))
        out = batch_matmul(attn, v).transpose(0, 1, 4, 3, 2).reshape(batch, dim * kk, num_windows)
        out = ops.fold(out, ms.Tensor((height, width), ms.int32), self.kernel_size,
                       padding=self.padding, stride=self.stride)
        return out.transpose(0, 2, 3, 1)


class ChannelsLastOutlookCore(OutlookCore):
    """OutlookCore on channels-last maps, with the windows as index gathers (`windows.ChannelsLastUnfold`): no
    NCHW transposes, and no Im2Col / Col2Im (which MindSpore's ONNX exporter does not map). The "cpu_unfused"
    and "onnx" backends."""

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int, padding: int, stride: int, attn_drop: float,
                 backend: Backend):
        super().__init__(num_heads, head_dim, kernel_size, padding, stride, attn_drop, backend)
        self.unfold = ChannelsLastUnfold(kernel_size, padding, stride, backend)
        self.fold = ChannelsLastFold(kernel_size, padding, stride, backend)
        self.swap = swap_axes_kernel(backend)  # transposes without MindSpore's per-element index tables (CPU)

    def construct(self, v, logits):
        batch, dim = v.shape[0], v.shape[-1]
        out_h, out_w = logits.shape[1], logits.shape[2]
        kk = self.kernel_size * self.kernel_size
        num_windows = out_h * out_w
        attn = logits.reshape(batch, num_windows, self.num_heads, kk, kk)
        # (B, windows, heads, k*k, d) straight from the channels-last map; attn needs no transpose
        v = self.unfold(v).reshape(batch, num_windows, kk, self.num_heads, self.head_dim)
        attn = self.attn_drop(self.softmax(attn * self.scale))
        out = transpose(batch_matmul(attn, transpose(v, (0, 1, 3, 2, 4), self.swap)), (0, 1, 3, 2, 4), self.swap)
        return self.fold(out.reshape(batch, out_h, out_w, kk, dim))


class FusedOutlookCore(ChannelsLastOutlookCore):
    """ChannelsLastOutlookCore with the fused CPU kernels (the "cpu" backend): the 2 x 2 average, and the softmax,
    the window weighting and the overlap-add, as one kernel each way, where they take the input (`takes_kernels`)
    and no dropout falls on the attention maps; otherwise the gathers."""

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int, padding: int, stride: int, attn_drop: float,
                 backend: Backend):
        super().__init__(num_heads, head_dim, kernel_size, padding, stride, attn_drop, backend)
        self.fused_pool = cpu_kernels.AvgPool2x2Function() if stride == 2 else None
        self.fused = cpu_kernels.OutlookAttentionFunction(num_heads, self.scale, kernel_size, padding, stride)

    def takes_kernels(self, x):
        """Static: the kernels take x: float32, a stride-aligned map (the im2col kernel's own condition, which
        AMP's float16 flags turn off)."""
        return self.unfold.takes_kernels(x)

    def pool(self, x):
        if self.fused_pool is not None and self.takes_kernels(x):
            return self.fused_pool(x)
        return super().pool(x)

    def construct(self, v, logits):
        if self.takes_kernels(v) and not (self.training and self.attn_drop.p > 0):
            return self.fused(v, logits)
        return super().construct(v, logits)


def outlook_core(num_heads, head_dim, kernel_size, padding, stride, attn_drop, backend: Backend):
    """The OutlookCore cell of `backend`."""
    if backend.fused_kernels:
        core = FusedOutlookCore
    else:
        core = ChannelsLastOutlookCore if backend.window_gathers else OutlookCore
    return core(num_heads, head_dim, kernel_size, padding, stride, attn_drop, backend)


class OutlookAttention(nn.Cell):
    """Outlook attention (kernel 3, padding 1, stride 2).

    Each 2x2-pooled location predicts, from its own token, a (k*k x k*k) attention map per head that
    mixes the values of its k x k window; the weighted windows are folded back with overlap-add (`core`).

    Args:
        dim: channels of the (B, H, W, dim) map.
        num_heads: attention heads.
        kernel_size, padding, stride: the windows.
        qkv_bias: a bias in the value projection.
        attn_drop: dropout rate on the attention maps.
        backend: the formulation of the cells.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 2,
                 qkv_bias: bool = False, attn_drop: float = 0.0, *, backend: Backend):
        super().__init__()
        self.v = dense(dim, dim, has_bias=qkv_bias, backend=backend)
        self.attn = dense(dim, kernel_size ** 4 * num_heads, backend=backend)
        self.proj = dense(dim, dim, backend=backend)
        self.core = outlook_core(num_heads, dim // num_heads, kernel_size, padding, stride, attn_drop, backend)

    def construct(self, x, residual=None):
        logits = self.attn(self.core.pool(x))
        return dense_plus_residual(self.proj, self.core(self.v(x), logits), residual)


class PreNormBlock(nn.Cell):
    """x + attn(norm1(x)), then + mlp(norm2(x)), each branch under drop path; subclasses build the attention.

    `drop_masks` (rows, B) holds the step's drop-path masks of the whole model: the two branches of this
    block take rows `mask_row` and `mask_row + 1` (numbered by VOLO); None: no masks fed (`DropPath`).

    Args:
        dim: channels of the (B, H, W, dim) map.
        num_heads: attention heads.
        mlp_ratio: the MLP's hidden features per channel.
        qkv_bias: a bias in the attention's q, k, v projections.
        attn_drop: dropout rate on the attention maps.
        drop_path_rate: stochastic depth rate of both branches.
        backend: the formulation of the cells.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0, drop_path_rate: float = 0.0, *, backend: Backend):
        super().__init__()
        self.norm1 = layer_norm(dim, backend)
        self.attn = self.build_attention(dim, num_heads, qkv_bias, attn_drop, backend)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = layer_norm(dim, backend)
        self.mlp = mlp(dim, int(dim * mlp_ratio), backend)
        self.mask_row = None

    @staticmethod
    def build_attention(dim, num_heads, qkv_bias, attn_drop, backend):
        raise NotImplementedError

    def construct(self, x, drop_masks=None):
        if self.drop_path.passes_through():
            # the residual adds inside the branches' last Dense (one kernel pass with its bias, on CPU)
            x = self.attn(self.norm1(x), x)
            return self.mlp(self.norm2(x), x)
        attn_keep, mlp_keep = None, None
        if drop_masks is not None and self.mask_row is not None:
            attn_keep, mlp_keep = drop_masks[self.mask_row], drop_masks[self.mask_row + 1]
        x = x + self.drop_path(self.attn(self.norm1(x)), attn_keep)
        return x + self.drop_path(self.mlp(self.norm2(x)), mlp_keep)


class Outlooker(PreNormBlock):
    """The outlooker block of stage 1 (stride 8)."""

    @staticmethod
    def build_attention(dim, num_heads, qkv_bias, attn_drop, backend):
        return OutlookAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, backend=backend)


class Attention(nn.Cell):
    """Multi-head self-attention over the (H, W) token grid.

    Args:
        dim: channels of the (B, H, W, dim) map.
        num_heads: attention heads.
        qkv_bias: a bias in the q, k, v projection.
        attn_drop: dropout rate on the attention maps.
        backend: the formulation of the cells.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, *,
                 backend: Backend):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = dense(dim, dim * 3, has_bias=qkv_bias, backend=backend)
        self.softmax = softmax(backend)
        self.attn_drop = nn.Dropout(p=attn_drop)
        self.proj = dense(dim, dim, backend=backend)
        self.swap = swap_axes_kernel(backend)  # transposes without MindSpore's per-element index tables (CPU)

    def construct(self, x, residual=None):
        batch, height, width, dim = x.shape
        q, k_t, v = self.heads(self.qkv(x).reshape(batch, height * width, 3, self.num_heads, self.head_dim))
        attn = self.attn_drop(self.softmax(batch_matmul(q, k_t)))
        out = transpose(batch_matmul(attn, v), (0, 2, 1, 3), self.swap).reshape(batch, height, width, dim)
        return dense_plus_residual(self.proj, out, residual)

    def heads(self, qkv):
        """The projection (B, N, 3, heads, d) -> q * scale (B, heads, N, d), k^T (B, heads, d, N), v (B, heads, N, d).

        The scale on q (N x d values), not on q @ k^T (N x N): the same to float rounding. Split q, k, v on a
        middle axis, then lay each out for its matmul: indexing a transposed (3, B, heads, N, d) tensor is a
        StridedSlice, MindSpore's slowest copy on CPU.
        """
        batch, num_tokens = qkv.shape[0], qkv.shape[1]
        q, k, v = ops.split(qkv.reshape(batch, num_tokens, 3, -1), 1, axis=2)
        heads = (batch, num_tokens, self.num_heads, self.head_dim)
        q = transpose((q * self.scale).reshape(heads), (0, 2, 1, 3), self.swap)
        k_t = transpose(k.reshape(heads), (0, 2, 3, 1), self.swap)
        v = transpose(v.reshape(heads), (0, 2, 1, 3), self.swap)
        return q, k_t, v


class FusedAttention(Attention):
    """Attention with q, k, v laid out from a float32 projection in one kernel pass (the "cpu" backend)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, *,
                 backend: Backend):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, backend=backend)
        self.qkv_heads = cpu_kernels.QkvHeadsFunction(self.scale)  # no parameters

    def heads(self, qkv):
        if qkv.dtype == ms.float32:
            return self.qkv_heads(qkv)
        return super().heads(qkv)


class Transformer(PreNormBlock):
    """The self-attention block of stages 2-4 (stride 16)."""

    @staticmethod
    def build_attention(dim, num_heads, qkv_bias, attn_drop, backend):
        attention = FusedAttention if backend.fused_kernels else Attention
        return attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, backend=backend)


class ClassAttention(nn.Cell):
    """Class attention (CaiT): the class token attends to all tokens; returns the new class token.

    Args:
        dim: channels of the (B, 1 + N, dim) tokens.
        num_heads: attention heads.
        qkv_bias: a bias in the q and k, v projections.
        attn_drop: dropout rate on the attention maps.
        backend: the formulation of the cells.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, *,
                 backend: Backend):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kv = dense(dim, dim * 2, has_bias=qkv_bias, backend=backend)
        self.q = dense(dim, dim, has_bias=qkv_bias, backend=backend)
        self.softmax = softmax(backend)
        self.attn_drop = nn.Dropout(p=attn_drop)
        self.proj = dense(dim, dim, backend=backend)
        self.swap = swap_axes_kernel(backend)  # transposes without MindSpore's per-element index tables (CPU)

    def construct(self, x, residual=None):
        batch, num_tokens, dim = x.shape
        k, v = ops.split(self.kv(x).reshape(batch, num_tokens, 2, dim), 1, axis=2)
        heads = (batch, num_tokens, self.num_heads, self.head_dim)
        k_t = transpose(k.reshape(heads), (0, 2, 3, 1), self.swap)
        v = transpose(v.reshape(heads), (0, 2, 1, 3), self.swap)
        q = self.q(split_class_token(x)[0]).reshape(batch, self.num_heads, 1, self.head_dim)
        attn = self.attn_drop(self.softmax(batch_matmul(q * self.scale, k_t)))
        cls_embed = transpose(batch_matmul(attn, v), (0, 2, 1, 3), self.swap).reshape(batch, 1, dim)
        return dense_plus_residual(self.proj, cls_embed, residual)


class ClassBlock(nn.Cell):
    """Class-attention block: updates only the class token (index 0) and passes the others through.

    Args:
        dim: channels of the (B, 1 + N, dim) tokens.
        num_heads: attention heads.
        mlp_ratio: the MLP's hidden features per channel.
        qkv_bias: a bias in the attention's projections.
        attn_drop: dropout rate on the attention maps.
        backend: the formulation of the cells.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0, *, backend: Backend):
        super().__init__()
        self.norm1 = layer_norm(dim, backend)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, backend=backend)
        self.norm2 = layer_norm(dim, backend)
        self.mlp = mlp(dim, int(dim * mlp_ratio), backend)

    def construct(self, x):
        cls_embed, tokens = split_class_token(x)
        cls_embed = self.attn(self.norm1(x), cls_embed)
        cls_embed = self.mlp(self.norm2(cls_embed), cls_embed)
        return ops.cat((cls_embed, tokens), axis=1)


class PatchEmbed(nn.Cell):
    """The stem: conv7x7/2 + two conv3x3 (each with BatchNorm and ReLU), then a 4x4/4 projection.

    Args:
        in_channels: image channels.
        hidden_dim: channels of the three convolutions.
        embed_dim: channels of the stride-8 tokens.
        backend: the formulation of the convolutions.
    """

    def __init__(self, in_channels: int, hidden_dim: int, embed_dim: int, backend: Backend):
        super().__init__()
        self.conv = nn.SequentialCell(
            conv2d(in_channels, hidden_dim, 7, stride=2, padding=3, has_bias=False, backend=backend),
            batch_norm(hidden_dim), nn.ReLU(),
            conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, has_bias=False, backend=backend),
            batch_norm(hidden_dim), nn.ReLU(),
            conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, has_bias=False, backend=backend),
            batch_norm(hidden_dim), nn.ReLU(),
        )
        self.proj = conv2d(hidden_dim, embed_dim, PATCH_SIZE // 2, stride=PATCH_SIZE // 2, backend=backend)

    def construct(self, x):
        return self.proj(self.conv(x))

    def channels_last(self, x):
        """Image (B, C, H, W) -> (B, H/8, W/8, embed_dim), the same numbers as `construct` transposed."""
        return self.construct(x).transpose(0, 2, 3, 1)


STEM_CHUNK_BYTES = 64 * 2 ** 20  # the 3x3 convolutions' float32 patches one inference chunk of the stem may hold


@constexpr
def _stem_images_per_chunk(image_shape, hidden_dim):
    """How many images of an (B, C, H, W) batch give at most STEM_CHUNK_BYTES of patches to the stem's 3x3
    convolutions (on the 7x7/2 convolution's output; at least one image)."""
    height, width = (output_size(n, 7, 3, 2) for n in image_shape[2:])
    return max(1, STEM_CHUNK_BYTES // (height * width * 9 * hidden_dim * 4))


class ChannelsLastPatchEmbed(PatchEmbed):
    """The stem of the CPU backends, whose `channels_last` transposes the image once (3 channels) and runs every
    convolution channels-last (`MatmulConv2d.channels_last`), with no transpose between them; with the fused CPU
    kernels BatchNorm + ReLU are one kernel each way."""

    def __init__(self, in_channels: int, hidden_dim: int, embed_dim: int, backend: Backend):
        super().__init__(in_channels, hidden_dim, embed_dim, backend)
        self.bn_relu = FusedBatchNormRelu() if backend.fused_kernels else None  # no parameters
        self.swap = swap_axes_kernel(backend)
        self.chunks_batch = backend.fused_kernels  # not in the ONNX export, whose graph stays the plain one

    def channels_last(self, x):
        """With the fused kernels, in inference, the batch goes through the stem in chunks of images, one after
        the other (each waits for the previous one's tokens), so one chunk's maps and patches live at a time: the
        3x3 convolutions' patches are 27.6 MB per image at 224 px, 231 MB for a batch of 8 at once. Not in
        training, where BatchNorm takes the statistics of the whole batch."""
        images = _stem_images_per_chunk(x.shape, self.conv[0].out_channels)
        if self.training or not self.chunks_batch or images >= x.shape[0]:
            return self.images_to_tokens(x)
        tokens = []
        for part in ops.split(x, images, 0):
            if tokens:
                part = ops.depend(part, tokens[-1])
            tokens.append(self.images_to_tokens(part))
        return ops.concat(tokens, 0)

    def images_to_tokens(self, x):
        """Images (B, C, H, W) -> tokens (B, H/8, W/8, embed_dim)."""
        conv = self.conv
        x = transpose(x, (0, 2, 3, 1), self.swap)
        x = batch_norm_relu_channels_last(conv[1], conv[0].channels_last(x), self.bn_relu)
        x = batch_norm_relu_channels_last(conv[4], conv[3].channels_last(x), self.bn_relu)
        x = batch_norm_relu_channels_last(conv[7], conv[6].channels_last(x), self.bn_relu)
        return self.proj.channels_last(x)


def patch_embed(in_channels, hidden_dim, embed_dim, backend: Backend):
    """The stem cell of `backend`."""
    stem = ChannelsLastPatchEmbed if backend.matmul_convs else PatchEmbed
    return stem(in_channels, hidden_dim, embed_dim, backend)


class Downsample(nn.Cell):
    """2x2/2 convolution between the outlooker and transformer stages, channels-last in and out.

    Args:
        in_dim, out_dim: channels in and out.
        backend: the formulation of the convolution.
    """

    def __init__(self, in_dim: int, out_dim: int, backend: Backend):
        super().__init__()
        self.proj = conv2d(in_dim, out_dim, POOLING_SCALE, stride=POOLING_SCALE, backend=backend)

    def construct(self, x):
        return self.proj.channels_last(x)


def block_drop_path_rates(layers, drop_path_rate):
    """Official schedule: 0 in the outlooker stage; rate * i / (blocks - 1) for global block index i."""
    total = sum(layers)
    rates = [[0.0] * layers[0]]
    for stage in range(1, len(layers)):
        first = sum(layers[:stage])
        rates.append([drop_path_rate * (first + i) / (total - 1) for i in range(layers[stage])])
    return rates


def take_indices(count, indices):
    """timm's `feature_take_indices`: which of `count` features to take, and the largest of them.

    None takes all; an int n the last n; a sequence those indices, negative ones counted from the end.
    """
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {count})")
        taken = [count - indices + i for i in range(indices)]
    else:
        taken = [count + i if i < 0 else i for i in indices]
        for index in taken:
            if not 0 <= index < count:
                raise ValueError(f"feature index {index} is out of range (0 to {count - 1})")
    return taken, max(taken)


def input_size_error(shape, img_size):
    """Why a picture batch of `shape` (B, C, H, W) cannot enter a model of `img_size`, or ""."""
    if shape[-2:] == (img_size, img_size):
        return ""
    return (f"VOLO input is {shape[-2]}x{shape[-1]} pixels, the model's img_size is {img_size}: resize the "
            f"pictures to {img_size}x{img_size}, or build the model with another img_size")


def flatten_grid(x):
    """Channels-last (B, H, W, C) -> tokens (B, H * W, C)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class VOLO(nn.Cell):
    """VOLO: outlooker stage (img/8), downsample, three transformer stages (img/16), two class blocks.

    `construct` gives the official eval output: head(class token) + 0.5 * max over tokens of
    aux_head(tokens). `forward_train` gives the token-labeling outputs (class logits, per-token logits).
    With `features_only=True`, `construct` returns the feature maps of the stages in `out_indices`
    (NCHW: stage 0 at stride 8, stages 1-3 at stride 16; see `forward_intermediates`), in that order, and
    `feature_info` and `out_channels` describe those maps.
    Pictures must be img_size x img_size (the position embedding's grid); another size is a one-line error.

    Args:
        layers: blocks per stage (four).
        embed_dims: channels per stage (four; stages 1-3 share one).
        num_heads: attention heads per stage (four).
        mlp_ratio: the MLPs' hidden features per channel.
        stem_hidden_dim: channels of the stem's convolutions.
        img_size: the square input size, a multiple of 16 (it sizes the position embedding).
        in_channels: image channels.
        num_classes: classes of `head` and `aux_head`; 0 gives the class token instead of logits.
        qkv_bias: a bias in the attention projections.
        drop_rate: dropout after the position embedding.
        attn_drop_rate: dropout on the attention maps.
        drop_path_rate: stochastic depth, rising linearly over the transformer blocks (official schedule).
        features_only: `construct` returns the stage maps of `out_indices` instead of logits.
        out_indices: the stages `features_only` returns.
        backend: the formulation computed, "portable", "cpu", "cpu_unfused" or "onnx" (`backend.Backend`; the
            same numbers to float rounding). None: $MINDCV_VOLO_BACKEND if set, else the device's ("cpu" on CPU,
            "portable" on Ascend and GPU). "cpu" becomes "cpu_unfused" when the fused kernels cannot be built.
            The model keeps what it computes as `backend`.
    """

    def __init__(self, layers, embed_dims, num_heads, mlp_ratio=3.0, stem_hidden_dim=64, img_size=224,
                 in_channels=3, num_classes=1000, qkv_bias=False, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, features_only=False, out_indices=(0, 1, 2, 3), backend=None):
        super().__init__()
        if img_size % TOKEN_STRIDE:
            raise ValueError(f"VOLO img_size must be divisible by {TOKEN_STRIDE}, got {img_size}")
        self.backend = resolve_backend(backend)
        self.num_classes = num_classes
        self.img_size = img_size
        self.num_features = embed_dims[-1]
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        self.features_only = features_only
        self.out_indices = tuple(out_indices)
        self.feature_info = [dict(chs=embed_dims[0], reduction=PATCH_SIZE, name="network.0")] + [
            dict(chs=embed_dims[i], reduction=TOKEN_STRIDE, name=f"network.{i + 1}") for i in range(1, 4)]
        if features_only:
            # As MindCV's feature models (and timm's): feature_info and out_channels describe the maps given.
            self.feature_info = [self.feature_info[i] for i in take_indices(NUM_STAGES, self.out_indices)[0]]
            self.out_channels = [info["chs"] for info in self.feature_info]

        self.patch_embed = patch_embed(in_channels, stem_hidden_dim, embed_dims[0], self.backend)
        grid = img_size // TOKEN_STRIDE
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, grid, grid, embed_dims[-1])),
                                   name="pos_embed")
        self.pos_drop = nn.Dropout(p=drop_rate)

        rates = block_drop_path_rates(layers, drop_path_rate)
        block_args = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, backend=self.backend)
        network = [nn.SequentialCell([Outlooker(embed_dims[0], num_heads[0], drop_path_rate=rate, **block_args)
                                      for rate in rates[0]]),
                   Downsample(embed_dims[0], embed_dims[1], self.backend)]
        for stage in range(1, 4):
            network.append(nn.SequentialCell([
                Transformer(embed_dims[stage], num_heads[stage], drop_path_rate=rate, **block_args)
                for rate in rates[stage]]))
        self.network = nn.CellList(network)

        # Each block under drop path takes two rows of the step's masks (its two branches), in block order.
        keep_probs = []
        for stage in map(self.stage, range(NUM_STAGES)):
            for block in stage:
                if block.drop_path.keep_prob < 1.0:
                    block.mask_row = len(keep_probs)
                    keep_probs += [block.drop_path.keep_prob] * 2
        self.keep_probs = tuple(keep_probs)

        self.cls_token = Parameter(initializer(TruncatedNormal(0.02), (1, 1, embed_dims[-1])), name="cls_token")
        self.post_network = nn.CellList([ClassBlock(embed_dims[-1], num_heads[-1], **block_args)
                                         for _ in range(2)])
        self.norm = layer_norm(embed_dims[-1], self.backend)
        self.head, self.aux_head = self._class_heads(num_classes)

    def _class_heads(self, num_classes):
        """(head, aux_head) for `num_classes`, initialised as the official model; identities for 0 classes."""
        if num_classes > 0:
            return (dense(self.num_features, num_classes, backend=self.backend),
                    dense(self.num_features, num_classes, backend=self.backend))
        return nn.Identity(), nn.Identity()

    def no_weight_decay(self):
        """Parameter names the official recipe trains without weight decay."""
        return {"pos_embed", "cls_token"}

    def get_classifier(self):
        """The class-token classifier (timm's API; `aux_head` is the per-token one)."""
        return self.head

    def reset_classifier(self, num_classes):
        """New `head` and `aux_head` for `num_classes` (0: identities, the model then gives features), as timm.

        The new heads are initialised as the constructor does (truncated normal 0.02 weights, zero biases) and
        their parameters carry the names the model's others do (`head.weight`, ..., behind whatever prefix a
        parent cell has given them), so checkpoints save and load as for a model built with `num_classes`.
        In GRAPH_MODE call it before the first call that compiles the model (or a cell holding it): a graph
        already compiled keeps the heads it was compiled with.
        """
        self.num_classes = num_classes
        self.head, self.aux_head = self._class_heads(num_classes)
        # A parent cell prefixes parameter names once, when the model is set on it; cells set later only get
        # their own attribute name. cls_token's name shows the prefix the model's parameters carry.
        prefix = self.cls_token.name[:-len("cls_token")]
        for name in ("head", "aux_head"):
            getattr(self, name).update_parameters_name(f"{prefix}{name}.")

    def blocks(self):
        """Every block: the outlookers, the transformers, then the class-attention blocks."""
        return [block for index in range(NUM_STAGES) for block in self.stage(index)] + list(self.post_network)

    def set_grad_checkpointing(self, enable=True):
        """Gradient checkpointing, as timm's: every block's activations are recomputed in the backward pass
        instead of kept from the forward pass (MindSpore's `Cell.recompute()` on each block of `blocks()`).

        GRAPH_MODE: the gradients are those without it (measured bit for bit on CPU, fused kernels on or off,
        drop path included: a recomputed random op redraws the same values). What it saves and costs for
        volo_d1_224: `benchmarks/recompute.py` and the README.
        PYNATIVE_MODE: MindSpore re-runs each block in the backward pass; DropPath draws new masks there
        (`ops.rand` takes new seeds on every PyNative call), which would make the gradients wrong, so with
        drop_path_rate > 0 it is refused in PyNative mode (switching to PyNative after enabling is not caught).
        Call it before the first call that compiles the model in GRAPH_MODE: a graph already compiled stays
        as it was (measured: recompute set after the first compile changed nothing).
        `enable=False` after enabling raises: MindSpore 2.10 has no inverse of `Cell.recompute()` (a cell can
        be configured once); build the model anew instead.
        """
        if not enable:
            if self.grad_checkpointing:
                raise RuntimeError("gradient checkpointing cannot be turned off: MindSpore has no inverse of "
                                   "Cell.recompute(); build the model anew (and load its weights) instead")
            return
        if self.grad_checkpointing:
            return
        if self.drop_path_rate > 0 and ms.get_context("mode") == ms.PYNATIVE_MODE:
            raise RuntimeError("gradient checkpointing in PYNATIVE_MODE would redraw the drop-path masks in the "
                               "backward pass (wrong gradients): use GRAPH_MODE, or drop_path_rate=0")
        for block in self.blocks():
            block.recompute()
        self.grad_checkpointing = True

    def drop_path_keep_probs(self):
        """The keep probability of each row of the drop-path masks a training step takes (`drop_masks`
        (rows, B) of construct and forward_train); () without drop path."""
        return self.keep_probs

    @staticmethod
    def run_stage(stage, x, drop_masks):
        for block in stage:
            x = block(x, drop_masks)
        return x

    def embed(self, x):
        """Image (B, C, H, W) -> stride-8 tokens, channels-last (B, H/8, W/8, C0)."""
        # Inside another cell's graph; shapes are constants while a graph compiles, so this raises then.
        message = input_size_error(x.shape, self.img_size)
        if message:
            raise ValueError(message)
        return self.patch_embed.channels_last(x)

    def __call__(self, *args, **kwargs):
        # The position embedding fixes the picture's size: another size is refused here, in one line, before
        # any graph compiles (MindSpore would append its own stack to an error raised in the graph).
        if args and isinstance(args[0], ms.Tensor):
            message = input_size_error(args[0].shape, self.img_size)
            if message:
                raise UserError(message)
        return super().__call__(*args, **kwargs)

    def stage(self, index):
        """The cell of stage `index`: 0 the outlookers (network.0), 1-3 the transformers (network.2-4)."""
        return self.network[0 if index == 0 else index + 1]

    def run_stages(self, x, last=NUM_STAGES - 1, drop_masks=None):
        """Stride-8 tokens -> the channels-last outputs of stages 0 .. `last` (a list).

        The downsample (network.1) and the position embedding come before stage 1. The CellList is indexed,
        never sliced: in PyNative a slice is a new CellList, which renames its cells' parameters.
        """
        x = self.run_stage(self.stage(0), x, drop_masks)
        outputs = [x]
        if last > 0:
            x = self.pos_drop(self.network[1](x) + self.pos_embed)
        for index in range(1, last + 1):
            x = self.run_stage(self.stage(index), x, drop_masks)
            outputs.append(x)
        return outputs

    def forward_tokens(self, x, drop_masks=None):
        """Stride-8 tokens -> stride-16 tokens (B, N, C) after the transformer stages.

        Args:
            x: stride-8 tokens, channels-last (B, H/8, W/8, C0), as `embed` gives them.
            drop_masks: the step's drop-path masks, as construct's.
        """
        return flatten_grid(self.run_stages(x, drop_masks=drop_masks)[-1])

    def forward_cls(self, tokens):
        """Prepend the class token and run the class blocks, then the final norm: (B, 1 + N, C).

        Args:
            tokens: stride-16 tokens (B, N, C), as `forward_tokens` gives them.
        """
        cls_tokens = ops.broadcast_to(self.cls_token, (tokens.shape[0], -1, -1)).astype(tokens.dtype)
        x = ops.cat((cls_tokens, tokens), axis=1)
        for block in self.post_network:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x, drop_masks=None):
        """Image -> normed tokens (B, 1 + N, C), class token first.

        Args:
            x: images (B, in_channels, img_size, img_size).
            drop_masks: the step's drop-path masks, as construct's.
        """
        return self.forward_cls(self.forward_tokens(self.embed(x), drop_masks))

    def forward_head(self, tokens, pre_logits=False):
        """Normed tokens (B, 1 + N, C) -> logits: head(class token) + 0.5 * max over tokens of aux_head(tokens),
        the official eval output (with 0 classes, the class token).

        Args:
            tokens: normed tokens (B, 1 + N, C), as `forward_features` gives them.
            pre_logits: return what the class head sees, the normed class token (B, C), as timm's VOLO.
        """
        cls_token, patch_tokens = split_class_token(tokens)
        cls_token = cls_token.squeeze(1)
        if pre_logits:
            return cls_token
        cls_logits = self.head(cls_token)
        if self.num_classes == 0:
            return cls_logits
        return cls_logits + 0.5 * self.aux_head(patch_tokens).max(axis=1)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's intermediates API: image -> (normed tokens (B, 1 + N, C) as forward_features, [stage maps]),
        or with `intermediates_only` the list of maps alone.

        VOLO has 4 stages: 0 the outlookers (network.0, stride 8, embed_dims[0] channels), 1-3 the three
        transformer stages (network.2-4, stride 16, embed_dims[-1] channels); the downsample (network.1) and
        the position embedding belong to stage 1. The maps are the stage outputs, the ones `features_only`
        gives. In GRAPH_MODE the arguments after `x` decide the graph's shape: pass Python constants (literals,
        or attributes of the calling cell) when the graph compiles, never tensors.

        Args:
            x: images (B, in_channels, img_size, img_size).
            indices: as timm's `feature_take_indices`: None every stage, an int n the last n, a sequence those
                stages (negative ones count from the end); the maps come in that order.
            norm: put the final norm on the stride-16 maps (stage 0 has other channels: as timm, unnormed).
            stop_early: run no stage after the last one taken. The final tokens need every stage, so it is
                refused for an earlier last stage unless `intermediates_only`.
            output_fmt: "NCHW" or "NHWC" maps.
            intermediates_only: return the list of maps alone.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        taken, last_taken = take_indices(NUM_STAGES, indices)
        if stop_early and not intermediates_only and last_taken < NUM_STAGES - 1:
            raise ValueError(f"stop_early=True stops after stage {last_taken}, before the final tokens: "
                             "pass intermediates_only=True, or stop_early=False")
        outputs = self.run_stages(self.embed(x), last_taken if stop_early else NUM_STAGES - 1)
        maps = [self._feature_map(outputs[index], norm and index > 0, output_fmt) for index in taken]
        if intermediates_only:
            return maps
        return self.forward_cls(flatten_grid(outputs[-1])), maps

    def _feature_map(self, x, norm, output_fmt):
        """A channels-last stage output as forward_intermediates returns it."""
        if norm:
            x = self.norm(x)
        return x.transpose(0, 3, 1, 2) if output_fmt == "NCHW" else x

    def forward_stages(self, x, drop_masks=None):
        """Image -> the NCHW maps of the stages in `out_indices` (features_only).

        Args:
            x: images (B, in_channels, img_size, img_size).
            drop_masks: the step's drop-path masks, as construct's.
        """
        taken, last_taken = take_indices(NUM_STAGES, self.out_indices)
        outputs = self.run_stages(self.embed(x), last_taken, drop_masks)
        return tuple(self._feature_map(outputs[index], False, "NCHW") for index in taken)

    def forward_train(self, x, mix_mask=None, drop_masks=None):
        """Token-labeling outputs: (class logits (B, K), per-token logits (B, N, K)).

        Args:
            x: images (B, in_channels, img_size, img_size).
            mix_mask: (1 or B, H/16, W/16, 1), 1 inside the MixToken box: there the stride-8 tokens come from the
                batch flipped along its first axis, and the per-token logits are flipped back, so each token's
                logits line up with its own image's token labels. None: no MixToken.
            drop_masks: the step's drop-path masks, as construct's.
        """
        x = self.embed(x)
        if mix_mask is not None:
            fine_mask = self._to_stride8(mix_mask).astype(x.dtype)
            # ops.flip, not x[::-1]: MindSpore 2.10 has no gradient for a negative-stride slice.
            x = x * (1 - fine_mask) + ops.flip(x, (0,)) * fine_mask
        cls_token, patch_tokens = split_class_token(self.forward_cls(self.forward_tokens(x, drop_masks)))
        cls_logits = self.head(cls_token.squeeze(1))
        aux_logits = self.aux_head(patch_tokens)
        if mix_mask is not None:
            batch, num_tokens, classes = aux_logits.shape
            mask = mix_mask.reshape(mix_mask.shape[0], num_tokens, 1).astype(aux_logits.dtype)
            aux_logits = aux_logits * (1 - mask) + ops.flip(aux_logits, (0,)) * mask
        return cls_logits, aux_logits

    @staticmethod
    def _to_stride8(mask):
        batch, height, width, _ = mask.shape
        mask = ops.broadcast_to(mask.reshape(batch, height, 1, width, 1, 1),
                                (batch, height, POOLING_SCALE, width, POOLING_SCALE, 1))
        return mask.reshape(batch, height * POOLING_SCALE, width * POOLING_SCALE, 1)

    def construct(self, x, drop_masks=None):
        """Logits (or, with `features_only`, the stage maps).

        Args:
            x: images (B, in_channels, img_size, img_size).
            drop_masks: in training, the step's drop-path masks (rows of `drop_path_keep_probs()`, B), 1 keeping a
                sample's branch; None draws them in the graph. Inference needs none.
        """
        if self.features_only:
            return self.forward_stages(x, drop_masks)
        return self.forward_head(self.forward_features(x, drop_masks))


# The architectures of the official release (models/volo.py of sail-sg/volo).
ARCHS = {
    "d1": dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
    "d2": dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "d3": dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    "d4": dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)),
    "d5": dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16),
               mlp_ratio=4.0, stem_hidden_dim=128),
}

# The 11 official variants: arch, resolution, eval crop_pct, official top-1 and release file name. Their weights
# are on the Hugging Face hub as timm's copy of the release (`hub_id`: timm/<variant>.sail_in1k, model.safetensors).
VARIANTS = {
    "volo_d1_224": dict(arch="d1", img_size=224, crop_pct=0.96, top1=84.2, file="d1_224_84.2.pth.tar"),
    "volo_d1_384": dict(arch="d1", img_size=384, crop_pct=1.0, top1=85.2, file="d1_384_85.2.pth.tar"),
    "volo_d2_224": dict(arch="d2", img_size=224, crop_pct=0.96, top1=85.2, file="d2_224_85.2.pth.tar"),
    "volo_d2_384": dict(arch="d2", img_size=384, crop_pct=1.0, top1=86.0, file="d2_384_86.0.pth.tar"),
    "volo_d3_224": dict(arch="d3", img_size=224, crop_pct=0.96, top1=85.4, file="d3_224_85.4.pth.tar"),
    "volo_d3_448": dict(arch="d3", img_size=448, crop_pct=1.0, top1=86.3, file="d3_448_86.3.pth.tar"),
    "volo_d4_224": dict(arch="d4", img_size=224, crop_pct=0.96, top1=85.7, file="d4_224_85.7.pth.tar"),
    "volo_d4_448": dict(arch="d4", img_size=448, crop_pct=1.15, top1=86.8, file="d4_448_86.79.pth.tar"),
    "volo_d5_224": dict(arch="d5", img_size=224, crop_pct=0.96, top1=86.1, file="d5_224_86.10.pth.tar"),
    "volo_d5_448": dict(arch="d5", img_size=448, crop_pct=1.15, top1=87.0, file="d5_448_87.0.pth.tar"),
    "volo_d5_512": dict(arch="d5", img_size=512, crop_pct=1.15, top1=87.1, file="d5_512_87.07.pth.tar"),
}
# MindCV's short names stand for the 224 px models (and replace MindCV's own VOLO entries).
ALIASES = {f"volo_{arch}": f"volo_{arch}_224" for arch in ARCHS}


def hub_id(name):
    """The hub repository of a registered model's official weights."""
    return f"timm/{ALIASES.get(name, name)}.sail_in1k"


NUM_CLASSES = 1000  # ImageNet-1k: the class count of every official variant
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_config(name):
    """Evaluation preprocessing of a registered model: resize to size / crop_pct (bicubic), center crop."""
    variant = VARIANTS[ALIASES.get(name, name)]
    size = variant["img_size"]
    return dict(url=HUB_URL_PREFIX + hub_id(name), num_classes=NUM_CLASSES, input_size=(3, size, size),
                crop_pct=variant["crop_pct"], interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="patch_embed.conv.0", classifier="head")


# Read by MindCV's registry: `get_pretrained_cfg`, and `list_models(pretrained=True)` / `is_model_pretrained`
# (a registered name with a url). The url names the hub repository `build_volo(pretrained=True)` loads from;
# MindCV's own loader (`load_pretrained`) is never called for these models.
default_cfgs = {name: data_config(name) for name in (*VARIANTS, *ALIASES)}


# VOLO constructor arguments a recipe may replace through `arch_overrides`; the lists take one value per stage.
ARCH_KEYS = ("layers", "embed_dims", "num_heads", "mlp_ratio", "stem_hidden_dim", "img_size", "qkv_bias",
             "attn_drop_rate")
_STAGE_LISTS = ("layers", "embed_dims", "num_heads")


def check_arch_overrides(overrides):
    """`overrides` (a mapping) as a dict, or a UserError: known keys, lists of four positive integers."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ARCH_KEYS))
    if unknown:
        raise UserError(f"arch_overrides: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                        f"valid keys: {', '.join(ARCH_KEYS)}")
    for key in _STAGE_LISTS:
        value = overrides.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 4
                                      and all(isinstance(v, int) and v > 0 for v in value)):
            raise UserError(f"arch_overrides: {key} must be a list of four positive integers, got {value!r}")
    return overrides


def build_volo(name, pretrained=False, **kwargs):
    """Build a registered variant; keyword arguments override the variant's (num_classes, img_size, ...) or
    choose the model's `backend` (see VOLO).

    `pretrained=True` loads the official weights from the hub (`weights.hub`); another img_size resizes
    pos_embed, another num_classes leaves fresh heads.
    """
    variant = VARIANTS[ALIASES.get(name, name)]
    model = VOLO(**{**ARCHS[variant["arch"]], "img_size": variant["img_size"], **kwargs})
    if pretrained:
        load_hub_weights(model, hub_id(name))
    return model


def _entrypoint(name):
    """MindCV's registry keys an entry point by its function's name."""
    def entrypoint(pretrained=False, **kwargs):
        return build_volo(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: VOLO, as in the official release (see VARIANTS)."
    return entrypoint


MODEL_NAMES = (*VARIANTS, *ALIASES)
for _name in MODEL_NAMES:  # the variant table is the registry
    register_model(_entrypoint(_name))


def create(name, **kwargs):
    """`mindcv.models.create_model` for this project's names, with a one-line error for any other name.

    Args:
        name: a registered name (MODEL_NAMES).
        **kwargs: VOLO's arguments (num_classes, img_size, backend, ...) and create_model's (checkpoint_path);
            those set to None are left at the variant's values.
    """
    return create_model(check_model_name(name), **{k: v for k, v in kwargs.items() if v is not None})


def check_model_name(name):
    """`name` if it is one of this project's registered names; else a one-line UserError listing them."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODEL_NAMES))}")
    return name
