"""Shared test set-up: CPU device, the reference fixtures, helpers to run the command-line tools."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import pytest

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings would drown the test output
ms.set_device("CPU")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFERENCE_CONFIGS = json.loads((FIXTURES / "configs.json").read_text())


def run_tool(*args, cwd=ROOT, timeout=600):
    """Run `python ARGS...` as a user would; returns the CompletedProcess (text)."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run the test in GRAPH_MODE and in PYNATIVE_MODE."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)
