"""Resident memory (RSS) of a VOLO run, stage by stage: where the process's memory goes before and during the calls.

One JSON line per run, each run in a fresh process (so runs never see each other's memory):

  python benchmarks/memory_profile.py --task infer --batch-size 8
  python benchmarks/memory_profile.py --task train --batch-size 1 2 4 8        # one run per batch size, + slope
  python benchmarks/memory_profile.py --task train --threads 2 --recompute
  python benchmarks/memory_profile.py --task infer --env MALLOC_ARENA_MAX=2 --memory-level O1 --jit-level O1
  ~/torchenv/bin/python benchmarks/memory_profile.py --framework torch --task train   # timm, same stages

Stages (MindSpore): `start` (the bare interpreter), `import_framework` (mindspore), `configure` (context, thread
pool, memory options), `import_model_code` (mindcv_volo, which imports mindcv), `build_model`, `inputs`,
`build_train_cell` (training: the optimizer's moments), then `call_1` (compile + first run), `call_2`, ...
For each stage: `rss_mb` after it, `anon_mb` / `file_mb` (anonymous memory / pages of mapped files, mostly
the framework's shared libraries: both count in RSS), `heap_mb` / `heap_free_mb` / `mmap_mb` (glibc's malloc,
all arenas: obtained from the system by the heaps, free inside them, in direct mmap chunks), `peak_mb` = the
high-water mark during that stage (the kernel's VmHWM, reset before each stage through /proc/self/clear_refs),
`threads`. `peak_rss_mb` is the process's high-water mark, the figure `benchmark.py` reports (ru_maxrss; the
resets lower what ru_maxrss reads, so here it is the largest stage peak). `param_mb` is the parameters'
float32 size. With several batch sizes the parent adds `slope_mb_per_image` (least squares of peak_rss_mb on
the batch size).

Options that change MindSpore's memory behaviour: `--threads N` (device_context.cpu.op_tuning.threads_num,
default: MindSpore's own, 25), `--jit-level`, `--memory-level` (ms.runtime.set_memory optimize_level),
`--pool-init/--pool-increase/--pool-max` (the other set_memory sizes, e.g. 1GB), `--recompute [CLASSES]`
(Cell.recompute() on every cell of these class names, by default every Outlooker/Transformer/ClassBlock),
`--compile-first` (Cell.compile() as its own stage), `--trim` (compile first, then glibc's malloc_trim(0) before the first call), `--env K=V`
(set in the child before any import: MS_ALLOC_CONF, MS_DEV_*, MALLOC_ARENA_MAX, LD_PRELOAD, ...).
`--timeline` samples RSS every 2 ms in a thread during each call and reports when the peak came, as a
fraction of the call.
"""
import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import proc_status_kb, reset_peak_rss  # noqa: E402

RESULT_PREFIX = "MEMORY_PROFILE "


def _status():
    return proc_status_kb("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _malloc_info():
    """glibc's heap, all arenas (mallinfo2): `heap_mb` obtained from the system by sbrk/arena heaps,
    `heap_free_mb` of it free inside malloc (held, not returned), `mmap_mb` in direct mmap chunks."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return dict(heap_mb=round(info.arena / 2 ** 20, 1), heap_free_mb=round(info.fordblks / 2 ** 20, 1),
                mmap_mb=round(info.hblkhd / 2 ** 20, 1))


class Stages:
    def __init__(self):
        self.records = []
        self.resettable = reset_peak_rss()

    def mark(self, name, **extra):
        s = _status()
        self.records.append(dict(stage=name, rss_mb=round(s["VmRSS"] / 1024, 1), anon_mb=round(s["RssAnon"] / 1024, 1),
                                 file_mb=round(s["RssFile"] / 1024, 1),
                                 peak_mb=round(s["VmHWM"] / 1024, 1) if self.resettable else None,
                                 threads=s["Threads"], **_malloc_info(), **extra))
        reset_peak_rss()


class Sampler:
    """RSS every `interval` s in a thread during a call; the time of the peak as a fraction of the call."""

    def __init__(self, interval=0.002):
        self.interval, self.samples, self.running = interval, [], False

    def __enter__(self):
        self.running, self.samples, self.start = True, [], time.perf_counter()
        page = os.sysconf("SC_PAGE_SIZE")

        def run():
            with open("/proc/self/statm") as f:
                while self.running:
                    f.seek(0)
                    self.samples.append((time.perf_counter(), int(f.read().split()[1]) * page / 2 ** 20))
                    time.sleep(self.interval)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.end = time.perf_counter()

    def summary(self):
        if not self.samples:
            return {}
        t_peak, peak = max(self.samples, key=lambda s: s[1])
        return dict(sampled_peak_mb=round(peak, 1), peak_at=round((t_peak - self.start) / (self.end - self.start), 3),
                    samples=len(self.samples))


def run_calls(stages, step, calls, timeline):
    for i in range(calls):
        start = time.perf_counter()
        if timeline:
            with Sampler() as sampler:
                step()
            extra = sampler.summary()
        else:
            step()
            extra = {}
        stages.mark(f"call_{i + 1}", seconds=round(time.perf_counter() - start, 2), **extra)


def child_mindspore(a, stages):
    import numpy as np
    import mindspore as ms

    stages.mark("import_framework")
    ms.set_context(mode=ms.GRAPH_MODE if a["mode"] == "graph" else ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(a["seed"])
    if a["threads"]:
        ms.device_context.cpu.op_tuning.threads_num(a["threads"])
    if a["jit_level"]:
        ms.set_context(jit_config={"jit_level": a["jit_level"]})
    memory = {k: a[f"pool_{k}"] for k in ("init", "increase", "max") if a[f"pool_{k}"]}
    if memory or a["memory_level"]:
        kwargs = {f"{k}_size": v for k, v in memory.items()}
        if a["memory_level"]:
            kwargs["optimize_level"] = a["memory_level"]
        ms.runtime.set_memory(**kwargs)
    stages.mark("configure")
    import mindcv_volo
    from benchmark import model_step  # the step benchmark.py times

    stages.mark("import_model_code", module=os.path.dirname(mindcv_volo.__file__))
    net = mindcv_volo.create(a["model"], img_size=a["img_size"], num_classes=a["num_classes"])
    param_mb = sum(int(np.prod(p.shape)) for p in net.get_parameters()) * 4 / 2 ** 20
    if a["recompute"]:
        names = a["recompute"].split(",")
        for _, cell in net.cells_and_names():
            if type(cell).__name__ in names:
                cell.recompute()
    stages.mark("build_model", param_mb=round(param_mb, 1))
    step, compiled, compile_args = model_step(net, a["task"], a["batch_size"], a["num_classes"], a["seed"],
                                              stages.mark)
    if a["compile_first"] or a["trim"]:
        compiled.compile(*compile_args)  # graph build + kernel build, no run
        stages.mark("compile")
    if a["trim"]:
        from mindcv_volo.engine.runtime import release_free_heap

        release_free_heap()
        stages.mark("malloc_trim")
    run_calls(stages, step, a["calls"], a["timeline"])
    extra = dict(framework="mindspore", version=ms.__version__, param_mb=round(param_mb, 1))
    try:
        stats = ms.runtime.memory_stats()
        extra["pool_max_reserved_mb"] = round(stats.get("max_reserved_memory", 0) / 2 ** 20, 1)
        extra["pool_max_allocated_mb"] = round(stats.get("max_allocated_memory", 0) / 2 ** 20, 1)
    except Exception:  # noqa: BLE001  (only a report)
        pass
    return extra


def child_torch(a, stages):
    import torch

    stages.mark("import_framework")
    torch.set_num_threads(a["threads"] or 2)
    torch.manual_seed(a["seed"])
    stages.mark("configure")
    from reference_torch import timm_step

    step, _, param_mb = timm_step(a, stages.mark)
    run_calls(stages, step, a["calls"], a["timeline"])
    return dict(framework="torch+timm", version=torch.__version__, param_mb=round(param_mb, 1))


def child_main(a):
    stages = Stages()
    stages.mark("start")
    extra = (child_torch if a["framework"] == "torch" else child_mindspore)(a, stages)
    # Resetting VmHWM also resets what ru_maxrss reads, so the process's peak is the largest stage peak.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [s["peak_mb"] for s in stages.records if s["peak_mb"] is not None]
    record = dict(a, **extra, peak_rss_mb=round(max(peaks + [maxrss])), stages=stages.records)
    record["rss_before_first_call_mb"] = next(s["rss_mb"] for s in reversed(stages.records)
                                              if not s["stage"].startswith("call_"))
    return record


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=("mindspore", "torch"), default="mindspore")
    p.add_argument("--model", default="volo_d1_224")
    p.add_argument("--task", choices=("infer", "train"), default="infer")
    p.add_argument("--batch_size", "--batch-size", type=int, nargs="+", default=[8])
    p.add_argument("--img_size", "--img-size", type=int, default=None)
    p.add_argument("--num_classes", "--num-classes", type=int, default=1000)
    p.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    p.add_argument("--calls", type=int, default=3, help="calls measured one by one (the first compiles)")
    p.add_argument("--threads", type=int, default=None, help="MindSpore: threads_num (default MindSpore's); torch: 2")
    p.add_argument("--jit_level", "--jit-level", choices=("O0", "O1", "O2"), default=None)
    p.add_argument("--memory_level", "--memory-level", choices=("O0", "O1"), default=None)
    p.add_argument("--pool_init", "--pool-init", default=None, help="set_memory init_size, e.g. 1GB")
    p.add_argument("--pool_increase", "--pool-increase", default=None, help="set_memory increase_size")
    p.add_argument("--pool_max", "--pool-max", default=None, help="set_memory max_size")
    p.add_argument("--recompute", nargs="?", const="Outlooker,Transformer,ClassBlock", default=None,
                   metavar="CLASSES", help="Cell.recompute() on every cell of these classes (default: every block)")
    p.add_argument("--compile_first", "--compile-first", action="store_true",
                   help="MindSpore: Cell.compile() as a stage of its own before the first call")
    p.add_argument("--trim", action="store_true",
                   help="MindSpore: compile first, then malloc_trim(0) (return glibc's free heap) before the calls")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment of the child")
    p.add_argument("--timeline", action="store_true", help="sample RSS during each call")
    p.add_argument("--label", default=None, help="a name for the run, copied into the record")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        print(RESULT_PREFIX + json.dumps(child_main(json.loads(sys.argv[2]))), flush=True)
        return 0
    args = parse_args()
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    records = []
    for batch in args.batch_size:
        settings = {k: v for k, v in vars(args).items() if k != "batch_size"}
        settings["batch_size"] = batch
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(settings)],
                              capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
        if not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            record = dict(settings, error=f"exit code {proc.returncode}: " + " | ".join(tail))
        else:
            record = json.loads(lines[-1][len(RESULT_PREFIX):])
        records.append(record)
        print(json.dumps(record), flush=True)
    good = [r for r in records if "error" not in r]
    if len(good) >= 2:
        xs, ys = [r["batch_size"] for r in good], [r["peak_rss_mb"] for r in good]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(json.dumps(dict(summary="peak_rss_mb vs batch", batch_sizes=xs, peak_rss_mb=ys,
                              slope_mb_per_image=round(slope, 1), intercept_mb=round(my - slope * mx, 1),
                              label=args.label)), flush=True)
    return 1 if len(good) < len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
