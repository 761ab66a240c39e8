"""Every random decision of training, drawn on the host from the seed and the position in the run.

Nothing random is left to a global state (MindSpore's, numpy's or Python's) or to the graph: each decision
comes from a numpy Generator keyed by what it decides for, so
  * a resumed run (even one stopped mid-epoch) draws exactly what an uninterrupted run draws, and nothing
    but the position needs saving;
  * the decisions do not depend on the device, on how many data workers run, or on which worker takes a
    sample: numpy's PCG64 gives the same bits on every platform.

The key is (stream, seed, epoch, *position): `stream` tells the purposes apart, so no two purposes ever
share a sequence. Per sample the position is the sample's place in the epoch's global order (the same on
any number of devices); per step it is (step, rank): each device draws for its own part of the batch.
"""
import numpy as np

# One number per purpose; a new purpose takes a new number (changing one changes every run's draws).
STREAMS = {"order": 0, "sample": 1, "mix_token": 2, "drop_path": 3, "mixup": 4}


def generator(stream, seed, epoch, *position):
    """The numpy Generator of one decision: `stream` (a STREAMS key) at (seed, epoch, *position)."""
    return np.random.default_rng([STREAMS[stream], int(seed), int(epoch), *map(int, position)])


def sample_generator(seed, epoch, position):
    """The augmentation of the sample at `position` of the epoch's global order."""
    return generator("sample", seed, epoch, position)


def step_generator(stream, seed, epoch, step, rank):
    """A per-step draw (MixToken box, drop-path masks, mixup/cutmix) of one device's batch."""
    return generator(stream, seed, epoch, step, rank)
