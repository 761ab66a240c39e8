"""Which primitives do VOLO's Ascend/GPU graphs hold, does MindSpore list each for Ascend, any host round-trip?

No accelerator here, so the check is static, from what this machine can compile:
1. A small VOLO is built in the accelerator formulation (backend "portable": the cells take the path they take
   on GPU/Ascend) and compiled in GRAPH_MODE on CPU with `save_graphs` on:
   the float32 inference graph (what export writes) and train.py's own step (`engine.step.build_training`)
   under the Ascend recipe `configs/volo_d1_ascend.yaml` (AMP O2, dynamic loss scale, token labeling from
   label maps with MixToken, MindCV's AdamW), with clipping and EMA switched on as well.
2. The primitive names are read from the front end's final IR files (`*_validate_*.ir`, after automatic
   differentiation), every graph compiled on the way.
3. Each primitive is looked up in MindSpore's own operator documentation (the "Supported Platforms" of
   `mindspore.ops.<Name>`, or of its functional form, in the installed package).
4. Findings: a primitive not listed for Ascend; any `Custom` primitive (this project's custom ops are the fused
   CPU kernels, compiled for this machine's CPU; `ops.Custom`'s own documentation lists every platform); a host
   round-trip: a PyExecute / PyInterpret / PyFunc node (Python run from inside the graph, e.g. numpy on tensor
   values), or a node pinned to the host (`primitive_target: "CPU"`); a forward primitive without a documented
   platform list (it cannot be checked). Gradient kernels (no platform list of their own) come with the
   forward op they differentiate.
5. train.py's step (drop path on, its masks fed as step inputs drawn on the host) is searched for random-number
   primitives: they would draw from MindSpore's in-graph state, which a resumed run cannot restore and Ascend
   does not reproduce from a seed.

  python benchmarks/ascend_ops_check.py            # one table per graph; exit code 1 on a finding
In Python (the test suite): `check_accelerator_graphs()` -> {graph: Report}; `compiled_primitives(run)` and
`findings(primitives, host_nodes)` for any other graph.
"""
import glob
import json
import os
import re
import sys
import tempfile
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASCEND_RECIPE = os.path.join(ROOT, "configs", "volo_d1_ascend.yaml")

HOST_NODES = ("PyExecute", "PyInterpret", "PyFunc", "PyExecuteGrad")
RANDOM_NODES = ("UniformReal", "StandardNormal", "UniformInt", "RandomUniform", "Dropout", "DropoutGenMask",
                "RandExt", "RandLikeExt", "Bernoulli", "Multinomial")
HOST_PIN = 'primitive_target: "CPU"'
# Graph plumbing that is not a device kernel
STRUCTURAL = {"Return", "MakeTuple", "TupleGetItem", "Depend", "UpdateState", "Load", "Partial", "Switch",
              "ListGetItem", "MakeList", "stop_gradient", "StopGradient", "J", "ZerosLike", "EnvironCreate",
              "EnvironGet", "EnvironSet", "Assign"}
CUSTOM = "Custom"

# Primitives whose class carries no platform list, documented through their functional form
FUNCTIONAL = {"Add": "add", "Mul": "mul", "Muls": "mul", "Sub": "sub", "Erf": "erf", "Gather": "gather",
              "Concat": "cat", "Transpose": "transpose", "Reshape": "reshape", "ReLU": "relu",
              "StridedSlice": "strided_slice", "BroadcastTo": "broadcast_to", "Sqrt": "sqrt", "Rsqrt": "rsqrt",
              "Exp": "exp", "Neg": "neg", "Log": "log", "ExpandDims": "expand_dims", "Zeros": "zeros",
              "Equal": "equal", "MaskedFill": "masked_fill", "GatherD": "gather_elements", "SumExt": "sum",
              "PowTensorScalar": "pow", "SplitWithSize": "split", "AssignAdd": "assign_add", "Tile": "tile",
              "GreaterEqual": "greater_equal", "IsFinite": "isfinite", "LogSoftmax": "log_softmax",
              "Maximum": "maximum", "Minimum": "minimum", "ReverseV2": "flip", "Select": "select",
              "Square": "square", "Divs": "div"}

# The small VOLO of the check (every stage, compiled in seconds) and its input size
TINY = dict(layers=[1, 1, 1, 1], embed_dims=[32, 64, 64, 64], num_heads=[2, 4, 4, 4], img_size=64)
NUM_CLASSES, BATCH, TOPK = 10, 2, 5


class Report(NamedTuple):
    """One compiled graph: its primitives (sorted), the host round-trip nodes in it, and the findings."""
    primitives: list
    host_nodes: list
    findings: list


def platforms(name):
    """'Supported Platforms' of mindspore.ops.<name> (or of its functional form) in the installed MindSpore;
    None for a gradient kernel or another primitive without a documented platform list."""
    for obj in (getattr(ops, name, None), getattr(ops, FUNCTIONAL.get(name, ""), None)):
        match = re.search(r"Supported Platforms:\s*\n\s*(.*)", (obj.__doc__ or "") if obj is not None else "")
        if match:
            return match.group(1).replace("``", "").split()
    return None


def is_gradient(name):
    return re.search("Grad|Backprop|Backward", name) is not None


def findings(primitives, host_nodes):
    """What would keep these primitives and host nodes off an Ascend device: one line each, none if all is well."""
    found = [f"in-graph random: {node} (not restorable on resume, not reproducible on Ascend)"
             if node in RANDOM_NODES else f"host round-trip: {node}" for node in host_nodes]
    for name in primitives:
        if name == CUSTOM:
            found.append(f"{name}: a custom op (this project's are the fused CPU kernels, built for this CPU)")
        elif not is_gradient(name):
            supported = platforms(name)
            if supported is None:
                found.append(f"{name}: no platform list in MindSpore's documentation; check it by hand and add "
                             "its documented functional form to FUNCTIONAL")
            elif "Ascend" not in supported:
                found.append(f"{name}: not listed for Ascend (Supported Platforms: {' '.join(supported)})")
    return found


def compiled_primitives(run):
    """(primitives, host round-trip nodes) of every graph that `run()` compiles in GRAPH_MODE on this machine."""
    previous_mode = ms.get_context("mode")
    with tempfile.TemporaryDirectory() as ir_dir:
        ms.set_context(mode=ms.GRAPH_MODE, save_graphs=1, save_graphs_path=ir_dir)
        try:
            run()
        finally:
            ms.set_context(save_graphs=0, mode=previous_mode)
        # the front end's final graphs (after automatic differentiation), before any backend lowering
        text = "\n".join(open(path, encoding="utf-8").read()
                         for path in sorted(glob.glob(os.path.join(ir_dir, "*_validate_*.ir"))))
    if not text:
        raise RuntimeError("no graph was compiled: nothing to check")
    names = set(re.findall(r"PrimFunc_([A-Za-z0-9]+)\(", text))
    names |= {n for n in re.findall(r"= ([A-Z][A-Za-z0-9]+)\(", text) if hasattr(ops, n)}
    host = sorted(h for h in HOST_NODES if h in text) + ([HOST_PIN] if HOST_PIN in text else [])
    host += [name for name in RANDOM_NODES if re.search(rf"\b{name}\b", text)]
    return sorted(names - STRUCTURAL), host


def tiny_model(drop_path_rate=0.0):
    """A small VOLO in the GPU/Ascend formulation, on any device."""
    from mindcv_volo.models import VOLO
    from mindcv_volo.models.volo import ARCHS

    return VOLO(**{**ARCHS["d1"], **TINY, "num_classes": NUM_CLASSES, "drop_path_rate": drop_path_rate},
                backend="portable")


def run_inference():
    """The float32 eval graph, as export and validate.py (at O0) compile it."""
    from mindcv_volo.engine.evaluate import EvalNetwork

    network = EvalNetwork(tiny_model())
    network.set_train(False)
    network(ms.Tensor(np.zeros((BATCH, 3, TINY["img_size"], TINY["img_size"]), np.float32)))


def recipe_config():
    """The Ascend recipe, shrunk to the tiny model and one short epoch, with clipping and EMA on."""
    from mindcv_volo.engine.config import parse_config

    return parse_config(["-c", ASCEND_RECIPE, "--num_classes", str(NUM_CLASSES), "--arch_overrides",
                         json.dumps(TINY), "--batch_size", str(BATCH),
                         "--epoch_size", "1", "--warmup_epochs", "0", "--cooldown_epochs", "0",
                         "--clip_grad", "True", "--ema", "True"])


def run_train_step():
    """One update of train.py's compiled step under the Ascend recipe, on label-map inputs of the loader's
    shapes and dtypes (token_label_dir only chooses the loss here; no map is read)."""
    from mindcv_volo.engine.step import build_training
    from mindcv_volo.engine.runtime import Runtime
    from mindcv_volo.token_labeling.training import build_token_label_loss

    config = recipe_config()
    runtime = Runtime(ms.get_context("device_target"), 0, 0, 1, 1)
    training = build_training(config, tiny_model(config.model.drop_path_rate), NUM_CLASSES, runtime, 1, build_token_label_loss)
    if training.amp_level != config.train_step.amp_level or not training.dynamic_scale:
        raise RuntimeError(f"the step runs AMP {training.amp_level}, not the recipe's {config.train_step.amp_level}")
    rng = np.random.default_rng(0)
    size, tokens = TINY["img_size"], (TINY["img_size"] // 16) ** 2
    batch = (rng.standard_normal((BATCH, 3, size, size)).astype(np.float32),
             rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
             rng.integers(0, NUM_CLASSES, (BATCH, TOPK)).astype(np.int32),
             rng.standard_normal((BATCH, TOPK)).astype(np.float32),
             rng.integers(0, NUM_CLASSES, (BATCH, tokens, TOPK)).astype(np.int32),
             rng.standard_normal((BATCH, tokens, TOPK)).astype(np.float32))
    training.update_step(*training.loss_network.step_inputs(batch, 0, 0))


ACCELERATOR_GRAPHS = {"inference (float32)": run_inference,
                      "train.py step (Ascend recipe: O2, dynamic loss scale, token labels, MixToken)": run_train_step}


def check_accelerator_graphs():
    """{graph: Report} for the accelerator formulation's graphs, compiled on this machine."""
    reports = {}
    for label, run in ACCELERATOR_GRAPHS.items():
        names, host = compiled_primitives(run)
        reports[label] = Report(names, host, findings(names, host))
    return reports


def main():
    ms.set_device("CPU")
    reports = check_accelerator_graphs()
    for label, report in reports.items():
        print(f"\n## accelerator formulation (GPU/Ascend), {label}: {len(report.primitives)} primitives")
        if report.host_nodes:
            print("HOST ROUND-TRIP NODES:", ", ".join(report.host_nodes))
        for name in report.primitives:
            supported = None if is_gradient(name) else platforms(name)
            mark = ("CUSTOM OP" if name == CUSTOM else "gradient" if is_gradient(name) else
                    "NO PLATFORM LIST" if supported is None else
                    "Ascend listed" if "Ascend" in supported else "NOT LISTED FOR ASCEND")
            print(f"  {name:28s} {mark:26s} {' '.join(supported or [])}")
        for finding in report.findings:
            print(f"FINDING: {finding}")
    total = sum(len(report.findings) for report in reports.values())
    print(f"\nfindings on the accelerator formulation: {total}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
