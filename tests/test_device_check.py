"""scripts/device_check.sh on a machine without an accelerator: one line saying so, a non-zero exit, nothing written."""
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import pytest

from conftest import ROOT, tool_env


@pytest.mark.skipif(ms.hal.is_available("Ascend") or ms.hal.is_available("GPU"),
                    reason="an accelerator is present: run scripts/device_check.sh itself")
def test_device_check_says_in_one_line_that_there_is_nothing_to_check(tmp_path):
    # the script uses the `python` on PATH, as a user's activated environment provides it
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=tool_env(extra={"PATH": path}))
    assert proc.returncode == 1
    assert proc.stdout == ("device_check: no Ascend or GPU device on this machine (MindSpore sees only the CPU); "
                           "nothing to check\n")
    assert not (tmp_path / "out").exists()
