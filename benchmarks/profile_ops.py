"""Where a step's time goes: MindSpore's Profiler over a few steps, summed by op type.

  python benchmarks/profile_ops.py --task infer                  # volo_d1_224, batch 8, graph mode
  python benchmarks/profile_ops.py --task train --steps 2

Prints milliseconds per step by op type ("Custom" = this project's fused CPU kernels). The times are the CPU
kernels' own, summed; the step's wall time is longer by the runtime's gaps between kernels. Only the op
types are summed: on CPU MindSpore 2.10's profile gives every kernel of one type the scope of one of them
(all 74 Transposes of an inference step appear under `patch_embed`), so per-cell or forward/backward sums
from it would be wrong. The raw profile stays in --out.
"""
import argparse
import collections
import csv
import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import make_train_step  # noqa: E402


def ms_per_op_type(rows, steps):
    """{op type: (ms per step, kernels)} from the Profiler's per-op rows."""
    totals = collections.Counter()
    counts = collections.Counter()
    for row in rows:
        totals[row["op_type"]] += float(row["op_total_time(ms)"]) / steps
        counts[row["op_type"]] += 1
    return {op: (totals[op], counts[op]) for op, _ in totals.most_common()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--task", choices=("infer", "train"), default="infer")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after two unprofiled ones")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None, help="folder for the raw profile (default: a temporary one)")
    args = parser.parse_args()

    import numpy as np
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    import mindcv_volo

    net = mindcv_volo.create(args.model)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((args.batch_size, 3, net.img_size, net.img_size), dtype=np.float32))
    if args.task == "infer":
        net.set_train(False)
        step = lambda: net(x).asnumpy()  # noqa: E731
    else:
        net.set_train(True)
        train_step = make_train_step(net)
        labels = ms.Tensor(rng.integers(0, 1000, args.batch_size).astype(np.int32))
        step = lambda: train_step(x, labels).asnumpy()  # noqa: E731
    step()
    step()
    out = args.out or tempfile.mkdtemp(prefix="volo_profile_")
    profiler = ms.Profiler(output_path=out)
    for _ in range(args.steps):
        step()
    profiler.analyse()
    details = glob.glob(os.path.join(out, "**", "cpu_op_detail_info_*.csv"), recursive=True)
    if not details:
        sys.exit(f"error: the Profiler wrote no cpu_op_detail_info_*.csv under {out}")
    with open(details[0], newline="") as f:
        totals = ms_per_op_type(list(csv.DictReader(f)), args.steps)
    total = sum(ms for ms, _ in totals.values())
    print(f"{args.model}, batch {args.batch_size}, {args.task}: {total:.0f} ms of kernel time per step "
          f"(raw profile: {out})")
    print("| op type | ms/step | share | kernels in the graph |\n|---|---|---|---|")
    for op, (ms_per_step, kernels) in list(totals.items())[:args.top]:
        print(f"| {op} | {ms_per_step:.1f} | {100 * ms_per_step / total:.1f}% | {kernels} |")


if __name__ == "__main__":
    main()
