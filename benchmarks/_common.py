"""Framework-free plumbing shared by the benchmarks (MindSpore) and `reference_torch.py` (PyTorch): options,
resident-memory readings, the steady-state rule, timing, child processes.

Imports neither MindSpore nor torch: the reference runs in its own virtualenv with its own python and
imports this file from the script's folder. Each measured run happens in a fresh child process (the
script re-runs itself with `--child`), so the peak RSS of one run never includes another run's.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CHILD_FLAG = "--child"
RESULT_PREFIX = "BENCH_RESULT "


def add_option(parser, name, **kwargs):
    """`--name` in snake_case, as every entry point of the project spells its options; the dashed form works too."""
    dashed = name.replace("_", "-")
    parser.add_argument(f"--{name}", *([f"--{dashed}"] if dashed != name else []), **kwargs)


def warmup_count(text):
    return text if text == "auto" else int(text)


def add_common_args(parser, default_device="CPU"):
    add_option(parser, "model", default="volo_d1_224", help="registered model name")
    add_option(parser, "batch_size", type=int, default=8)
    add_option(parser, "img_size", type=int, default=None, help="default: the variant's own resolution")
    add_option(parser, "task", choices=("infer", "train"), default="infer",
               help="infer: forward in eval mode; train: one AdamW + cross-entropy step")
    add_option(parser, "warmup", type=warmup_count, default="auto",
               help="untimed calls after the first (compiling) call; auto: until the step time settles")
    add_option(parser, "iters", type=int, default=10, help="timed calls; img/s is their median")
    add_option(parser, "num_classes", type=int, default=1000)
    add_option(parser, "seed", type=int, default=0)
    add_option(parser, "device", default=default_device)
    return parser


def peak_rss_mb():
    """High-water mark of this process's resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def proc_status_kb(*fields):
    """{field: kB} of /proc/self/status lines such as VmRSS, VmHWM, RssAnon, RssFile, Threads (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in fields:
                values[key] = int(value.split()[0])
    return values


def rss_mb(field="VmRSS"):
    """VmRSS (now) or VmHWM (the high-water mark since the last `reset_peak_rss`) of this process, in MB."""
    return proc_status_kb(field)[field] / 1024


def process_tree_cpu_seconds(root=None):
    """User + system CPU seconds of a process and of every live descendant (its data workers), threads
    included, from /proc (Linux). A run's share of the cores, whatever else the machine is doing."""
    root = root or os.getpid()
    parents, times = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, grown = {root}, True
    while grown:
        members = {pid for pid, parent in parents.items() if parent in tree} | tree
        grown, tree = len(members) > len(tree), members
    return sum(times.get(pid, 0.0) for pid in tree)


def reset_peak_rss():
    """Restart VmHWM from the current resident set (Linux >= 4.0; ru_maxrss is not affected); False where the
    kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# Steady state: MindSpore's oneDNN matmuls tune themselves over their first launches and the allocators grow,
# so calls 2-12 can run ~10% faster or slower than call 100. `auto` warm-up makes at least MIN_WARMUP calls,
# then windows of SETTLE_WINDOW calls until two successive window medians are within SETTLE_TOLERANCE (at
# most MAX_WARMUP calls; the record says how many were made and whether the time settled).
MIN_WARMUP, SETTLE_WINDOW, SETTLE_TOLERANCE, MAX_WARMUP = 20, 5, 0.03, 80


def seconds_of(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def has_settled(times, min_calls=MIN_WARMUP, window=SETTLE_WINDOW, tolerance=SETTLE_TOLERANCE):
    """Whether the median of the last `window` times is within `tolerance` of the median of the `window`
    before them, after at least `min_calls` calls."""
    if len(times) < max(min_calls, 2 * window):
        return False
    before, last = statistics.median(times[-2 * window:-window]), statistics.median(times[-window:])
    return abs(last - before) <= tolerance * before


def warm_up(step, warmup):
    """Untimed calls of `step` after the first: `warmup` of them, or (`auto`) until the time settles.
    Returns (calls made, whether the time settled; None for a fixed count)."""
    if warmup != "auto":
        for _ in range(warmup):
            step()
        return warmup, None
    calls = [seconds_of(step) for _ in range(MIN_WARMUP - SETTLE_WINDOW)]
    while len(calls) < MAX_WARMUP:
        calls += [seconds_of(step) for _ in range(SETTLE_WINDOW)]
        if has_settled(calls):
            return len(calls), True
    return len(calls), False


def timing_summary(times, batch_size):
    """img/s from the median of `times` (seconds per call of `batch_size` images), and the spread in ms."""
    median = statistics.median(times)
    return dict(img_per_s=round(batch_size / median, 3), step_ms_median=round(median * 1000, 1),
                step_ms_min=round(min(times) * 1000, 1), step_ms_max=round(max(times) * 1000, 1))


def time_calls(step, batch_size, warmup, iters):
    """Call `step()` (which must block until its result is ready) once, warm it up (`warm_up`), then time
    `iters` calls. Returns the first call's seconds (graph compile + first run) and the timing summary."""
    first_call_s = seconds_of(step)
    warmup_calls, settled = warm_up(step, warmup)
    times = [seconds_of(step) for _ in range(iters)]
    median = statistics.median(times)
    return dict(
        **timing_summary(times, batch_size),
        first_call_s=round(first_call_s, 2),
        # what the first call cost beyond an ordinary call: graph build + compile (+ allocator warm-up)
        compile_s=round(max(first_call_s - median, 0.0), 2),
        warmup_calls=warmup_calls,
        settled=settled,
    )


def measure(step, settings):
    """Time `step` (see `time_calls`) and return the run's record: settings, timings, peak RSS."""
    rss_before_mb = peak_rss_mb()
    timing = time_calls(step, settings["batch_size"], settings["warmup"], settings["iters"])
    return dict(settings, **timing, peak_rss_mb=round(peak_rss_mb()), rss_before_run_mb=round(rss_before_mb))


def emit(record):
    """The child's single result line, found by the parent among the framework's own output."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_child(script, child_args, timeout=None, python=None, env=None):
    """Run `script --child <json>` in a fresh process; return its result record (or an error record)."""
    cmd = [python or sys.executable, script, CHILD_FLAG, json.dumps(child_args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(child_args, error=f"timed out after {timeout} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(child_args, error=f"exit code {proc.returncode}: " + " | ".join(tail))


def main(script, build_parser, child_main, expand_runs):
    """Entry point shared by both benchmarks: a child measures one run, the parent spawns one child per run."""
    if len(sys.argv) >= 3 and sys.argv[1] == CHILD_FLAG:
        emit(child_main(json.loads(sys.argv[2])))
        return 0
    parser = build_parser(argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    add_option(parser, "timeout", type=float, default=3600, help="seconds allowed for one run")
    args = parser.parse_args()
    failed = 0
    for child_args in expand_runs(args):
        record = run_child(script, child_args, timeout=args.timeout)
        failed += "error" in record
        print(json.dumps(record), flush=True)
    return 1 if failed else 0
