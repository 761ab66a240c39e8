"""The formulation a VOLO computes, chosen once when it is built: its backend.

Four formulations give the same numbers to float rounding:
- "portable": MindSpore's own ops (`ops.conv2d`, `ops.unfold` / `ops.fold`, LayerNorm, softmax), the fast path on
  Ascend and GPU (Cube units, cuDNN); it runs on CPU too, slowly, to check it there.
- "cpu": where MindSpore's CPU kernels are slow, another formulation (convolutions as patches + matmul, outlook
  attention's unfold / fold as channels-last gathers) with the fused CPU kernels (`cpu_kernels`) for float32.
- "cpu_unfused": the same CPU formulation on MindSpore's ops alone. "cpu" resolves to it when the kernels cannot
  be had (no compiler, or their check failed: one warning), and an export for deployment takes it, since the
  kernels' library exists only on this machine.
- "onnx": only primitives MindSpore's ONNX exporter maps (opset 11 has no Erf, Im2Col or Col2Im mapping): GELU
  with an erf the exporter writes as ONNX's own Erf, unfold / fold as the gathers, `ops.conv2d`, and a LayerNorm
  onnxruntime fuses.
"""
import enum
import os

import mindspore as ms

from ..errors import UserError
from . import kernel_library

# The one override of the device's default: a backend name (e.g. "portable", to run the accelerator
# formulation on CPU from a tool started as a subprocess).
BACKEND_VARIABLE = "MINDCV_VOLO_BACKEND"


class Backend(enum.StrEnum):
    """A VOLO's formulation; prints as its name."""

    PORTABLE = "portable"
    CPU = "cpu"
    CPU_UNFUSED = "cpu_unfused"
    ONNX = "onnx"

    @property
    def fused_kernels(self):
        """Cells take the fused CPU kernels (for float32 inputs)."""
        return self is Backend.CPU

    @property
    def matmul_convs(self):
        """Convolutions as patches + matmul on channels-last maps (MindSpore's CPU Conv2D runs at ~0.6 GFLOP/s)."""
        return self in (Backend.CPU, Backend.CPU_UNFUSED)

    @property
    def window_gathers(self):
        """Outlook attention's unfold / fold as gathers on channels-last maps, not Im2Col / Col2Im on NCHW."""
        return self is not Backend.PORTABLE

    def without_kernels(self):
        """This formulation without this machine's compiled kernels (for a graph that leaves the machine)."""
        return Backend.CPU_UNFUSED if self is Backend.CPU else self


def resolve_backend(requested=None):
    """The Backend a model built now computes: `requested` (a name or a Backend), else $MINDCV_VOLO_BACKEND, else
    the device's ("cpu" on CPU, "portable" on Ascend and GPU). "cpu" resolves to "cpu_unfused" when the fused
    kernels cannot be had."""
    name = requested or os.environ.get(BACKEND_VARIABLE)
    if not name:
        name = Backend.CPU if ms.get_context("device_target") == "CPU" else Backend.PORTABLE
    try:
        backend = Backend(name)
    except ValueError:
        source = "" if requested else f" in ${BACKEND_VARIABLE}"
        raise UserError(f"unknown backend {name!r}{source}; choose one of: "
                        f"{', '.join(backend.value for backend in Backend)}") from None
    if backend.fused_kernels and not kernel_library.available():
        return Backend.CPU_UNFUSED
    return backend
