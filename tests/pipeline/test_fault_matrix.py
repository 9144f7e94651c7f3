"""The fault matrix at its quick size: SIGKILL at a random moment, rerun, bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # 2 reference runs + 2 killed-and-rerun trials: CI runs it in its slow set
def test_quick_fault_matrix_loses_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fault_matrix.py"), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "160"})
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 trials, 2 survived, 0 lost" in text, text[-2000:]
    assert "identical to the uninterrupted run" in text
