"""Training images per second that the host makes: this project's loader against MindCV's, on the same JPEGs
and the same cores, the sides alternating round by round, each run in a fresh process.

  python benchmarks/input_pipeline.py                        # D1 recipe's augmentation, 1 and 2 workers, 3 rounds
  python benchmarks/input_pipeline.py --mix True             # + the recipe with mixup 0.8 / cutmix 1.0
  python benchmarks/input_pipeline.py --token_labels True    # + the recipe with token labels (label maps)
  python benchmarks/input_pipeline.py --workers 2 --rounds 1 --images 512
  python benchmarks/input_pipeline.py --mix True --token_labels True --json_out pipeline.json   # records as JSON

The images are `--images` 500 x 375 JPEGs (ImageNet's typical size) of smooth random colour fields in 8 class
folders. Both sides apply the D1 recipe's training augmentation (random-resized crop 224 with bicubic resampling,
as MindCV's own VOLO recipes, horizontal flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) at batch 32
and time every batch after the first. This project's loader ships uint8 pixels (the compiled step normalises
them), MindCV's float32: the table counts images made, whatever their form.
This project's side is `engine.data.create_train_loader`, as train.py calls it; MindCV's is its
create_dataset + create_transforms + create_loader. One JSON line per run, then a table of medians: img/s,
images per CPU-second (the CPU time of the run's process and its data workers, so a busy machine moves it
little), and the cores one Ascend 910 needs to feed volo_d1 at MindCV's reported 4,451 img/s on 8 cards.

With --token_labels, this project's side also runs the recipe as configured, token labeling from label maps
(loss token_label, token_label_dir): the loader of the loss network, as train.py's loop takes it, with each
sample's map read and moved as its image. The maps are made once by `python -m mindcv_volo.relabel` from a
random-init tiny VOLO teacher with 1000 classes (14 x 14 tokens, top 5: the official maps' size; what they say
does not matter here). MindCV has no token labeling: that row compares with its plain recipe.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPE = os.path.join(ROOT, "configs", "volo_d1_ascend.yaml")
CLASSES = 8
BATCH = 32
ASCEND_910_IMG_PER_S = 4451 / 8  # MindCV's volo_d1 figure, per card
# The token-label recipe: a teacher cheap on CPU, with ImageNet's class count so that maps mention as many classes
TEACHER_ARCH = {"layers": [1, 1, 1, 1], "embed_dims": [16, 32, 32, 32], "num_heads": [1, 2, 2, 2],
                "stem_hidden_dim": 8, "mlp_ratio": 2.0, "img_size": 224}
TEACHER_CLASSES = 1000
MAPS_FOLDER = "label_maps"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_option(parser, "images", type=int, default=1024,
                       help="JPEGs in the training folder (enough that the workers' prefetch is a small part)")
    _common.add_option(parser, "workers", type=int, nargs="+", default=[1, 2], help="data workers of each run")
    _common.add_option(parser, "rounds", type=int, default=3, help="rounds; the sides alternate within each")
    _common.add_option(parser, "mix", type=lambda text: text.lower() in ("true", "1", "yes"), default=False,
                       help="also measure the recipe with mixup 0.8 and cutmix 1.0")
    _common.add_option(parser, "token_labels", type=lambda text: text.lower() in ("true", "1", "yes"), default=False,
                       help="also measure the recipe with token labels from label maps (made first, by relabel)")
    _common.add_option(parser, "json_out", default=None,
                       help="also write every run's record and the table's rows to this JSON file")
    parser.add_argument(_common.CHILD_FLAG, dest="child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_images(root, count):
    """`count` 500 x 375 JPEGs of smooth colour fields (JPEG sizes as real photographs give), in class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = os.path.join(root, "train", f"class{index % CLASSES}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        picture.save(os.path.join(folder, f"{index:05d}.jpg"), quality=90)


def project_batches(data_dir, workers, mix):
    """This project's training batches of one epoch, as train.py makes them under the D1 recipe."""
    from mindcv_volo.engine.config import parse_config
    from mindcv_volo.engine.data import SplitInfo, create_train_loader, train_steps
    from mindcv_volo.engine.runtime import Runtime

    argv = ["-c", RECIPE, "--data_dir", data_dir, "--batch_size", str(BATCH), "--num_parallel_workers",
            str(workers), "--num_classes", str(CLASSES), "--device_target", "CPU"]
    if mix:
        argv += ["--loss", "ce", "--mix_token", "False", "--mixup", "0.8", "--cutmix", "1.0"]
    config = parse_config(argv, "train")
    split = SplitInfo(data_dir, "train")
    steps = train_steps(split.count, BATCH, 1, True)
    return create_train_loader(split, 0, steps, config.data, config.augmentation, CLASSES, config.system.seed,
                               Runtime("CPU", 0, 0, 1, workers))


def save_teacher(path):
    """A random-init tiny VOLO (TEACHER_ARCH) as a checkpoint for the relabel tool."""
    import mindspore as ms

    from mindcv_volo.models import VOLO
    from mindcv_volo.models.volo import ARCHS
    from mindcv_volo.weights import save_checkpoint

    ms.set_seed(0)
    model = VOLO(**{**ARCHS["d1"], **TEACHER_ARCH, "num_classes": TEACHER_CLASSES})
    save_checkpoint({p.name: p.asnumpy() for p in model.get_parameters()}, path)
    return dict(side="teacher", path=path)


def make_label_maps(root):
    """The label map of every training JPEG in root/MAPS_FOLDER, by the relabel tool as a user runs it."""
    teacher = os.path.join(root, "teacher.ckpt")
    record = _common.run_child(os.path.abspath(__file__), dict(side="teacher", path=teacher))
    if "error" in record:
        raise SystemExit(f"saving the teacher failed: {record['error']}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mindcv_volo.relabel", "--model", "volo_d1_224", "--arch_overrides",
                    json.dumps(TEACHER_ARCH), "--ckpt_path", teacher, "--data_dir", root,
                    "--out", os.path.join(root, MAPS_FOLDER), "--device_target", "CPU"], cwd=ROOT, check=True)
    print(f"label maps made in {time.perf_counter() - start:.0f} s", flush=True)


def project_token_label_batches(data_dir, workers, mix):
    """This project's training batches of one epoch under the D1 recipe as configured, token labels from the maps:
    the loss network's loader, as engine.loop takes it. The loader does not depend on the model, so the loss is
    built on the tiny teacher architecture rather than on volo_d1; nothing is compiled."""
    from mindcv_volo.cli import loss_builder
    from mindcv_volo.engine.config import parse_config
    from mindcv_volo.engine.data import SplitInfo, train_steps
    from mindcv_volo.engine.runtime import Runtime
    from mindcv_volo.models import VOLO
    from mindcv_volo.models.volo import ARCHS

    config = parse_config(["-c", RECIPE, "--data_dir", data_dir, "--batch_size", str(BATCH), "--num_parallel_workers",
                           str(workers), "--num_classes", str(TEACHER_CLASSES), "--device_target", "CPU",
                           "--loss", "token_label", "--token_label_dir", os.path.join(data_dir, MAPS_FOLDER)], "train")
    runtime = Runtime("CPU", 0, 0, 1, workers)
    model = VOLO(**{**ARCHS["d1"], **TEACHER_ARCH, "num_classes": TEACHER_CLASSES})
    loss_network = loss_builder(config.loss.loss)(model, config.loss, TEACHER_CLASSES, config.system.seed, runtime)
    split = SplitInfo(data_dir, "train")
    loss_network.check_inputs(split)
    steps = train_steps(split.count, BATCH, 1, True)
    return loss_network.create_train_loader(split, 0, steps, config.data, config.augmentation, TEACHER_CLASSES,
                                            config.system.seed, runtime)


def mindcv_batches(data_dir, workers, mix):
    """MindCV's training batches of one epoch with the same augmentation (its create_* factories)."""
    from mindcv.data import create_dataset, create_loader, create_transforms

    dataset = create_dataset(name="imagenet", root=data_dir, split="train", shuffle=True,
                             num_parallel_workers=workers)
    transforms = create_transforms(dataset_name="imagenet", image_resize=224, is_training=True, hflip=0.5,
                                   interpolation="bicubic", auto_augment="randaug-m9-mstd0.5-inc1", re_prob=0.25)
    loader = create_loader(dataset=dataset, batch_size=BATCH, drop_remainder=True, is_training=True,
                           mixup=0.8 if mix else 0.0, cutmix=1.0 if mix else 0.0, num_classes=CLASSES,
                           transform=transforms, num_parallel_workers=workers)
    return loader.create_tuple_iterator(output_numpy=True, num_epochs=1)


def child_main(settings):
    """One run: img/s over every batch after the first (which includes starting the workers)."""
    if settings["side"] == "teacher":
        return save_teacher(settings["path"])
    make = project_batches if settings["side"] == "project" else mindcv_batches
    if settings["token_labels"] and settings["side"] == "project":
        make = project_token_label_batches
    batches = iter(make(settings["data_dir"], settings["workers"], settings["mix"]))
    first = next(batches)
    start, cpu_start, images = time.perf_counter(), _common.process_tree_cpu_seconds(), 0
    # Every batch of the epoch but the first, taken without asking past the last one: the data workers end
    # when the iterator is exhausted, and their CPU time with them.
    for _ in range(settings["images"] // BATCH - 1):
        images += len(next(batches)[0])  # (images, labels), or with token labels the maps' columns too
    seconds = time.perf_counter() - start
    cpu_seconds = _common.process_tree_cpu_seconds() - cpu_start
    return dict(settings, batch_dtype=str(first[0].dtype), batch_shape=list(first[0].shape), images=images,
                seconds=round(seconds, 2), img_per_s=round(images / seconds, 1), cpu_seconds=round(cpu_seconds, 2),
                img_per_cpu_s=round(images / cpu_seconds, 1))


def main():
    args = parse_args()
    if args.child is not None:
        _common.emit(child_main(json.loads(args.child)))
        return 0
    records = []
    with tempfile.TemporaryDirectory() as work:
        make_images(work, args.images)
        if args.token_labels:
            make_label_maps(work)
        recipes = [(False, False)] + [(True, False)] * args.mix + [(False, True)] * args.token_labels
        cases = [(workers, mix, token_labels) for mix, token_labels in recipes for workers in args.workers]
        for round_index in range(args.rounds):
            sides = ("project", "mindcv") if round_index % 2 == 0 else ("mindcv", "project")
            for workers, mix, token_labels in cases:
                for side in sides:
                    settings = dict(side=side, workers=workers, mix=mix, token_labels=token_labels, round=round_index,
                                    data_dir=work, images=args.images)
                    record = _common.run_child(os.path.abspath(__file__), settings)
                    record.pop("data_dir", None)
                    records.append(record)
                    print(json.dumps(record), flush=True)
    print("\n| recipe | workers | img/s: this project | MindCV | ratio | img per CPU-second: this project | MindCV "
          "| ratio | cores per Ascend 910: this project / MindCV |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for workers, mix, token_labels in cases:
        def median(key, side):
            return statistics.median(r[key] for r in records if key in r and r["side"] == side
                                     and (r["workers"], r["mix"], r["token_labels"]) == (workers, mix, token_labels))

        rates = {side: median("img_per_s", side) for side in ("project", "mindcv")}
        per_core = {side: median("img_per_cpu_s", side) for side in ("project", "mindcv")}
        cores = {side: round(ASCEND_910_IMG_PER_S / rate, 2) for side, rate in per_core.items()}
        recipe = "D1 + mixup/cutmix" if mix else "D1 + token labels (MindCV: D1)" if token_labels else "D1"
        rows.append(dict(recipe=recipe, workers=workers, img_per_s=rates, img_per_cpu_s=per_core,
                         ratio=round(rates["project"] / rates["mindcv"], 3),
                         ratio_per_core=round(per_core["project"] / per_core["mindcv"], 3), cores_per_ascend_910=cores))
        print(f"| {recipe} | {workers} | {rates['project']:.0f} | {rates['mindcv']:.0f} | "
              f"{rates['project'] / rates['mindcv']:.2f} | {per_core['project']:.0f} | {per_core['mindcv']:.0f} | "
              f"{per_core['project'] / per_core['mindcv']:.2f} | {cores['project']:.1f} / {cores['mindcv']:.1f} |")
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(dict(images=args.images, batch=BATCH, runs=records, table=rows), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
