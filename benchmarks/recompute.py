"""Peak memory and steady-state step time of one training step, with or without gradient checkpointing.

One run per process (run it twice to compare; the memory figures are this process's own), one JSON line:

  python benchmarks/recompute.py                  # volo_d1_224, batch 8, 224 px, float32, GRAPH_MODE, CPU
  python benchmarks/recompute.py --recompute      # the same with model.set_grad_checkpointing(True)

The step is benchmark.py's training step (forward, cross-entropy, value_and_grad, AdamW, one compiled graph).
It is compiled first (`compile_s`), then run until its time settles: the median of the last `--window` steps
within `--tolerance` of the median of the `--window` before them (at least `--min-warmup` steps, at most
`--max-warmup`; `settled` says whether it did). Then `--iters` timed steps give the step time.

Memory (resident set, MB; Linux):
- `peak_rss_mb`: the process's high-water mark over everything (imports, build, compile, every step);
- `compile_peak_rss_mb`: the high-water mark up to the end of the graph compile;
- `steps_peak_rss_mb`: the high-water mark while the steps run; before them the heap the compile freed is
  handed back to the system (malloc_trim) and the mark restarted (/proc/self/clear_refs), so that memory
  the steps reuse is counted as theirs;
- `step_memory_mb`: steps_peak_rss_mb minus the resident set just before the first step.
"""
import argparse
import ctypes
import ctypes.util
import json
import os
import re
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import make_train_step  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recompute", action="store_true", help="model.set_grad_checkpointing(True)")
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=None, help="default: the variant's own resolution")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--drop-path-rate", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2, help="MindSpore's CPU thread pool (op_tuning.threads_num)")
    parser.add_argument("--min-warmup", type=int, default=10)
    parser.add_argument("--max-warmup", type=int, default=40)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def rss_mb(field):
    """VmRSS / VmHWM of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) / 1024


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_heap():
    """Hand the heap's free pages back to the system (glibc malloc_trim), so that later use shows in the RSS."""
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def reset_peak_rss():
    """Restart the high-water mark from the current resident set (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def timed(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def warm_up(step, min_steps, max_steps, window, tolerance):
    """Run `step` until its time settles; returns (the warm-up step times, whether it settled)."""
    times = []
    while len(times) < max_steps:
        times.append(timed(step))
        if len(times) >= max(min_steps, 2 * window):
            before, last = statistics.median(times[-2 * window:-window]), statistics.median(times[-window:])
            if abs(last - before) <= tolerance * before:
                return times, True
    return times, False


def build_step(args):
    """The training step of `args.model` on a fixed random batch, and the settings it was built with."""
    import mindspore as ms
    import numpy as np

    ms.set_context(mode=ms.GRAPH_MODE)  # what is measured: the compiled training graph
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)  # before any kernel runs
    ms.set_seed(args.seed)
    import mindcv_volo
    from mindcv_volo.models.layers import uses_fused_cpu_kernels

    net = mindcv_volo.create(args.model, img_size=args.img_size, num_classes=args.num_classes,
                             drop_path_rate=args.drop_path_rate)
    if args.recompute:
        net.set_grad_checkpointing(True)
    net.set_train(True)
    rng = np.random.default_rng(args.seed)
    x = ms.Tensor(rng.standard_normal((args.batch_size, 3, net.img_size, net.img_size), dtype=np.float32))
    labels = ms.Tensor(rng.integers(0, args.num_classes, args.batch_size).astype(np.int32))
    train_step = make_train_step(net)
    settings = dict(model=args.model, recompute=args.recompute, batch_size=args.batch_size, img_size=net.img_size,
                    mode="graph", threads=args.threads, drop_path_rate=args.drop_path_rate,
                    fused_cpu_kernels=uses_fused_cpu_kernels(), mindspore=ms.__version__)
    return train_step, (x, labels), settings


def main():
    args = parse_args()
    train_step, inputs, settings = build_step(args)
    rss_built = rss_mb("VmRSS")
    compile_s = timed(lambda: train_step.compile(*inputs))
    compile_peak = peak_rss_mb()
    release_free_heap()
    reset_peak_rss()
    rss_compiled = rss_mb("VmRSS")

    def step():
        train_step(*inputs).asnumpy()

    first_call_s = timed(step)
    warmup_times, settled = warm_up(step, args.min_warmup, args.max_warmup, args.window, args.tolerance)
    times = [timed(step) for _ in range(args.iters)]
    steps_peak = rss_mb("VmHWM")
    median = statistics.median(times)
    print(json.dumps(dict(
        settings,
        step_ms_median=round(median * 1000, 1), step_ms_min=round(min(times) * 1000, 1),
        step_ms_max=round(max(times) * 1000, 1), img_per_s=round(args.batch_size / median, 3),
        timed_steps=args.iters, warmup_steps=len(warmup_times), settled=settled,
        warmup_ms=[round(t * 1000) for t in warmup_times], compile_s=round(compile_s, 1),
        first_call_s=round(first_call_s, 2),
        peak_rss_mb=round(max(compile_peak, steps_peak)), compile_peak_rss_mb=round(compile_peak),
        steps_peak_rss_mb=round(steps_peak), step_memory_mb=round(steps_peak - rss_compiled),
        rss_built_mb=round(rss_built), rss_compiled_mb=round(rss_compiled),
        load_avg_1min=round(os.getloadavg()[0], 2))), flush=True)


if __name__ == "__main__":
    main()
