"""Which primitives would the Ascend/GPU graph of VOLO hold, and does MindSpore list each for Ascend?

No accelerator here, so the check is static, from what this machine can compile:
1. A small VOLO is built with the device seam (`uses_cpu_paths`) forced to False, i.e. the cells take the
   path they take on GPU/Ascend, and compiled in GRAPH_MODE on CPU for inference and for a full training
   step (value_and_grad + AdamW), with `save_graphs` on. The CPU-path build is compiled too, for contrast.
2. The primitive names are read from the last optimized IR file of each graph.
3. Each primitive is looked up in MindSpore's own operator documentation (the "Supported Platforms" of
   `mindspore.ops.<Name>` in the installed 2.10 package).
4. The graphs are searched for host round-trips: PyExecute / PyInterpret nodes (Python run from inside the
   graph, e.g. shape logic on tensor values), which would break dataset sink mode and O2/O3 compilation.
5. The training step is built as train.py builds it: drop path on, its masks fed as step inputs (drawn on the
   host); it is searched for random-number primitives, which would draw from MindSpore's in-graph state (not
   restorable on resume, not reproducible from a seed on Ascend).

  python benchmarks/ascend_ops_check.py            # prints one table per graph; exit code 1 on a finding
"""
import glob
import os
import re
import sys
import tempfile

import numpy as np
import mindspore as ms
from mindspore import nn, ops

HOST_NODES = ("PyExecute", "PyInterpret", "PyFunc", "PyExecuteGrad")
RANDOM_NODES = ("UniformReal", "StandardNormal", "UniformInt", "RandomUniform", "Dropout", "DropoutGenMask",
                "RandExt", "RandLikeExt", "Bernoulli", "Multinomial")
# Graph plumbing that is not a device kernel
STRUCTURAL = {"Return", "MakeTuple", "TupleGetItem", "Depend", "UpdateState", "Load", "Partial", "Switch",
              "ListGetItem", "MakeList", "stop_gradient", "StopGradient", "J", "ZerosLike", "EnvironCreate",
              "EnvironGet", "EnvironSet", "Assign"}


# Primitives whose class carries no platform list, documented through their functional form
FUNCTIONAL = {"Add": "add", "Mul": "mul", "Muls": "mul", "Sub": "sub", "Erf": "erf", "Gather": "gather",
              "Concat": "cat", "Transpose": "transpose", "Reshape": "reshape", "ReLU": "relu",
              "StridedSlice": "strided_slice", "BroadcastTo": "broadcast_to", "Sqrt": "sqrt", "Rsqrt": "rsqrt",
              "Exp": "exp", "Neg": "neg", "Log": "log", "ExpandDims": "expand_dims", "Zeros": "zeros",
              "Equal": "equal", "MaskedFill": "masked_fill", "GatherD": "gather_elements", "SumExt": "sum",
              "PowTensorScalar": "pow", "SplitWithSize": "split", "AssignAdd": "assign_add", "Tile": "tile"}


def platforms(name):
    """'Supported Platforms' of mindspore.ops.<name> (or of its functional form) in the installed MindSpore;
    None for a gradient kernel or another primitive without a documented platform list."""
    for obj in (getattr(ops, name, None), getattr(ops, FUNCTIONAL.get(name, ""), None)):
        match = re.search(r"Supported Platforms:\s*\n\s*(.*)", (obj.__doc__ or "") if obj is not None else "")
        if match:
            return match.group(1).replace("``", "").split()
    return None


class LossWithMasks(nn.Cell):
    """Cross-entropy of the model fed its drop-path masks, as train.py's loss cells feed them."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model
        self.loss = nn.CrossEntropyLoss()

    def construct(self, x, labels, drop_masks):
        return self.loss(self.model(x, drop_masks), labels)


def compiled_primitives(build, train, ir_dir):
    ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=ir_dir)
    net = build()
    x = ms.Tensor(np.zeros((2, 3, 64, 64), np.float32))
    if train:
        net.set_train(True)
        masks = ms.Tensor(np.ones((len(net.drop_path_keep_probs()), 2), np.float32))
        optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3)
        step = nn.TrainOneStepCell(LossWithMasks(net), optimizer)
        step(x, ms.Tensor(np.zeros(2, np.int32)), masks)
    else:
        net.set_train(False)
        net(x)
    ms.set_context(save_graphs=0)
    # the front end's final graph (after automatic differentiation), before any backend lowering
    text = open(glob.glob(os.path.join(ir_dir, "*_validate_*.ir"))[-1]).read()
    names = set(re.findall(r"PrimFunc_([A-Za-z0-9]+)\(", text))
    names |= {n for n in re.findall(r"= ([A-Z][A-Za-z0-9]+)\(", text) if hasattr(ops, n)}
    host = sorted(h for h in HOST_NODES + RANDOM_NODES if re.search(rf"\b{h}\b", text))
    return sorted(names - STRUCTURAL), host


def build_tiny(cpu_paths):
    import mindcv_volo.models.layers as layers

    original = layers.uses_cpu_paths
    layers.uses_cpu_paths = lambda: cpu_paths
    try:
        import mindcv_volo.models.volo as volo
        volo.uses_cpu_paths = layers.uses_cpu_paths
        return volo.VOLO(layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), img_size=64,
                         num_classes=10, drop_path_rate=0.1)
    finally:
        layers.uses_cpu_paths = original
        volo.uses_cpu_paths = original


def main():
    ms.set_device("CPU")
    findings = 0
    for label, cpu_paths in (("accelerator path (GPU/Ascend)", False), ("CPU path", True)):
        for train in (False, True):
            with tempfile.TemporaryDirectory() as ir_dir:
                names, host = compiled_primitives(lambda: build_tiny(cpu_paths), train, ir_dir)
            print(f"\n## {label}, {'training step' if train else 'inference'}: {len(names)} primitives")
            if host:
                print("HOST ROUND-TRIP OR IN-GRAPH RANDOM NODES:", ", ".join(host))
                findings += not cpu_paths
            for name in names:
                # gradient kernels come with the forward op they differentiate
                supported = None if re.search("Grad|Backprop|Backward", name) else platforms(name)
                ascend = "Ascend" in supported if supported else None
                mark = {True: "Ascend listed", False: "NOT LISTED FOR ASCEND", None: "gradient/internal"}[ascend]
                findings += (ascend is False) and not cpu_paths
                print(f"  {name:28s} {mark:26s} {' '.join(supported or [])}")
    print(f"\nfindings on the accelerator path: {findings}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
