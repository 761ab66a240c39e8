"""Make token-label maps with any teacher: `python -m mindcv_volo.relabel --ckpt_path X --data_dir D --out DIR`.

The teacher runs over every image of D/<split> (ImageFolder) and writes, per image, the top-k classes
and logits of each of its output tokens (format: token_labeling.label_maps). The teacher is
  * a VOLO of this project (e.g. volo_d5_512 converted from the official weights; the checkpoint names
    it): the aux head on each token of forward_features, i.e. the (B, N, K) per-token logits, on the
    img/16 grid;
  * or any MindCV model (--model NAME) whose forward_features gives a grid (B, C, H, W) or tokens
    (B, [1 +] H*W, C): its classifier (aux_head / classifier / head / fc Dense) is applied to every
    position, as TokenLabeling's generate_label.py does.
The teacher sees the whole image resized to its input size (`Preprocessing` with no crop: bicubic,
ImageNet mean/std), so a map covers exactly the image that training crops from (the official teacher
saw a centre crop but training treats its map as the whole image).

Resumable: images whose map exists are skipped and every file is written atomically, so a killed run
is restarted with the same command. Under msrun (or with RANK_ID/RANK_SIZE set) rank r of n takes images
r, r + n, ...; no communication is needed.
"""
import logging
import os
import time

import numpy as np

from ..engine.data import IMAGENET_MEAN_255, IMAGENET_STD_255, Preprocessing, list_images
from ..engine.runtime import describe, progress, setup_runtime
from ..errors import UserError
from .label_maps import label_map_path, write_label_map, write_meta

logger = logging.getLogger("mindcv_volo")

HEAD_NAMES = ("aux_head", "classifier", "head", "fc")  # per-token classifier, in order of preference


class TeacherTopK:
    """Wraps the teacher: images (B, 3, S, S) -> per-token top-k (logits, indices), each (B, G_h, G_w, k)."""

    def __init__(self, model, top_k):
        from mindspore import nn, ops

        from ..models import VOLO

        self.has_class_token = isinstance(model, VOLO)  # otherwise told by the token count
        head = model.aux_head if self.has_class_token else _classifier(model)
        if top_k > head.out_channels:
            raise UserError(f"--top_k {top_k} is more than the teacher's {head.out_channels} classes")
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


def build_teacher(config):
    """(the teacher with its checkpoint loaded strictly, its name, its input size); its classes are the
    checkpoint's."""
    import mindcv.models.registry as registry

    from ..engine.model_spec import build_model, fit_hint, load_model, resolve
    from ..models import MODEL_NAMES
    from ..weights.checkpoint import model_entries, read_checkpoint, read_description
    from ..weights.state import adapt_state, assign_state, check_state, model_shapes

    path, image_size = config.model.ckpt_path, config.tools.image_size
    if config.model.pretrained:  # the official weights of a VOLO variant
        model, spec, _ = load_model(config.model, path, config.model.ema,
                                    **({"img_size": image_size} if image_size else {}))
        return model, spec.name, model.img_size
    state = model_entries(read_checkpoint(path), config.model.ema, path)
    description = read_description(path)
    name = config.model.model or description.get("model")
    if name is None or name in MODEL_NAMES:
        spec = resolve(config.model, description, num_classes=_head_classes(state, "head.weight"),
                       given=config.given)
        model = build_model(spec, **({"img_size": image_size} if image_size else {}))
        state = adapt_state(model, state, path)  # resizes pos_embed to --image_size
        check_state(model_shapes(model), state, path, fit_hint(spec, path, description))
        assign_state(model, state)
        return model, spec.name, model.img_size
    if not registry.is_model(name):
        raise UserError(f"unknown teacher '{name}': neither a VOLO of this project "
                        f"({', '.join(sorted(MODEL_NAMES))}) nor a MindCV model (mindcv.models.list_models())")
    from mindcv.models import create_model

    kwargs = dict(config.model.arch_overrides)
    model = create_model(name, **kwargs)
    classes = _head_classes(state, _classifier(model).weight.name)
    if classes is not None and classes != _classifier(model).out_channels:
        model = create_model(name, **{**kwargs, "num_classes": classes})
    check_state(model_shapes(model), state, path)
    assign_state(model, state)
    return model, name, image_size or 224


def _head_classes(state, head_weight_name):
    weight = state.get(head_weight_name)
    return None if weight is None else int(weight.shape[0])


def relabel(config):
    """Write the label map of every image of data_dir/split that has none yet (this rank's share)."""
    data, tools = config.data, config.tools
    if not ((config.model.ckpt_path or config.model.pretrained) and tools.out and data.data_dir):
        raise UserError("relabel needs --ckpt_path (the teacher; or --pretrained True and --model NAME), --data_dir "
                        "and --out (the folder for the maps)")
    folder = os.path.join(data.data_dir, data.split)
    items = list_images(folder)  # checks the folder before the (slow) teacher is built
    runtime = setup_runtime(config.system, communicate=False)
    mine = items[runtime.rank::runtime.world]
    todo = [rel for rel, _ in mine if not os.path.exists(label_map_path(tools.out, rel))]
    if not todo:
        logger.warning("relabel: rank %d/%d: all %d maps exist in %s, nothing to do", runtime.rank, runtime.world,
                       len(mine), tools.out)
        return
    model, name, size = build_teacher(config)
    teacher = TeacherTopK(model, tools.top_k)
    view = Preprocessing(size, None, "bicubic", IMAGENET_MEAN_255, IMAGENET_STD_255)
    logger.info("relabel: %d images in %s; rank %d/%d takes %d, %d already done; teacher %s (%d classes, %d px); "
                "%s -> %s", len(items), folder, runtime.rank, runtime.world, len(mine), len(mine) - len(todo),
                name, teacher.num_classes, size, describe(runtime, False), tools.out)
    grid = None
    start = time.time()
    batches = range(0, len(todo), data.batch_size)
    for first in progress(batches, len(batches), "relabel batches", config.system.log_interval):
        names = todo[first:first + data.batch_size]
        images = np.stack([view.load(os.path.join(folder, rel)) for rel in names])
        if len(names) < data.batch_size:  # pad the last batch: one input shape, one compiled graph
            images = np.concatenate([images, np.repeat(images[-1:], data.batch_size - len(names), 0)])
        values, indices = teacher(images)
        grid = values.shape[1:3]
        for i, rel in enumerate(names):
            write_label_map(label_map_path(tools.out, rel), indices[i], values[i], teacher.num_classes)
    if grid is not None:
        from ..models import data_config

        weights = data_config(name)["url"] if config.model.pretrained else os.path.abspath(config.model.ckpt_path)
        write_meta(tools.out, teacher=name, checkpoint=weights,
                   num_classes=teacher.num_classes, top_k=tools.top_k, grid=list(map(int, grid)), image_size=size,
                   split=data.split, scores="logits",
                   view="whole image resized to image_size x image_size, bicubic, no crop")
    logger.info("relabel: done, %d maps written (%.1f img/s), %d skipped", len(todo),
                len(todo) / max(time.time() - start, 1e-9), len(mine) - len(todo))
