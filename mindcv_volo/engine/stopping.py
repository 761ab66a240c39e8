"""Stopping a training run on SIGINT or SIGTERM at a step boundary, every device at the same step.

`StopRequests` turns the signals into a flag (the step in progress finishes: the handler only records the
signal); the loop asks `agreed()` after every optimizer update and after every epoch's end. With several
devices the flag is all-reduced at each of those points, so all ranks stop after the same step: a rank
leaving alone would leave the others waiting in their next collective. A second SIGINT stops at once, as
Python does by default. Rank 0's verdict on a clock (a periodic checkpoint is due) rides the same all-reduce
(`agreed(clock_due)`), so every rank saves after the same update without another collective.
"""
import signal

import numpy as np
from mindspore import Tensor, ops

from .runtime import CompiledCollective

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Records SIGINT/SIGTERM while installed (a context manager); `agreed()`: the signal number every rank
    stops for, or 0."""

    def __init__(self, world):
        self.world = world
        self.received = 0
        self.stopping = 0  # once every rank agreed, it stays agreed (no further collective)
        self.previous = {}
        self.all_reduce = CompiledCollective(ops.AllReduce()) if world > 1 else None

    def __enter__(self):
        for signum in SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _record(self, signum, frame):
        self.received = self.received or signum
        signal.signal(signum, self.previous[signum])  # the same signal again: the default, immediate stop

    def agreed(self):
        """The signal some rank received (SIGTERM if any rank got it; every rank calls this at the same
        points), or 0."""
        return self.agreed_with_clock(False)[0]

    def agreed_with_clock(self, clock_due):
        """(`agreed()`, whether rank 0 passed `clock_due` true): every rank calls this at the same points, and
        only rank 0's clock counts (the ranks' clocks differ)."""
        if not self.stopping and self.all_reduce is None:
            self.stopping = self.received
            return self.stopping, clock_due
        if self.stopping:
            return self.stopping, False
        counts = self.all_reduce(Tensor(self._flags(clock_due))).asnumpy()
        self.stopping = next((signum for signum, count in sorted(zip(SIGNALS, counts), reverse=True) if count), 0)
        return self.stopping, bool(counts[-1])

    def _flags(self, clock_due):
        """What this rank adds to the all-reduce: one flag per signal, then its clock's verdict."""
        return np.array([self.received == signum for signum in SIGNALS] + [clock_due], np.float32)

    def barrier(self):
        """Every rank waits here until all arrive (rank 0 after writing the checkpoint)."""
        if self.all_reduce is not None:
            self.all_reduce(Tensor(np.zeros(len(SIGNALS) + 1, np.float32))).asnumpy()
