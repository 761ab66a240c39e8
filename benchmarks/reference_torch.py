"""The same measurements as `benchmark.py`, for the PyTorch reference: timm's VOLO (`timm.models.volo`).

Runs in its own virtualenv, never in the project's environment (torch is not a dependency of this project):

  python -m venv ~/torchenv
  ~/torchenv/bin/pip install torch "numpy<2"
  ~/torchenv/bin/pip install --no-deps timm
  ~/torchenv/bin/pip install pillow pyyaml huggingface_hub safetensors
  ~/torchenv/bin/python benchmarks/reference_torch.py --model volo_d1_224 --batch-size 8 --task infer

torchvision: timm imports it at import time (FrozenBatchNorm2d, transforms, datasets) but VOLO uses none
of it, and there is no CPU torchvision build for this torch here. `install_torchvision_stub()` puts a
stand-in `torchvision` package on the import path of this process only (a meta-path finder: no file is
written into any environment); any class taken from it fails if instantiated, so a benchmark that did
need torchvision would fail loudly rather than measure something else.

Eager mode (what timm users run), float32, torch.set_num_threads(--threads, default 2). --task train is
one step of AdamW + cross-entropy on the model's eval-form logits, like the MindSpore side.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def install_torchvision_stub():
    class StubMeta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return StubMeta(name, (Stub,), {})

    class Stub(metaclass=StubMeta):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision is only a stub in the reference benchmark's environment")

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return StubMeta(name, (Stub,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    try:
        import torchvision  # noqa: F401  (a real one, if the environment has it)
    except ImportError:
        sys.meta_path.insert(0, Finder())


def build_parser(parser):
    _common.add_common_args(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--all", action="store_true", help="sweep the 11 official variants (inference)")
    return parser


VARIANTS = ("volo_d1_224", "volo_d1_384", "volo_d2_224", "volo_d2_384", "volo_d3_224", "volo_d3_448",
            "volo_d4_224", "volo_d4_448", "volo_d5_224", "volo_d5_448", "volo_d5_512")


def expand_runs(args):
    settings = dict(batch_size=args.batch_size, img_size=args.img_size, mode="eager", device=args.device,
                    task=args.task, amp_level="O0", warmup=args.warmup, iters=args.iters,
                    num_classes=args.num_classes, seed=args.seed, threads=args.threads)
    names = VARIANTS if args.all else (args.model,)
    return [dict(settings, model=name, task="infer" if args.all else args.task) for name in names]


def timm_step(a, mark=lambda stage, **figures: None):
    """(step, img_size, parameter MB): timm's VOLO `a["model"]` and one call of its task (`infer`: forward in
    inference mode; `train`: AdamW + cross-entropy step). `mark(stage, ...)` is told as each part is ready."""
    import torch

    install_torchvision_stub()
    from timm.models import volo

    mark("import_model_code")
    sizes = {"img_size": a["img_size"]} if a["img_size"] else {}
    device = torch.device(a.get("device", "CPU").lower())
    net = getattr(volo, a["model"])(num_classes=a["num_classes"], **sizes).to(device)
    param_mb = sum(p.numel() for p in net.parameters()) * 4 / 2 ** 20
    mark("build_model", param_mb=round(param_mb, 1))
    img_size = a["img_size"] or int(a["model"].rsplit("_", 1)[1])  # timm's names end in the resolution
    x = torch.randn(a["batch_size"], 3, img_size, img_size, device=device)
    mark("inputs")
    if a["task"] == "infer":
        net.eval()

        def step():
            with torch.inference_mode():
                return net(x).cpu()
        return step, img_size, param_mb
    net.train()
    labels = torch.randint(0, a["num_classes"], (a["batch_size"],), device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    mark("build_train_cell")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), labels)
        loss.backward()
        optimizer.step()
        return loss.item()
    return train_step, img_size, param_mb


def child_main(a):
    import torch

    torch.set_num_threads(a["threads"])
    torch.manual_seed(a["seed"])
    step, img_size, _ = timm_step(a)
    return _common.measure(step, dict(a, img_size=img_size, framework="torch+timm", version=torch.__version__))


if __name__ == "__main__":
    sys.exit(_common.main(os.path.abspath(__file__), build_parser, child_main, expand_runs))
