"""Make token-label maps with any teacher: `python -m mindcv_volo.relabel --teacher MODEL --ckpt X --data_dir D --out DIR`.

The teacher runs over every image of D/<split> (ImageFolder) and writes, per image, the top-k classes
and logits of each of its output tokens (format: token_labeling.label_maps). The teacher is
  * a VOLO of this project (e.g. volo_d5_512 converted from the official weights): the aux head on
    each token of forward_features, i.e. the (B, N, K) per-token logits, on the img/16 grid;
  * or any MindCV model whose forward_features gives a grid (B, C, H, W) or tokens (B, [1 +] H*W, C):
    its classifier (aux_head / classifier / head / fc Dense) is applied to every position, as
    TokenLabeling's generate_label.py does.
The teacher sees the whole image resized to its input size (bicubic, no crop, ImageNet mean/std), so a
map covers exactly the image that training crops from (the official teacher saw a centre crop but
training treats its map as the whole image).

Resumable: images whose map exists are skipped and every file is written atomically, so a killed run
is restarted with the same command. Under msrun (or with RANK_ID/RANK_SIZE set) rank r of n takes images
r, r + n, ...; no communication is needed.
"""
import os
import sys
import time

import numpy as np
from PIL import Image

from ..errors import UserError
from .label_maps import label_map_path, list_images, write_label_map, write_meta

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
HEAD_NAMES = ("aux_head", "classifier", "head", "fc")  # per-token classifier, in order of preference


def shard():
    """(rank, world) of this process: msrun's cluster if launched by msrun, else RANK_ID/RANK_SIZE, else (0, 1)."""
    if os.environ.get("MS_ROLE"):
        # msrun also starts a scheduler process running this script: init() serves the cluster there and
        # exits with it; in the workers it returns the rank (assigned when node ranks are not given).
        from mindspore.communication import get_group_size, get_rank, init
        init()
        return get_rank(), get_group_size()
    return int(os.environ.get("RANK_ID", "0")), int(os.environ.get("RANK_SIZE", "1"))


def set_device(target, mode):
    import mindspore as ms

    from ..engine.runtime import resolve_device

    target = resolve_device(target)  # "auto": the first present; a missing device is a one-line error
    ms.set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    return target


class TeacherTopK:
    """Wraps the teacher: images (B, 3, S, S) -> per-token top-k (logits, indices), each (B, G_h, G_w, k)."""

    def __init__(self, model, top_k):
        from mindspore import nn, ops

        from ..models import VOLO

        self.has_class_token = isinstance(model, VOLO)  # otherwise told by the token count
        head = model.aux_head if self.has_class_token else _classifier(model)
        if top_k > head.out_channels:
            raise UserError(f"--top-k {top_k} is more than the teacher's {head.out_channels} classes")
        self.num_classes = head.out_channels

        class TokenTopK(nn.Cell):
            def __init__(self):
                super().__init__()
                self.model, self.head = model, head

            def construct(self, x):
                features = self.model.forward_features(x)
                if features.ndim == 4:  # a convolutional grid (B, C, H, W): classify every position
                    features = features.transpose(0, 2, 3, 1)
                return ops.topk(self.head(features), top_k)

        self.cell = TokenTopK()
        self.cell.set_train(False)

    def __call__(self, images):
        import mindspore as ms

        values, indices = (t.asnumpy() for t in self.cell(ms.Tensor(images)))
        if values.ndim == 4:
            return values, indices
        tokens = values.shape[1]
        side = int(round(tokens ** 0.5))
        if self.has_class_token or side * side != tokens:  # drop the class token, first as in ViTs
            tokens -= 1
            side = int(round(tokens ** 0.5))
            values, indices = values[:, 1:], indices[:, 1:]
        if side * side != tokens:
            raise UserError(f"the teacher's {values.shape[1]} output tokens are not a square grid")
        grid = (len(values), side, side, -1)
        return values.reshape(grid), indices.reshape(grid)


def _classifier(model):
    from mindspore import nn

    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Dense):
            return head
    raise UserError(f"{type(model).__name__} has no Dense classifier named {', '.join(HEAD_NAMES)}: "
                    "cannot turn its features into per-token labels")


def build_teacher(args):
    """The teacher with its checkpoint loaded strictly; its class count is the checkpoint's."""
    import mindcv.models.registry as registry

    from ..models import MODEL_NAMES, create
    from ..weights.checkpoint import model_entries, read_checkpoint
    from ..weights.state import adapt_state, assign_state, check_state

    state = model_entries(read_checkpoint(args.ckpt), args.ema, args.ckpt)
    kwargs = dict(args.arch_overrides)
    if args.teacher in MODEL_NAMES:
        if "head.weight" in state:
            kwargs["num_classes"] = int(state["head.weight"].shape[0])
        if args.image_size:
            kwargs["img_size"] = args.image_size
        model = create(args.teacher, **kwargs)
        state = adapt_state(model, state, args.ckpt)  # resizes pos_embed to --image-size
        image_size = model.img_size
    elif registry.is_model(args.teacher):
        from mindcv.models import create_model

        model = create_model(args.teacher, **kwargs)
        head = _classifier(model)
        head_weight = state.get(head.weight.name)
        if head_weight is not None and head_weight.shape[0] != head.out_channels:
            model = create_model(args.teacher, **{**kwargs, "num_classes": int(head_weight.shape[0])})
        image_size = args.image_size or 224
    else:
        raise UserError(f"unknown teacher '{args.teacher}': neither a VOLO of this project "
                        f"({', '.join(sorted(MODEL_NAMES))}) nor a MindCV model (mindcv.models.list_models())")
    check_state(model, state, args.ckpt)
    assign_state(model, state)
    return model, image_size


def load_image(path, size):
    """The whole image resized to size x size (bicubic), normalised, CHW float32."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    return ((np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def relabel(args):
    """Write the label map of every image of `args.data_dir/args.split` that has none yet."""
    folder = os.path.join(args.data_dir, args.split)
    items = list_images(folder)  # checks the folder before the (slow) teacher is built
    device = set_device(args.device_target, args.mode)
    rank, world = shard()
    mine = items[rank::world]
    todo = [rel for rel, _ in mine if not os.path.exists(label_map_path(args.out, rel))]
    if not todo:
        print(f"relabel: rank {rank}/{world}: all {len(mine)} maps exist in {args.out}, nothing to do",
              file=sys.stderr, flush=True)
        return
    model, size = build_teacher(args)
    teacher = TeacherTopK(model, args.top_k)
    print(f"relabel: {len(items)} images in {folder}; rank {rank}/{world} takes {len(mine)}, "
          f"{len(mine) - len(todo)} already done; teacher {args.teacher} ({teacher.num_classes} classes, "
          f"{size} px, {device}) -> {args.out}", file=sys.stderr, flush=True)
    grid = None
    start = time.time()
    for b, first in enumerate(range(0, len(todo), args.batch_size)):
        names = todo[first:first + args.batch_size]
        images = np.stack([load_image(os.path.join(folder, rel), size) for rel in names])
        if len(names) < args.batch_size:  # pad the last batch: one input shape, one compiled graph
            images = np.concatenate([images, np.repeat(images[-1:], args.batch_size - len(names), 0)])
        values, indices = teacher(images)
        grid = values.shape[1:3]
        for i, rel in enumerate(names):
            write_label_map(label_map_path(args.out, rel), indices[i], values[i], teacher.num_classes)
        done = first + len(names)
        if (b + 1) % args.log_interval == 0 or done == len(todo):
            rate = done / max(time.time() - start, 1e-9)
            print(f"relabel: {done}/{len(todo)} images, {rate:.1f} img/s, ETA {(len(todo) - done) / rate:.0f} s",
                  file=sys.stderr, flush=True)
    if grid is not None:
        write_meta(args.out, teacher=args.teacher, checkpoint=os.path.abspath(args.ckpt),
                   num_classes=teacher.num_classes, top_k=args.top_k, grid=list(map(int, grid)),
                   image_size=size, split=args.split, scores="logits",
                   view="whole image resized to image_size x image_size, bicubic, no crop")
    print(f"relabel: done, {len(todo)} maps written, {len(mine) - len(todo)} skipped", file=sys.stderr, flush=True)

