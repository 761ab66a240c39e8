"""Throughput, first-call compile time and peak memory of this project's VOLO models (MindSpore).

One JSON line per run; every run is measured in a fresh subprocess (peak RSS = that process's high-water
mark, so runs do not contaminate each other).

  python benchmarks/benchmark.py --model volo_d1_224 --batch-size 8 --mode graph --task infer
  python benchmarks/benchmark.py --task train --amp-level O0 --iters 3
  python benchmarks/benchmark.py --all --batch-size 1 --iters 2      # the 11 variants, inference

--task train times one full training step in one compiled cell: forward, cross-entropy, value_and_grad,
AdamW (nn.AdamWeightDecay) update. img/s is batch / median step time; compile_s is the first call minus
a median call (graph build + compile); first_call_s is the first call itself.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODES = ("graph", "pynative")
AMP_LEVELS = ("O0", "O1", "O2", "O3")


def build_parser(parser):
    _common.add_common_args(parser)
    parser.add_argument("--mode", choices=MODES, default="graph")
    parser.add_argument("--amp-level", choices=AMP_LEVELS, default="O0")
    parser.add_argument("--all", action="store_true", help="sweep the 11 official variants (inference)")
    parser.add_argument("--jit-level", choices=("O0", "O1", "O2"), default=None,
                        help="ms.set_context(jit_config={'jit_level': ...}) (default: MindSpore's)")
    parser.add_argument("--memory-level", choices=("O0", "O1"), default=None,
                        help="ms.runtime.set_memory(optimize_level=...): O1 = memory priority (default: MindSpore's)")
    return parser


def expand_runs(args):
    settings = dict(batch_size=args.batch_size, img_size=args.img_size, mode=args.mode, device=args.device,
                    task=args.task, amp_level=args.amp_level, memory_level=args.memory_level,
                    jit_level=args.jit_level, warmup=args.warmup, iters=args.iters,
                    num_classes=args.num_classes, seed=args.seed)
    if not args.all:
        return [dict(settings, model=args.model)]
    from mindcv_volo.models.volo import VARIANTS  # light: no graph is built here
    return [dict(settings, model=name, task="infer") for name in VARIANTS]


def make_train_step(net):
    import mindspore as ms
    from mindspore import nn

    class NetWithLoss(nn.Cell):
        def __init__(self, network):
            super().__init__(auto_prefix=False)
            self.network = network
            self.loss_fn = nn.CrossEntropyLoss()

        def construct(self, x, labels):
            return self.loss_fn(self.network(x).astype(ms.float32), labels)

    class TrainOneStep(nn.Cell):
        """forward + loss + gradients + AdamW update, compiled as one graph in GRAPH_MODE."""

        def __init__(self, network):
            super().__init__(auto_prefix=False)
            self.net_with_loss = NetWithLoss(network)
            self.optimizer = nn.AdamWeightDecay(network.trainable_params(), learning_rate=1e-3,
                                                weight_decay=0.05)
            self.grad_fn = ms.value_and_grad(self.net_with_loss, None, self.optimizer.parameters)

        def construct(self, x, labels):
            loss, grads = self.grad_fn(x, labels)
            self.optimizer(grads)
            return loss

    return TrainOneStep(net)


def child_main(a):
    import numpy as np
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if a["mode"] == "graph" else ms.PYNATIVE_MODE)
    ms.set_device(a["device"])
    ms.set_seed(a["seed"])
    if a.get("jit_level"):
        ms.set_context(jit_config={"jit_level": a["jit_level"]})
    if a.get("memory_level"):
        ms.runtime.set_memory(optimize_level=a["memory_level"])
    import mindcv_volo

    net = mindcv_volo.create(a["model"], img_size=a["img_size"], num_classes=a["num_classes"])
    img_size = net.img_size
    if a["amp_level"] != "O0":
        net = ms.amp.auto_mixed_precision(net, a["amp_level"])
    rng = np.random.default_rng(a["seed"])
    x = ms.Tensor(rng.standard_normal((a["batch_size"], 3, img_size, img_size), dtype=np.float32))
    if a["task"] == "infer":
        net.set_train(False)

        def step():
            return net(x).asnumpy()
    else:
        net.set_train(True)
        labels = ms.Tensor(rng.integers(0, a["num_classes"], a["batch_size"]).astype(np.int32))
        train_step = make_train_step(net)

        def step():
            return train_step(x, labels).asnumpy()

    return _common.measure(step, dict(a, img_size=img_size, framework="mindspore", version=ms.__version__))

if __name__ == "__main__":
    sys.exit(_common.main(os.path.abspath(__file__), build_parser, child_main, expand_runs))
