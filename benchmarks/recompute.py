"""Peak memory and steady-state step time of one training step, with or without gradient checkpointing.

One run per process, one JSON line:

  python benchmarks/recompute.py                  # volo_d1_224, batch 8, 224 px, float32, GRAPH_MODE, CPU
  python benchmarks/recompute.py --recompute      # the same with model.set_grad_checkpointing(True)
  python benchmarks/recompute.py --paired         # both in one process, steps alternating: the time ratio

The step is benchmark.py's training step (forward, cross-entropy, value_and_grad, AdamW, one compiled graph).
It is compiled first (`compile_s`), then run until its time settles: the median of the last `--window` steps
within `--tolerance` of the median of the `--window` before them (at least `--min-warmup` steps, at most
`--max-warmup`; `settled` says whether it did). Then `--iters` timed steps give the step time.

Memory (resident set, MB; Linux; not with --paired):
- `peak_rss_mb`: the process's high-water mark over everything (imports, build, compile, every step);
- `compile_peak_rss_mb`: the high-water mark up to the end of the graph compile;
- `steps_peak_rss_mb`: the high-water mark while the steps run; before them the heap the compile freed is
  handed back to the system (malloc_trim) and the mark restarted (/proc/self/clear_refs), so that memory
  the steps reuse is counted as theirs;
- `step_memory_mb`: steps_peak_rss_mb minus the resident set just before the first step.

--paired builds both models and alternates their steps (warm-up until both settle, then `--iters` pairs in
alternating order), so both see the same machine load: on a shared machine the ratio of the two step times
(`time_ratio_median`, the median of per-pair ratios) holds where separate runs drift apart.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import has_settled, peak_rss_mb, reset_peak_rss, rss_mb, seconds_of, timing_summary  # noqa: E402
from benchmark import model_step  # noqa: E402


def settled(times, args):
    return has_settled(times, args.min_warmup, args.window, args.tolerance)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recompute", action="store_true", help="model.set_grad_checkpointing(True)")
    parser.add_argument("--paired", action="store_true", help="time both, alternating steps in one process")
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--img_size", "--img-size", type=int, default=None, help="default: the variant's own resolution")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=1000)
    parser.add_argument("--drop_path_rate", "--drop-path-rate", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2, help="MindSpore's CPU thread pool (op_tuning.threads_num)")
    parser.add_argument("--min_warmup", "--min-warmup", type=int, default=10)
    parser.add_argument("--max_warmup", "--max-warmup", type=int, default=40)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def setup(args):
    """GRAPH_MODE on the CPU, `args.threads` kernel threads (settable once, before any kernel runs)."""
    import mindspore as ms

    import mindcv_volo

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    img_size = args.img_size or mindcv_volo.data_config(args.model)["input_size"][-1]
    return dict(model=args.model, batch_size=args.batch_size, img_size=img_size, mode="graph",
                threads=args.threads, drop_path_rate=args.drop_path_rate, mindspore=ms.__version__)


def build_step(args, recompute):
    """A function running one training step of `args.model` on a fixed random batch (seeded: the same weights
    and batch for every model built), and the step cell to compile."""
    import mindspore as ms

    import mindcv_volo

    ms.set_seed(args.seed)
    net = mindcv_volo.create(args.model, img_size=args.img_size, num_classes=args.num_classes,
                             drop_path_rate=args.drop_path_rate)
    if recompute:
        net.set_grad_checkpointing(True)
    step, train_step, inputs = model_step(net, "train", args.batch_size, args.num_classes, args.seed)
    return step, (lambda: train_step.compile(*inputs))


def backend():
    """The backend the measured models were built for (they take the default)."""
    from mindcv_volo.models.backend import resolve_backend

    return str(resolve_backend())


def measure(args, settings):
    """One model: memory and steady-state step time."""
    from mindcv_volo.engine.runtime import release_free_heap

    step, compile_graph = build_step(args, args.recompute)
    rss_built = rss_mb("VmRSS")
    compile_s = seconds_of(compile_graph)
    compile_peak = peak_rss_mb()
    release_free_heap()  # the heap the compile freed goes back to the system: what the steps reuse counts as theirs
    reset_peak_rss()
    rss_compiled = rss_mb("VmRSS")
    first_call_s = seconds_of(step)
    warmup = []
    while len(warmup) < args.max_warmup and not settled(warmup, args):
        warmup.append(seconds_of(step))
    times = [seconds_of(step) for _ in range(args.iters)]
    steps_peak = rss_mb("VmHWM")
    return dict(
        settings, recompute=args.recompute, **timing_summary(times, args.batch_size), timed_steps=args.iters,
        warmup_steps=len(warmup), settled=settled(warmup, args), warmup_ms=[round(t * 1000) for t in warmup],
        compile_s=round(compile_s, 1), first_call_s=round(first_call_s, 2),
        peak_rss_mb=round(max(compile_peak, steps_peak)), compile_peak_rss_mb=round(compile_peak),
        steps_peak_rss_mb=round(steps_peak), step_memory_mb=round(steps_peak - rss_compiled),
        rss_built_mb=round(rss_built), rss_compiled_mb=round(rss_compiled))


def compare(args, settings):
    """Both models in this process, steps alternating: their step times under the same load."""
    steps = {}
    for recompute in (False, True):
        steps[recompute], compile_graph = build_step(args, recompute)
        compile_graph()
        steps[recompute]()  # the first call
    warmup = {False: [], True: []}
    while len(warmup[False]) < args.max_warmup and not all(settled(t, args) for t in warmup.values()):
        for recompute in (False, True):
            warmup[recompute].append(seconds_of(steps[recompute]))
    times = {False: [], True: []}
    for pair in range(args.iters):
        for recompute in ((False, True) if pair % 2 == 0 else (True, False)):
            times[recompute].append(seconds_of(steps[recompute]))
    ratios = [with_recompute / plain for plain, with_recompute in zip(times[False], times[True])]
    return dict(settings, recompute="paired", plain=timing_summary(times[False], args.batch_size),
                with_recompute=timing_summary(times[True], args.batch_size),
                time_ratio_median=round(statistics.median(ratios), 3), timed_pairs=args.iters,
                warmup_steps=len(warmup[False]), settled=all(settled(t, args) for t in warmup.values()))


def main():
    args = parse_args()
    settings = setup(args)
    record = compare(args, settings) if args.paired else measure(args, settings)
    print(json.dumps(dict(record, backend=backend(), load_avg_1min=round(os.getloadavg()[0], 2))),
          flush=True)


if __name__ == "__main__":
    main()
