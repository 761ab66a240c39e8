"""Run-time setup shared by every command: device, execution mode, CPU threads, msrun, logging."""
import logging
import math
import os
import sys
import weakref
from typing import NamedTuple

import mindspore as ms
from mindspore import nn

from ..errors import UserError

logger = logging.getLogger("mindcv_volo")

DEVICES = ("Ascend", "GPU", "CPU")


class Runtime(NamedTuple):
    """What the setup resolved: the device (never "auto"), the mode, this process's rank and the world size."""
    device: str
    mode: int
    rank: int
    world: int
    threads: int

    @property
    def is_main(self):
        return self.rank == 0


class CompiledCollective(nn.Cell):
    """A collective op across the devices (`ops.AllReduce()`, `ops.AllGather()`, ...), run as a compiled graph:
    MindSpore 2.10's eager collectives have no CPU kernel (and the CPU AllReduce sums float32 only)."""

    def __init__(self, collective):
        super().__init__()
        self.collective = collective

    @ms.jit
    def construct(self, x):
        return self.collective(x)


def under_msrun():
    """Started by msrun: it gives each process (workers and its scheduler) MS_ROLE."""
    return bool(os.environ.get("MS_ROLE"))


def launcher_ranks():
    """(rank, world) an mpirun-style launcher (or a user sharding by hand) gives in RANK_ID / RANK_SIZE."""
    return int(os.environ.get("RANK_ID") or 0), int(os.environ.get("RANK_SIZE") or 1)


def launched_workers():
    """Processes the launcher started on this machine (msrun's MS_WORKER_NUM; one node assumed), else 1."""
    return int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 1)


def resolve_device(target):
    if target != "auto":
        if not ms.hal.is_available(target):
            present = [d for d in DEVICES if ms.hal.is_available(d)]
            raise UserError(f"device_target {target} is not available on this machine (available: "
                            f"{', '.join(present)}); use --device_target auto")
        return target
    return next(d for d in DEVICES if ms.hal.is_available(d))


def available_cores():
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max", encoding="ascii").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cpu_threads(requested=None):
    """MindSpore's CPU kernel threads: `requested`, else this process's share of the cores.

    MindSpore defaults to 25 threads whatever the machine; on 2 cores that costs ~15% of a training step,
    and msrun's workers share the cores. Settable once per process, before the first kernel.
    """
    threads = requested or max(1, available_cores() // launched_workers())
    try:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    except RuntimeError:  # set already in this process (MindSpore allows it once): that setting stays
        pass
    return threads


def setup_runtime(system, distribute=False, communicate=True):
    """Execution mode, device, CPU threads, this process's rank and its logging, from the `system` section.

    The one rule for several processes: under msrun, or with RANK_SIZE > 1 (a rank table on Ascend), the
    processes join one group (`init`) and train data parallel. A command whose processes need no
    communication (`communicate=False`: relabel's shards) takes RANK_ID / RANK_SIZE as they are.
    """
    ms.set_context(mode=ms.GRAPH_MODE if system.mode == 0 else ms.PYNATIVE_MODE)
    device = resolve_device(system.device_target)
    ms.set_device(device)
    threads = cpu_threads(system.cpu_threads)
    rank, world = launcher_ranks()
    if under_msrun() or (communicate and world > 1):
        from mindspore.communication import get_group_size, get_rank, init

        # msrun also starts a scheduler process running the script: init() serves the cluster there and
        # exits with it; in the workers it returns, with the rank assigned
        init()
        rank, world = get_rank(), get_group_size()
        if world > 1 and communicate:
            ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                         device_num=world)
    setup_logging(rank)
    if distribute and world == 1:
        logger.info("distribute is on, but this process was not started by msrun: it runs alone on one %s", device)
    ms.set_seed(system.seed)  # same seed on every rank: identical initial weights
    return Runtime(device, system.mode, rank, world, threads)


def release_free_heap():
    """Give the C heap's free pages back to the system (glibc's malloc_trim): compiling a graph leaves ~250 MB
    (inference) to ~370 MB (training step) freed but held by malloc (measured on volo_d1_224), which would count
    in the process's memory for the whole run; trimming returns ~90-110 MB of it (the rest stays, scattered
    between live allocations)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim this way
            pass


_COMPILED_CELLS = weakref.WeakSet()  # the cells compile_before_first_run has compiled


def compile_before_first_run(cell, *inputs):
    """Before `cell`'s first run (later calls return at once): compile it for `inputs` (GRAPH_MODE), then
    `release_free_heap`. The first run's buffers then come on top of what the compile keeps, not of what it
    freed too, so the process's peak resident memory is lower (volo_d1_224, batch 8: inference 1200 -> 1108 MB,
    training step 2718 -> 2610 MB). The run that follows finds the graph compiled for these inputs' shapes."""
    if cell in _COMPILED_CELLS:
        return
    if ms.get_context("mode") == ms.GRAPH_MODE:
        cell.compile(*inputs)
    release_free_heap()
    _COMPILED_CELLS.add(cell)


def describe(runtime, auto):
    """One log line: what the run executes on."""
    return (f"device {runtime.device}{' (auto)' * auto}, {'graph' if runtime.mode == 0 else 'pynative'} mode, "
            f"{runtime.world} worker{'s' * (runtime.world > 1)}, {runtime.threads} CPU thread"
            f"{'s' * (runtime.threads > 1)}")


def progress(iterable, total, what, log_every=20):
    """`iterable`, with a progress bar on a terminal (tqdm) and a plain log line every `log_every` items
    otherwise (a log file or a CI console gets lines, not carriage returns)."""
    if sys.stderr.isatty() and logger.isEnabledFor(logging.INFO):
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=what, leave=False, dynamic_ncols=True)
        return
    for index, item in enumerate(iterable):
        yield item
        if (index + 1) % log_every == 0 or index + 1 == total:
            logger.info("%s %d/%d", what, index + 1, total)


def setup_logging(rank):
    """Rank 0 logs INFO to stdout; other ranks only warnings and errors."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(stream)
    return logger


def add_log_file(path):
    """Also log to `path` (appending: a resumed run continues the file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)


def amp_level(level, backend):
    """The AMP level a run of a model built for `backend` uses: the recipe's, but O0 for the CPU backends.

    On CPU float16 is no faster than float32, and the CPU formulation (channels-last convolutions called as
    methods, float32 kernels) does not pass through the cells' float16 casts, so a recipe written for Ascend
    or GPU runs there in float32, and says so. The "portable" backend (the accelerator formulation, also on
    CPU, for checking) keeps the recipe's level.
    """
    if level != "O0" and backend.matmul_convs:
        logger.info("amp_level %s is for accelerators: on CPU the run computes in float32 (O0)", level)
        return "O0"
    return level
