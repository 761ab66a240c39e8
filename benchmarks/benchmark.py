"""Throughput, first-call compile time and peak memory of this project's VOLO models: in MindSpore, or
(`--framework onnxruntime`, inference) exported to ONNX and run by onnxruntime.

One JSON line per run; every run is measured in a fresh subprocess (peak RSS = that process's high-water
mark, so runs do not contaminate each other). MindSpore's CPU threads are set as train.py sets them
(`engine.runtime.cpu_threads`: the cores this process may use); onnxruntime gets the same count.

  python benchmarks/benchmark.py --model volo_d1_224 --batch_size 8 --mode graph --task infer
  python benchmarks/benchmark.py --task train --amp_level O0
  python benchmarks/benchmark.py --framework onnxruntime --batch_size 8
  python benchmarks/benchmark.py --all --batch_size 1 --iters 2      # the 11 variants, inference

--task train times one full training step in one compiled cell: forward, cross-entropy, value_and_grad,
AdamW (nn.AdamWeightDecay) update. img/s is batch / median step time; compile_s is the first call minus
a median call (graph build + compile); first_call_s is the first call itself. With onnxruntime the model
is exported (random weights, backend "onnx", static batch) by a separate process first, so the measured
process holds onnxruntime alone; first_call_s then covers session creation and the first run.
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODES = ("graph", "pynative")
AMP_LEVELS = ("O0", "O1", "O2", "O3")


def build_parser(parser):
    _common.add_common_args(parser)
    parser.add_argument("--framework", choices=("mindspore", "onnxruntime"), default="mindspore")
    parser.add_argument("--mode", choices=MODES, default="graph")
    parser.add_argument("--amp_level", "--amp-level", choices=AMP_LEVELS, default="O0")
    parser.add_argument("--all", action="store_true", help="sweep the 11 official variants (inference)")
    parser.add_argument("--jit_level", "--jit-level", choices=("O0", "O1", "O2"), default=None,
                        help="ms.set_context(jit_config={'jit_level': ...}) (default: MindSpore's)")
    parser.add_argument("--memory_level", "--memory-level", choices=("O0", "O1"), default=None,
                        help="ms.runtime.set_memory(optimize_level=...): O1 = memory priority (default: MindSpore's)")
    return parser


def expand_runs(args):
    if args.framework == "onnxruntime" and args.task != "infer":
        raise SystemExit("--framework onnxruntime measures inference only: --task infer")
    settings = dict(framework=args.framework, batch_size=args.batch_size, img_size=args.img_size, mode=args.mode, device=args.device,
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


def model_step(net, task, batch_size, num_classes, seed, mark=lambda stage: None):
    """What a benchmark times for `net`: inference in eval mode, or one training step (`make_train_step`), on a
    fixed random batch drawn from `seed`. Returns (step: a call that blocks until its result is ready, the cell
    it compiles, that cell's inputs). `mark(stage)` is called after the inputs and after the train cell."""
    import mindspore as ms
    import numpy as np

    rng = np.random.default_rng(seed)
    x = ms.Tensor(rng.standard_normal((batch_size, 3, net.img_size, net.img_size), dtype=np.float32))
    labels = ms.Tensor(rng.integers(0, num_classes, batch_size).astype(np.int32))
    mark("inputs")
    if task == "infer":
        net.set_train(False)
        return (lambda: net(x).asnumpy()), net, (x,)
    net.set_train(True)
    train_step = make_train_step(net)
    mark("build_train_cell")
    return (lambda: train_step(x, labels).asnumpy()), train_step, (x, labels)


# Run by a separate python: the exported file's model, built from the seed (random weights time as trained ones)
EXPORT_SCRIPT = """
import sys, mindspore as ms, mindcv_volo
from mindcv_volo.engine.runtime import available_cores
from mindcv_volo.weights.export import export_onnx
model, img_size, num_classes, batch_size, seed, path = sys.argv[1:]
ms.set_seed(int(seed))
net = mindcv_volo.create(model, img_size=None if img_size == "None" else int(img_size), num_classes=int(num_classes),
                         backend="onnx")
net.set_train(False)
export_onnx(net, path, batch_size=int(batch_size))
print(net.img_size, available_cores())
"""


def onnxruntime_main(a):
    import numpy as np
    import onnxruntime as ort  # and nothing of MindSpore: the peak RSS is onnxruntime's

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        export = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, a["model"], str(a["img_size"]),
                                 str(a["num_classes"]), str(a["batch_size"]), str(a["seed"]), path],
                                capture_output=True, text=True, check=True)
        img_size, threads = map(int, export.stdout.split()[-2:])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = []
        x = np.random.default_rng(a["seed"]).standard_normal((a["batch_size"], 3, img_size, img_size),
                                                             dtype=np.float32)

        def step():
            if not session:  # the first call includes building the session, as MindSpore's includes compiling
                session.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
            return session[0].run(None, {"image": x})[0]

        return _common.measure(step, dict(a, img_size=img_size, mode="onnxruntime", threads=threads,
                                          version=ort.__version__))


def child_main(a):
    if a.get("framework") == "onnxruntime":
        return onnxruntime_main(a)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if a["mode"] == "graph" else ms.PYNATIVE_MODE)
    ms.set_device(a["device"])
    ms.set_seed(a["seed"])
    if a.get("jit_level"):
        ms.set_context(jit_config={"jit_level": a["jit_level"]})
    if a.get("memory_level"):
        ms.runtime.set_memory(optimize_level=a["memory_level"])
    import mindcv_volo
    from mindcv_volo.engine.runtime import compile_before_first_run, cpu_threads

    threads = cpu_threads() if a["device"] == "CPU" else None
    net = mindcv_volo.create(a["model"], img_size=a["img_size"], num_classes=a["num_classes"])
    img_size = net.img_size
    if a["amp_level"] != "O0":
        net = ms.amp.auto_mixed_precision(net, a["amp_level"])
        net.img_size = img_size
    step, cell, inputs = model_step(net, a["task"], a["batch_size"], a["num_classes"], a["seed"])

    def step_as_users_run_it():  # the first call compiles first, as train.py, validate.py and infer.py do
        compile_before_first_run(cell, *inputs)
        return step()

    return _common.measure(step_as_users_run_it, dict(a, img_size=img_size, framework="mindspore", threads=threads,
                                                      version=ms.__version__))

if __name__ == "__main__":
    sys.exit(_common.main(os.path.abspath(__file__), build_parser, child_main, expand_runs))
